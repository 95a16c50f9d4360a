-- ws.pipeline: the shared runner behind every pipelines/*.lua policy.
--
-- A pipeline file builds its pipeline with `pipeline.define{name=,
-- defaults=, plans=}`, gives it a `step(ctx, step)` method (and any rule
-- methods a variant may override, such as verl_lora's `need_base`) and
-- returns it. `wshost FILE key=value...` runs the pipeline a file returns;
-- a sweep or a test loads it and runs it with other settings in the same
-- process:
--   local P = dofile("pipelines/verl_lora.lua"); P.run{steps = 3, sleep_level = 2}
-- A variant overrides a method: `local V = P:with{name = "v"}; function
-- V:need_base(ctx) ... end`.
--
-- The policy speaks in decisions only: the context's verbs (ctx:train,
-- ctx:wake, ctx:send, ctx:rollout, ctx:sleep, ...) do the work, time
-- themselves into the phase of their name and keep the state a policy
-- decides on (ctx.state: whether the engine holds the base, what was
-- written since the last discard). The report's columns are the phases a
-- run used. The runner builds the trainer, the engine and the sync plans
-- once, calls step N times and reports. Which trainer and engine it builds
-- is the mode: simulated (ws.trainer and ws.engine, wshost's own stand-ins)
-- or in-process (ws.session: the caller's tensors and callbacks), with the
-- same policy file.
local ws = require("ws")
local config = require("ws.config")
local errors = require("ws.errors")
local models = require("ws.models")
local lora = require("ws.lora")
local trainer_mod = require("ws.trainer")
local engine_mod = require("ws.engine")
local sync_mod = require("ws.sync")
local verify = require("ws.verify")
local remote_mod = require("ws.remote")
local report_mod = require("ws.report")
local checkpoint = require("ws.checkpoint")
local parallel = require("ws.parallel")
local placement = require("ws.placement")
local must = errors.must
local M = {}

-- Configuration keys every pipeline has; a pipeline's `defaults` override or extend them.
M.common = {
    steps = { default = 5, type = "integer", min = 0, max = 1000000,
              help = "training steps (0: set up, save, exit)" },
    model = { default = "qwen3-0.6b", type = "string",
              help = "preset (" .. table.concat(models.names(), ", ") .. ") or a Hugging Face model directory" },
    -- per_rank: ranks may differ here (each its own GPU); on every other key
    -- they must agree (config.agree).
    device = { default = "auto", type = "string", per_rank = true,
               help = "cpu, cuda, cuda:N or auto" },
    bucket_mb = { default = ws.DEFAULT_BUCKET_BYTES // (1 << 20), type = "number", min = 0.001,
                  max = 1048576,
                  help = "sync bucket size (MiB)" },
    kv_cache_mb = { default = 64, type = "integer", min = 1, max = 1048576,
                    help = "engine KV cache (MiB)" },
    free_cache_engine = { default = true, type = "boolean", help = "engine sleeps after rollout" },
    sleep_level = { default = 1, type = "enum", values = { 1, 2 }, help = "engine sleep level" },
    param_dtype = { default = "bf16", type = "enum", values = { "bf16", "f32" },
                    help = "trainer weights (f32: master weights, bf16 on the wire)" },
    engine_dtype = { default = "bf16", type = "enum", values = engine_mod.dtypes,
                     help = "engine weights: bf16, or fp8_block (linear layers as fp8 e4m3 " ..
                            "with one f32 scale per 128x128 block)" },
    engine_tp = { default = 1, type = "integer", min = 1, max = 65536,
                  help = "engine tensor parallelism: groups of this many consecutive ranks, each " ..
                         "rank holding vLLM's TP shard" },
    placement = { default = "colocated", type = "enum", values = placement.placements,
                  help = "colocated: every rank trains and holds an engine; disaggregated: " ..
                         "the first trainer_ranks ranks train, the others hold the engine" },
    trainer_ranks = { default = 0, type = "integer", min = 0, max = 1000000,
                      help = "placement=disaggregated: how many ranks train (0: half)" },
    engine_ep = { default = 1, type = "integer", min = 1, max = 65536,
                  help = "engine expert parallelism: each layer's experts placed contiguously " ..
                         "over groups of this many consecutive ranks" },
    sync_exchange = { default = "auto", type = "enum",
                      values = { "auto", "staged", "all_gather" },
                      help = "several ranks: auto sends point to point straight from each " ..
                             "shard into the engine tensors, each rank only what its shard " ..
                             "needs (cpu over MPI; else as staged); staged goes " ..
                             "through staging buffers (one all_to_all per bucket when engine " ..
                             "blocks make that move fewer bytes); all_gather gathers whole " ..
                             "tensors on every rank" },
    param_offload = { default = false, type = "boolean",
                      help = "trainer params to pinned host memory after training" },
    seed = { default = 0, type = "integer", min = 0, help = "weight seed" },
    adapter = { default = "", type = "string",
                help = "start LoRA from a PEFT adapter dir (its config sets rank, alpha, targets)" },
    save_adapter = { default = "", type = "string",
                     help = "write the trainer's LoRA adapter at the end, PEFT format, to DIR" },
    save = { default = "", type = "string",
             help = "write the trainer's weights at the end: a Hugging Face checkpoint dir" },
    save_engine = { default = "", type = "string",
                    help = "write each engine rank's tensors after the last rollout to DIR" },
    save_shard_mb = { default = 5000, type = "number", min = 0.001, max = 1e9,
                      help = "largest shard save= writes (MB; save_pretrained's 5GB)" },
    dry_run = { default = false, type = "boolean",
                help = "build trainer, engine and plans in address space only, report, exit" },
    progress = { default = "auto", type = "enum", values = { "auto", "on", "off" },
                 per_rank = true, help = "sync progress on stderr" },
    engine_address = { default = "", type = "string",
                       help = "server mode: the engine is another process, whose " ..
                              "wshost.Receiver listens on NAME-<rank>; empty: in this process" },
    engine_timeout_ms = { default = 30000, type = "integer", min = 1, max = 86400000,
                          help = "server mode: longest wait for the engine process's answer" },
    verify = { default = "all", type = "enum", values = { "all", "sent", "off" },
               help = "each rollout proves: all engine tensors by checksum; sent: the plans " ..
                      "sent this step by checksum, the rest readable; off: nothing (benchmarks)" },
}

local Pipeline = {}
Pipeline.__index = Pipeline
-- wshost runs a script that returns a table of this name (host/lua/main.c).
Pipeline.__name = "ws.Pipeline"

-- def: name, description, defaults (schema entries: table, or a plain value
-- to change a common key's default), plans (kinds to build: "base",
-- "adapter", "full"; "adapter" is skipped without LoRA), step (or a
-- `function P:step(ctx, step)` given after define). Any other field (a rule
-- method such as need_base) is kept for the step to call as a method.
function M.define(def)
    local p = setmetatable({}, Pipeline)
    for k, v in pairs(def) do p[k] = v end
    local schema = {}
    for k, v in pairs(M.common) do schema[k] = v end
    for k, v in pairs(def.defaults or {}) do
        if type(v) == "table" then
            schema[k] = v
        else
            assert(schema[k], "pipeline.define: default for unknown key '" .. k .. "' needs a schema")
            local copy = {}
            for kk, vv in pairs(schema[k]) do copy[kk] = vv end
            copy.default = v
            schema[k] = copy
        end
    end
    p.schema = schema
    p.plans = def.plans or { "base", "adapter" }
    p.run = function(overrides, opts) return M.run(p, overrides, opts) end
    p.main = function(argv) return M.main(p, argv) end
    return p
end

-- A copy with some fields replaced; override methods on the copy to make a
-- policy variant (`function V:need_base(ctx) ... end`).
function Pipeline:with(fields)
    local def = {}
    for k, v in pairs(self) do def[k] = v end
    def.schema, def.run, def.main = nil, nil, nil
    for k, v in pairs(fields or {}) do def[k] = v end
    return M.define(def)
end

function M.is_pipeline(v) return getmetatable(v) == Pipeline end

local function world_comm()
    if not ws.comm then return nil, 0, 1 end
    local c = ws.comm()
    local function get(f)
        local v = c[f]
        if type(v) == "function" then return v(c) end
        return v
    end
    return c, get("rank"), get("size")
end

-- The context a policy's step sees: the run's parts (cfg, trainer, engine,
-- lora, comm, rank, world, log), ctx.step (the step running), ctx.state
-- (kept by the verbs) and the verbs.
local Ctx = {}
Ctx.__index = Ctx

-- Runs fn(...) and adds its wall time to phase `name` of this step; the
-- report shows a column for every phase a run used.
function Ctx:phase(name, fn, ...)
    local t0 = ws.now_ms()
    local r = fn(...)
    self:add_ms(name, ws.now_ms() - t0)
    return r
end

function Ctx:add_ms(name, ms) report_mod.add_ms(self.rec, name, ms) end

-- The trainer's step (simulated: deterministic updates; in-process: the
-- caller's "train" callback). Without LoRA every weight trains, so the
-- engine no longer holds the current base.
function Ctx:train()
    self:phase("train", self.trainer.train_step, self.trainer, self.step)
    if not self.lora then self.state.engine_has_base = false end
end

-- The trainer's weights to pinned host memory and back (param_offload).
function Ctx:offload()
    self:phase("offload", self.trainer.offload, self.trainer, "step " .. self.step)
end

function Ctx:load() self:phase("load", self.trainer.load, self.trainer) end

-- Wakes the engine's memory of one tag ("weights" or "kv_cache"; nil:
-- both) if it sleeps.
function Ctx:wake(tag)
    local engine = self.engine
    self:phase("wake", function()
        for _, t in ipairs(tag and { tag } or { "weights", "kv_cache" }) do
            if engine:is_asleep(t) then engine:wake_up({ t }) end
        end
    end)
end

-- The engine sleeps (level: 1 backs the weights up, 2 discards them; nil:
-- the sleep_level key). A level-2 sleep discards everything sent so far.
function Ctx:sleep(level)
    level = level or self.cfg.sleep_level
    self:phase("sleep", self.engine.sleep, self.engine, level, "step " .. self.step)
    if level == 2 then
        local st = self.state
        st.engine_has_base, st.written, st.discarded_at = false, {}, self.step
    end
end

-- Sends one plan ("base", "adapter" or "full") and records bytes and times.
function Ctx:send(kind)
    local s = self.sync:send(kind)
    local rec = self.rec
    if kind == "adapter" then
        self:add_ms("adapter", s.wall_ms)
        rec.adapter_sent, rec.adapter_bytes = true, rec.adapter_bytes + s.bytes_moved
    else
        -- Quantization (fp8_block) writes the engine's weights: copy_out.
        self:add_ms("gather", math.max(0, s.wall_ms - s.copy_out_ms - s.quant_ms))
        self:add_ms("copy_out", s.copy_out_ms + s.quant_ms)
        rec.base_sent, rec.base_bytes = true, rec.base_bytes + s.bytes_moved
        if kind == "full" and self.lora then rec.adapter_sent = true end
        self.state.base_sync_done, self.state.engine_has_base = true, true
    end
    -- The verification's record of a quantizing sync (ws.verify.seal).
    if s.seal_ms > 0 then self:add_ms("verify", s.seal_ms) end
    rec.quant_ms, rec.seal_ms = rec.quant_ms + s.quant_ms, rec.seal_ms + s.seal_ms
    rec.engine_bytes = rec.engine_bytes + s.engine_bytes
    rec.bytes_sent = rec.bytes_sent + s.bytes_moved
    rec.bytes_gathered = rec.bytes_gathered + s.bytes_gathered
    rec.bytes_gathered_full = rec.bytes_gathered_full + s.bytes_gathered_full
    rec.exchanged = rec.exchanged or s.exchanged == true
    rec.staging_bytes = math.max(rec.staging_bytes, s.staging_bytes)
    self.sent[kind] = true
    self.state.written[kind] = true
    return s
end

-- An engine that holds its own memory (in-process with callbacks) cannot
-- say that a sleep discarded it: the runner remembers what a level-2 sleep
-- discarded and what was sent since, and refuses a rollout on discarded
-- weights, naming the first tensor of a plan not sent since.
local function check_discarded(self)
    local st = self.state
    if not st.discarded_at or not self.engine.own_memory then return end
    for _, kind in ipairs(self.verify_kinds) do
        if not (st.written[kind] or st.written.full) then
            local first = self.sync.pairs[kind][1]
            error(string.format("verify: engine tensor '%s' was discarded by the level-2 sleep " ..
                                "at step %d and the '%s' plan has not been sent since; the " ..
                                "rollout would run on discarded weights",
                                first and first.dst_name or "?", st.discarded_at, kind), 0)
        end
    end
end

-- Proves, from the engine's own memory, that its weights (base and adapter)
-- equal the trainer's, then runs the engine's rollout (simulated: it writes
-- the KV cache; in-process: the caller's "rollout" callback). verify= says
-- how much is proven: all (every plan by checksum), sent (the plans sent
-- this step by checksum, the others readable: verify.check_unsent), off.
function Ctx:rollout()
    local t0 = ws.now_ms()
    local step = self.step
    local rec, mode = self.rec, self.cfg.verify or "all"
    rec.engine_mapped_awake = self.engine:memory().mapped
    if mode ~= "off" then
        check_discarded(self)
        local vctx = { comm = self.comm, world = self.world, trainer = self.trainer,
                       engine = self.engine, note = "step " .. step .. " rollout" }
        local hashed, valid = 0, 0
        for _, kind in ipairs(self.verify_kinds) do
            local plist = self.sync.pairs[kind]
            if mode == "all" or self.sent[kind] then
                hashed = hashed + verify.check(plist, vctx)
            else
                local n, summed = verify.check_unsent(plist, vctx)
                if summed then hashed = hashed + n else valid = valid + n end
            end
        end
        rec.verified, rec.verified_tensors, rec.readable_tensors = true, hashed, valid
    end
    rec.verify_check_ms = ws.now_ms() - t0
    self:add_ms("verify", rec.verify_check_ms)
    self:phase("rollout", self.engine.rollout, self.engine, step)
    -- The engine as the last rollout left it: every rank writes its own. A
    -- session has no last step known in advance: it writes at close.
    if step == self.cfg.steps and self.cfg.save_engine ~= "" and not self.session then
        local files = checkpoint.save_engine(self.engine, self.cfg.save_engine, self)
        self.log(string.format("# save_engine: wrote %s in %s", files[1], self.cfg.save_engine))
    end
end

local function resolve_device(name)
    if name == "auto" then return (ws.default_device()) end
    local d, msg = ws.device(name)
    if not d then config.raise("config key 'device': device '%s' is unusable: %s", name, tostring(msg)) end
    return d
end

-- overrides: table of config values (or strings). opts: json (path), log
-- (function(msg)), quiet. Returns the records and the summary.
function M.run(p, overrides, opts)
    opts = opts or {}
    local cfg = config.resolve(p.schema, overrides)
    if not opts.explicit then
        opts.explicit = {}
        for k in pairs(overrides or {}) do opts.explicit[k] = true end
    end
    return M.run_config(p, cfg, opts)
end

-- LoRA settings from adapter=DIR (its adapter_config.json) or from the keys;
-- an adapter and a key given on the command line that disagree is an error.
local function lora_settings(cfg, explicit)
    local s = { r = cfg.lora_rank or 0, alpha = cfg.lora_alpha,
                target_modules = cfg.target_modules }
    if (cfg.adapter or "") == "" then return s end
    if cfg.lora_rank == nil then
        config.raise("config key 'adapter': this pipeline has no LoRA adapter")
    end
    local a = config.check("adapter", checkpoint.read_adapter_config, cfg.adapter)
    local function agree(key, mine, theirs, name)
        if explicit[key] and tostring(mine) ~= tostring(theirs) then
            config.raise("config key '%s' is %s but adapter %s has %s %s; drop %s= (the " ..
                         "adapter's config sets it)", key, tostring(mine), cfg.adapter, name,
                         tostring(theirs), key)
        end
    end
    agree("lora_rank", cfg.lora_rank, a.r, "r")
    agree("lora_alpha", cfg.lora_alpha, a.alpha, "lora_alpha")
    agree("target_modules", cfg.target_modules, a.target_modules, "target_modules")
    return { r = a.r, alpha = a.alpha, target_modules = a.target_modules,
             use_rslora = a.use_rslora, adapter = a.path }
end

-- Starts a run: checks the configuration, builds the trainer, the engine
-- and the plans (opts.parts: {trainer = fn(args), engine = fn(args)} make
-- them; nil: wshost's stand-ins, ws.trainer and ws.engine), and returns the
-- Run, whose step() runs the next step of the policy and finish() saves,
-- reports and frees. On any error everything built is freed first.
local Run = {}
Run.__index = Run

-- Checks the configuration of a run without allocating anything; returns
-- what setup needs (device, spec, lcfg, comm, rank, world, log).
function M.prepare(p, cfg, opts)
    opts = opts or {}
    if type(p.step) ~= "function" then
        config.raise("pipeline '%s' has no step(ctx, step) method", tostring(p.name))
    end
    local comm, rank, world = world_comm()
    local log = opts.log or function(msg) if rank == 0 then ws.log("%s", msg) end end
    if opts.quiet then log = function() end end
    config.agree(comm, cfg, p.schema, p.name)
    local device = config.check("device", resolve_device, cfg.device)
    local spec = config.check("model", models.get, cfg.model)
    local ls = lora_settings(cfg, opts.explicit or {})
    if ls.r > 0 and ls.alpha ~= nil then
        config.check("lora_alpha", lora.check_alpha, ls.alpha)
    end
    local lcfg = config.check("target_modules", lora.config, ls)
    if lcfg and ls.adapter then
        -- The report shows what runs: the adapter's settings.
        lcfg.adapter = ls.adapter
        cfg.lora_rank, cfg.lora_alpha, cfg.target_modules = ls.r, ls.alpha, ls.target_modules
    end
    if (cfg.save_adapter or "") ~= "" and not lcfg then
        config.raise("config key 'save_adapter': LoRA is off (lora_rank=0); nothing to save")
    end
    if cfg.save_engine ~= "" and cfg.steps == 0 then
        config.raise("config key 'save_engine': the engine is written after the last " ..
                     "rollout; steps=0 has none")
    end
    if lcfg then
        config.check("lora_rank", lora.check_rank, spec, lcfg)
        config.check("target_modules", lora.check_model, spec, lcfg)
    end
    placement.check(cfg, world)
    parallel.check(cfg, spec, placement.engine_world(cfg, world))
    return { device = device, spec = spec, lcfg = lcfg, comm = comm, rank = rank,
             world = world, log = log }
end

function M.start(p, cfg, opts)
    opts = opts or {}
    local env = opts.env or M.prepare(p, cfg, opts)
    env.parts = opts.parts or {}
    local log, rank, device = env.log, env.rank, env.device
    -- Opened first: an unwritable --json is a configuration mistake, found
    -- before anything is allocated.
    local okr, report = pcall(report_mod.new, { title = p.name, cfg = cfg, device = device,
                                                rank = rank, json = opts.json, log = log })
    if not okr then config.raise("--json: %s", tostring(report):gsub("^[^:]*:%d+: ", "")) end
    local run = setmetatable({ p = p, cfg = cfg, report = report, built = {}, step_no = 0,
                               env = env }, Run)
    local ok, err = pcall(M.setup, p, cfg, run.built, report, run.env)
    if not ok then run:fail(err) end
    run.ctx = run.env.ctx
    return run
end

-- Runs the policy's next step; returns its record.
function Run:step()
    local ctx = self.ctx
    if not ctx then error("pipeline: this run has no steps (dry_run, or it was finished)", 2) end
    self.step_no = self.step_no + 1
    local step = self.step_no
    local ok, err = pcall(function()
        ctx.step, ctx.rec, ctx.sent = step, self.report:begin_step(step), {}
        self.p:step(ctx, step)
        local engine = ctx.engine
        local mem = engine:memory()
        ctx.rec.engine_mapped_after = mem.mapped
        ctx.rec.engine_backup_bytes = mem.backup_bytes
        ctx.rec.engine_asleep = engine:is_asleep("weights")
        self.report:end_step(ctx.rec)
    end)
    if not ok then self:fail(errors.context(err, "%s: step %d failed", self.p.name, step)) end
    return ctx.rec
end

-- save=, save_adapter= (every rank), the summary, then frees everything.
-- Returns the records and the summary.
function Run:finish()
    if self.ctx then
        local env, place = self.env, self.built.placement
        local sctx = { comm = env.world > 1 and env.comm or nil, rank = env.rank,
                       world = env.world, log = env.log }
        -- Disaggregated: the trainer ranks save, among themselves.
        if place then
            sctx = place.trainer and { comm = place.trainer_comm, rank = place.index,
                                       world = place.n, log = env.log } or nil
        end
        local ok, err = true, nil
        if sctx then ok, err = pcall(M.save_outputs, self.cfg, self.ctx.trainer, sctx) end
        if not ok then self:fail(err) end
    end
    self.report:close()
    local summary = self.report:summary()
    local freed, ferr = self:free()
    if not freed then error(ferr, 0) end
    return self.report.records, summary
end

-- Frees every part (also those of a run that stopped part way); each is
-- freed even when another fails. Returns ok, the first error.
function Run:free()
    local freed, ferr = true, nil
    for _, k in ipairs({ "sync", "engine", "trainer", "model_ck", "adapter_ck", "parallel",
                         "placement" }) do
        local part = self.built[k]
        if part then
            local okf, e = pcall(part.free, part)
            if not okf and freed then freed, ferr = false, e end
        end
        self.built[k] = nil
    end
    self.ctx = nil
    return freed, ferr
end

-- Frees a run that failed and raises its error: the run's own error wins
-- over any the cleanup meets. A sweep keeps going in this process after a
-- failed point, so nothing may stay allocated.
function Run:fail(err)
    self.report:close()
    self:free()
    error(err, 0)
end

-- overrides: table of config values (or strings). opts: json (path), log
-- (function(msg)), quiet, parts (see M.start). Returns the records and the
-- summary.
function M.run_config(p, cfg, opts)
    local run = M.start(p, cfg, opts)
    for _ = 1, run.ctx and cfg.steps or 0 do run:step() end
    return run:finish()
end

-- Builds the trainer, the engine and the plans into `built` (the parts'
-- makers in env.parts, or wshost's stand-ins) and the context in env.ctx.
function M.setup(p, cfg, built, report, env)
    local device, spec, lcfg, comm, world, log = env.device, env.spec, env.lcfg, env.comm,
                                                 env.world, env.log
    local t_setup = ws.now_ms()
    local targs = { spec = spec, lora = lcfg, device = device, comm = comm, rank = env.rank,
                    world = world, dtype = cfg.param_dtype, seed = cfg.seed,
                    dry_run = cfg.dry_run }
    -- Disaggregated: trainer ranks train over their own comm, engine ranks hold
    -- a trainer of sizes only (ws.placement).
    if placement.is_disaggregated(cfg) and (env.parts.trainer or env.parts.engine) then
        config.raise("config key 'placement': in-process runs are colocated")
    end
    local place = placement.new(cfg, comm, env.rank, world)
    built.placement = place
    if place then targs.comm, targs.world = place.trainer_comm, place.n end
    if place and not place.trainer then
        built.trainer = placement.trainer_layout(spec, lcfg, place.n)
    elseif env.parts.trainer then
        built.trainer = env.parts.trainer(targs)
    else
        -- The files are mapped, checked against config.json and the
        -- adapter's config, read by the trainer (each rank its own rows) and
        -- closed.
        built.model_ck = checkpoint.open_model(spec)
        if lcfg and lcfg.adapter then
            built.adapter_ck = checkpoint.open_adapter(lcfg.adapter, lora.params(spec, lcfg))
        end
        targs.checkpoint, targs.adapter_checkpoint = built.model_ck, built.adapter_ck
        built.trainer = trainer_mod.new(targs)
        for _, k in ipairs({ "model_ck", "adapter_ck" }) do
            if built[k] then built[k]:free() end
            built[k] = nil
        end
    end
    if env.parts.engine and ((cfg.engine_tp or 1) > 1 or (cfg.engine_ep or 1) > 1) then
        config.raise("config keys 'engine_tp' and 'engine_ep': in-process engines hold the " ..
                     "whole model here; use 1")
    end
    built.parallel = parallel.new(cfg, comm, env.rank, world, place and place.n or 0)
    local eargs = { spec = spec, lora = lcfg, device = device, kv_cache_mb = cfg.kv_cache_mb,
                    dry_run = cfg.dry_run, engine_dtype = cfg.engine_dtype,
                    parallel = built.parallel, bucket_mb = cfg.bucket_mb }
    local make_engine = env.parts.engine or engine_mod.new
    if cfg.engine_address ~= "" then
        remote_mod.check_config(cfg)
        make_engine = function(a)
            return remote_mod.engine(a, { address = cfg.engine_address, rank = env.rank,
                                          callbacks = env.parts.callbacks,
                                          timeout_ms = cfg.engine_timeout_ms })
        end
    end
    if place and place.trainer then
        built.engine = placement.engine_absent()
    else
        built.engine = make_engine(eargs)
        -- save_engine numbers the engine ranks from 0 among themselves.
        if place then built.engine.save_index = place.index end
    end
    local sync_comm = world > 1 and comm or nil
    if place then sync_comm = place.trainer_comm end
    built.sync = sync_mod.new{ trainer = built.trainer, engine = built.engine,
                               comm = sync_comm, device = device,
                               bucket_mb = cfg.bucket_mb, progress = cfg.progress,
                               verify = cfg.verify, exchange = cfg.sync_exchange,
                               rank = env.rank, relay = place and placement.relay_of(place) }
    local trainer, engine, sync = built.trainer, built.engine, built.sync
    local verify_kinds, build_ms = {}, {}
    for _, kind in ipairs(p.plans) do
        if kind ~= "adapter" or lcfg then
            local t0 = ws.now_ms()
            sync:build(kind)
            build_ms[kind] = ws.now_ms() - t0
            verify_kinds[#verify_kinds + 1] = kind
        end
    end
    log(string.format("# %s: model %s (%.1fM params%s), world %d, device %s", p.name, spec.name,
                      models.param_count(spec) / 1e6,
                      lcfg and string.format(", LoRA r=%d %.1f MB", lcfg.r,
                                             lora.param_count(spec, lcfg) * 2 / 1e6) or "",
                      world, tostring(device)))
    log("# config: " .. config.describe(cfg))
    if place then log("# placement " .. placement.describe(place, world)) end
    if engine.remote then log(engine:describe()) end
    if built.parallel and not place then
        log(string.format("# engine: %s; rank 0 holds %.1f MB of engine weights",
                          parallel.describe(built.parallel), engine.weight_bytes / 1e6))
    end
    if lcfg and spec.sparse and next(spec.sparse) ~= nil then
        log("# LoRA: mixture-of-experts layers take no adapter on their experts or router " ..
            "(not supported); " .. (lcfg.all_linear and "all-linear wraps attention and dense MLPs"
                                    or "the adapter wraps " .. table.concat(lcfg.targets, ",")))
    end
    log(string.format("# weights: %s%s", spec.weights and ("checkpoint " .. spec.weights)
                          or "seeded random (no checkpoint)",
                      lcfg and lcfg.adapter and (", adapter " .. lcfg.adapter) or ""))
    log(string.format("# setup %.0f ms (trainer shards %.1f MB, engine weights %.1f MB, " ..
                      "KV cache %.1f MB)", ws.now_ms() - t_setup, trainer:shard_bytes() / 1e6,
                      engine.weight_bytes / 1e6, engine.kv_bytes / 1e6))
    if #engine.quantized > 0 then
        log(string.format("# engine_dtype=fp8_block: %d tensors as fp8 e4m3 with 128x128 block " ..
                          "scales; their bf16 staging (%.1f MB) is mapped only during a base " ..
                          "sync", #engine.quantized, engine.staging_bytes / 1e6))
    end

    if cfg.dry_run then return M.dry_run_report(p, built, verify_kinds, build_ms, env) end

    env.ctx = setmetatable({ cfg = cfg, pipeline = p, trainer = trainer, engine = engine,
                             sync = sync, comm = comm, rank = env.rank, world = world,
                             device = device, lora = lcfg, log = log,
                             verify_kinds = verify_kinds, session = env.session,
                             state = { base_sync_done = false, engine_has_base = false,
                                       written = {} } }, Ctx)
end

-- save= and save_adapter= at the end of a run (every rank takes part).
function M.save_outputs(cfg, trainer, ctx)
    local function timed(what, dir, fn, ...)
        local t0 = ws.now_ms()
        local files = fn(...)
        local shown = #files <= 4 and table.concat(files, ", ")
            or string.format("%s ... %s (%d files)", files[1], files[#files], #files)
        ctx.log(string.format("# %s: wrote %s in %s (%.0f ms)", what, shown, dir,
                              ws.now_ms() - t0))
    end
    if cfg.save ~= "" then
        ctx.max_shard_bytes = math.floor(cfg.save_shard_mb * 1e6)
        timed("save", cfg.save, checkpoint.save_model, trainer, cfg.save, ctx)
    end
    if (cfg.save_adapter or "") ~= "" then
        timed("save_adapter", cfg.save_adapter, checkpoint.save_adapter, trainer,
              cfg.save_adapter, ctx)
    end
end

-- What a dry run prints instead of steps: sizes, tensor counts and what
-- each plan would do, from the layout alone.
function M.dry_run_report(p, built, kinds, build_ms, env)
    local trainer, engine, sync, log = built.trainer, built.engine, built.sync, env.log
    local spec = trainer.spec
    log(string.format("# dry run: %d parameters (%d base, %d adapter) in %d trainer tensors " ..
                      "per rank, %d engine tensors", models.param_count(spec) +
                      (trainer.lora and lora.param_count(spec, trainer.lora) or 0),
                      #trainer.base_params, #trainer.adapter_params, #trainer.params,
                      #engine.order))
    -- MB_gathered is the gather of whole tensors: an exchange (engine_tp > 1)
    -- is planned with every rank's blocks at the first sync, so a dry run
    -- cannot show it.
    log("#plan     entries buckets  MB_per_sync  MB_gathered  staging_MB  build_ms")
    local total_ms = 0
    for _, kind in ipairs(kinds) do
        local st = must("dry run", sync.plans[kind]:estimate())
        total_ms = total_ms + build_ms[kind]
        log(string.format("%-9s %7d %7d %12.1f %12.1f %11.1f %9.1f", kind, st.entries, st.buckets,
                          st.bytes_moved / 1e6, st.bytes_gathered / 1e6, st.staging_bytes / 1e6,
                          build_ms[kind]))
    end
    log(string.format("# plans built in %.1f ms; no weight memory was touched", total_ms))
end

-- Command-line entry: parses argv (key=value, --json FILE, --help) and runs.
-- Configuration mistakes print one clear line and exit with status 2.
function M.main(p, argv)
    local args = {}
    for i = 1, #(argv or {}) do args[i] = argv[i] end
    local ok, cfg, opts = pcall(config.parse, p.schema, args)
    if not ok then
        if config.is_error(cfg) then
            io.stderr:write(string.format("%s: %s\n", p.name, tostring(cfg)))
            os.exit(2)
        end
        error(cfg, 0)
    end
    if opts.help then
        io.stdout:write((p.description or p.name) .. "\n" .. config.usage(p.schema) .. "\n")
        return
    end
    local okr, err = pcall(M.run_config, p, cfg, opts)
    if not okr then
        if config.is_error(err) then
            io.stderr:write(string.format("%s: %s\n", p.name, tostring(err)))
            os.exit(2)
        end
        error(err, 0)
    end
end

return M
