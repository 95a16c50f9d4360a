-- ws.session: a policy run driven by an embedding program, step by step,
-- on the program's own tensors (the C API in host/ws.h and the Python
-- module sit on this).
--
--   local S = require("ws.session").open("pipelines/verl_lora.lua", { model = "dir", sleep_level = 2 })
--   for _, e in ipairs(S:expected("trainer")) do S:add("trainer", e.name, tensor_of[e.name]) end
--   ... S:add("adapter", ...), S:add("engine", ...) or S:alloc(name, shape, "bf16")
--   S:on("train", fn); S:on("rollout", fn); S:on("sleep", fn); S:on("wake", fn)
--   local rec = S:step()      -- the first step builds the plans
--   local summary = S:close()
--
-- The pipeline file is the same one `wshost FILE` runs: the session is one
-- more way to make its trainer and engine (ws.inprocess), not a second
-- runner. Registrations are checked as they come (a name the model does not
-- have, a shape, a dtype); the first step checks that nothing is missing
-- before any byte moves.
local ws = require("ws")
local config = require("ws.config")
local pipeline = require("ws.pipeline")
local inprocess = require("ws.inprocess")
local checkpoint = require("ws.checkpoint")
local must = require("ws.errors").must

local M = {}
local Session = {}
Session.__index = Session

M.events = { train = true, rollout = true, sleep = true, wake = true }

-- source: a pipeline file's path or a pipeline; overrides: config keys
-- (values or strings); opts: log (function(msg)), quiet, json (path).
function M.open(source, overrides, opts)
    local p = source
    if type(source) == "string" then
        local chunk, err = loadfile(source)
        if not chunk then error("session: " .. tostring(err), 0) end
        p = chunk()
    end
    if not pipeline.is_pipeline(p) then
        error(string.format("session: %s does not return a pipeline (ws.pipeline.define)",
                            type(source) == "string" and source or tostring(source)), 0)
    end
    opts = opts or {}
    local cfg = config.resolve(p.schema, overrides or {})
    if cfg.param_offload then
        config.raise("config key 'param_offload': in-process, the trainer's memory is the " ..
                     "caller's to offload")
    end
    if cfg.engine_dtype ~= "bf16" then
        config.raise("config key 'engine_dtype': in-process engines hold bf16 weights " ..
                     "(fp8_block runs with the simulated engine only)")
    end
    if cfg.dry_run then config.raise("config key 'dry_run': a session syncs real tensors") end
    local explicit = {}
    for k in pairs(overrides or {}) do explicit[k] = true end
    local self = setmetatable({ p = p, cfg = cfg, reg = { trainer = {}, adapter = {}, engine = {} },
                                callbacks = {}, allocated = {}, opts = opts }, Session)
    local popts = { explicit = explicit, log = opts.log, quiet = opts.quiet, json = opts.json }
    self.env = pipeline.prepare(p, cfg, popts)
    self.popts = popts
    self.wanted = {}
    for _, role in ipairs({ "trainer", "adapter", "engine" }) do
        local list, by = inprocess.expected(self.env.spec, self.env.lcfg, role, cfg.param_dtype), {}
        for _, e in ipairs(list) do by[e.name] = e end
        self.wanted[role] = { list = list, by = by }
    end
    return self
end

local function check_open(self, what)
    if self.closed then error("session: " .. what .. " after close", 3) end
end

-- Server mode: the engine's tensors are the engine process's.
local function check_local_engine(self, name)
    if self.cfg.engine_address ~= "" then
        error(string.format("engine tensor '%s': the engine runs in another process " ..
                            "(engine_address=%s); register its tensors there, with " ..
                            "wshost.Receiver", tostring(name), self.cfg.engine_address), 3)
    end
end

local function check_role(role)
    if role ~= "trainer" and role ~= "adapter" and role ~= "engine" then
        error(string.format("session: unknown role '%s' (trainer, adapter, engine)",
                            tostring(role)), 3)
    end
end

-- What the caller registers for `role`: {name, shape, dtype} in order.
function Session:expected(role)
    check_role(role)
    return self.wanted[role].list
end

-- Registers `t` (a ws.Tensor over the caller's memory) as `name` of `role`;
-- global: the full tensor's shape (trainer, adapter: t is this rank's dim-0
-- shard; nil: t's own shape). owned: the tensor is a wrapper the session may
-- free at close (the C API's over the caller's memory), so the caller learns
-- through its release callback that wshost let the memory go.
function Session:add(role, name, t, global, owned)
    check_open(self, "add")
    check_role(role)
    if self.run then
        error(string.format("session: %s tensor '%s' registered after the first step; register " ..
                            "everything before it", role, tostring(name)), 2)
    end
    local want = self.wanted[role].by[name]
    if not want then
        local hint = role == "adapter" and not self.env.lcfg and " (LoRA is off: lora_rank=0)" or ""
        error(string.format("%s tensor '%s' is not a %s parameter of model %s%s", role,
                            tostring(name), role, self.env.spec.name, hint), 2)
    end
    if self.reg[role][name] then
        error(string.format("%s tensor '%s' is registered twice", role, name), 2)
    end
    if role == "engine" then check_local_engine(self, name) end
    inprocess.check_registration(role, want, t, global, self.env.rank, self.env.world)
    self.reg[role][name] = { tensor = t, global = global, owned = owned == true }
end

-- An engine tensor in wshost's memory: a sleepable pool tagged "weights",
-- sized for the engine's whole layout at the first call. Registered as the
-- engine tensor `name`; returns it (the caller views it, e.g. through DLPack).
function Session:alloc(name, shape, dtype)
    check_open(self, "alloc")
    check_local_engine(self, name)
    local want = self.wanted.engine.by[name]
    if not want then
        error(string.format("engine tensor '%s' is not in the engine layout of model %s",
                            tostring(name), self.env.spec.name), 2)
    end
    if self.reg.engine[name] then
        error(string.format("engine tensor '%s' is registered twice", name), 2)
    end
    if not self.pool then
        local shapes = {}
        for i, e in ipairs(self.wanted.engine.list) do shapes[i] = e.shape end
        self.pool = must("session", ws.pool{ device = self.env.device, tag = "weights",
                                             bytes = ws.pool_bytes(shapes, "bf16") })
    end
    dtype = dtype or "bf16"
    if dtype ~= "bf16" then
        error(string.format("engine tensor '%s' is %s; the engine's weights must be bf16 " ..
                            "(engine_dtype=bf16)", name, tostring(dtype)), 2)
    end
    local given = inprocess.shape_str(shape)
    if given ~= inprocess.shape_str(want.shape) then
        error(string.format("engine tensor '%s' has shape %s, the engine's layout needs %s",
                            name, given, inprocess.shape_str(want.shape)), 2)
    end
    local t = must("session", self.pool:tensor{ shape = shape, dtype = dtype, name = name })
    self.reg.engine[name] = { tensor = t, pooled = true }
    self.allocated[#self.allocated + 1] = t
    return t
end

-- fn is called for `event`: train(step), rollout(step), sleep(level),
-- wake(tag). An error it raises fails the step.
function Session:on(event, fn)
    check_open(self, "on")
    if not M.events[event] then
        error(string.format("session: unknown event '%s' (train, rollout, sleep, wake)",
                            tostring(event)), 2)
    end
    if fn ~= nil and type(fn) ~= "function" then
        error("session:on: the callback must be a function, got " .. type(fn), 2)
    end
    self.callbacks[event] = fn
end

-- Runs the policy's next step (the first builds the trainer, engine and
-- plans); returns the step's record.
function Session:step()
    check_open(self, "step")
    if self.failed then
        error("session: a step failed, so the run was freed; close the session (" ..
              tostring(self.failed) .. ")", 2)
    end
    if not self.run then
        local popts = {}
        for k, v in pairs(self.popts) do popts[k] = v end
        popts.env = self.env
        self.env.session = true
        popts.parts = {
            trainer = function(args) return inprocess.trainer(args, self) end,
            engine = function(args) return inprocess.engine(args, self) end,
            -- Server mode's engine runs the caller's rollout.
            callbacks = self.callbacks,
        }
        self.run = pipeline.start(self.p, self.cfg, popts)
    end
    local ok, rec = pcall(self.run.step, self.run)
    if not ok then
        -- The run freed itself; the session can only be closed now. Its
        -- report keeps the steps that completed, for the summary.
        self.failed = rec
        self.failed_report = self.run.report
        self.run = false
        error(rec, 0)
    end
    return rec
end

-- Finishes the run (save=, the summary), frees wshost's tensors and pool;
-- returns the summary. Closing twice is allowed.
function Session:close()
    if self.closed then return self.summary end
    self.closed = true
    local ok, err, summary = true, nil, nil
    -- save_engine=: the engine as the last step's rollout left it.
    local run = self.run
    if run and run.ctx and run.step_no > 0 and self.cfg.save_engine ~= "" then
        local okw, files = pcall(checkpoint.save_engine, run.ctx.engine, self.cfg.save_engine,
                                 run.ctx)
        if okw then
            run.ctx.log(string.format("# save_engine: wrote %s in %s", files[1],
                                      self.cfg.save_engine))
        else
            ok, err = false, files
        end
    end
    if self.run then
        local ok1, _, s = pcall(self.run.finish, self.run)
        if ok1 then summary = s elseif ok then ok, err = false, _ end
    end
    for i = #self.allocated, 1, -1 do pcall(self.allocated[i].free, self.allocated[i]) end
    -- wshost's references to the caller's memory go now, not at the next
    -- garbage collection: the caller learns through its release callbacks.
    for _, role in ipairs({ "trainer", "adapter", "engine" }) do
        for _, r in pairs(self.reg[role]) do
            if r.owned then pcall(r.tensor.free, r.tensor) end
        end
    end
    self.allocated, self.reg = {}, { trainer = {}, adapter = {}, engine = {} }
    if self.pool then
        local okp, perr = pcall(self.pool.free, self.pool)
        if not okp and ok then ok, err = false, perr end
        self.pool = nil
    end
    if not ok then error(err, 0) end
    -- After a failed step: the steps that completed, and why the next did not.
    if not summary and self.failed_report then
        local oks, s = pcall(self.failed_report.summary, self.failed_report)
        if oks then summary = s end
    end
    summary = summary or { steps = 0 }
    if self.failed then summary.failed = tostring(self.failed) end
    self.failed_report = nil
    self.summary = summary
    return self.summary
end

return M
