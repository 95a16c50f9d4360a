-- ws.sync: the sync plans from the trainer's shards to the engine's weights.
--
-- Plans are built once (one ws.plan per kind, one entry per parameter) and
-- executed every step with a single call, so no per-tensor work runs in Lua
-- during a step. Kinds:
--   base    every base parameter -> engine base weights (fused slices for
--           qkv_proj / gate_up_proj, `.base_layer.weight` under LoRA);
--   adapter every LoRA parameter -> the engine's adapter slot;
--   full    both in one plan (full-parameter sync).
-- Each entry is also kept as a (trainer entry, engine view) pair so
-- ws.verify can prove what the plan wrote.
--
-- Server mode (engine.remote, ws.remote): a plan packs its buckets into
-- the engine process's shared-memory slots; each send is one sync there
-- (MANIFEST of the plan's engine tensors, the buckets, FINISH with the
-- proofs ws.verify computes from the trainer's tensors unless verify=off).
--
-- With engine_dtype=fp8_block, a plan writes the quantized tensors' bf16
-- values into the engine's staging pool; send() then wakes that pool
-- first, quantizes everything the plan staged in one call, records what
-- verification needs while the staging still holds the values (ws.verify
-- seal) and puts the staging pool back to a level-2 sleep.
local ws = require("ws")
local must = require("ws.errors").must
local verify = require("ws.verify")

local M = {}
local Sync = {}
Sync.__index = Sync

-- opts: trainer, engine, comm (nil: world of one), device, bucket_mb (nil:
-- ws.DEFAULT_BUCKET_BYTES), progress ("auto"/"on"/"off"), log (function(msg)
-- for rank-0 output), relay (disaggregated, ws.placement.relay_of: role
-- "sender" on trainer ranks, which gather over their own comm (opts.comm)
-- and, rank 0, broadcast over relay.comm; "receiver" on engine ranks),
-- exchange ("auto": point-to-point messages straight from each shard into
-- the engine tensors (and only what each tensor-parallel block needs) where
-- the comm can (cpu over MPI), else as "staged"; "staged": through
-- staging buffers, with tensor-parallel blocks an all_to_all of what each
-- rank's blocks need when that moves fewer bytes; "all_gather": whole
-- tensors to every rank; a relay: "auto" sends each trainer rank's shard
-- straight into the engine ranks' tensors where it can, the others keep
-- the gather and the broadcast), verify (the key:
-- server mode proves each sync at its finish unless "off").
function M.new(opts)
    local self = setmetatable({}, Sync)
    self.verify = opts.verify or "all"
    self.trainer, self.engine, self.comm = opts.trainer, opts.engine, opts.comm
    self.relay = opts.relay
    self.device, self.bucket_mb = opts.device, opts.bucket_mb
    self.exchange = opts.exchange or "auto"
    self.progress = opts.progress or "auto"
    self.rank = opts.rank or 0
    self.plans, self.pairs, self.views, self.flats = {}, {}, {}, {}
    -- What ws.verify.seal records at each quantizing sync, shared by the
    -- plans (base and full stage the same tensors).
    self.sealed = { staged = {}, quant = {} }
    self.engine_bytes = {}
    return self
end

-- Engine view (contiguous, flat) that receives one trainer parameter: the
-- whole engine tensor, or its slice of a fused one (qkv_proj rows, an
-- expert of w13_weight).
function Sync:view_for(e)
    local t, d = self.engine:destination(e.name)
    -- One flat view per engine tensor, shared by its slices (the 384 experts
    -- of a layer land in two tensors).
    local v = self.flats[d.name]
    if not v then
        v = t:flat()
        self.flats[d.name] = v
        self.views[#self.views + 1] = v
    end
    if d.offset > 0 or d.numel < v:numel() then
        -- An empty one (an expert on another rank, a vocabulary shard past
        -- the end) still takes part in the gather.
        v = v:narrow(1, d.offset + 1, d.numel)
        self.views[#self.views + 1] = v
    end
    return v, d.label
end

local function entries_of(self, kind)
    local tr = self.trainer
    if kind == "base" then return tr.base_params end
    if kind == "adapter" then
        if #tr.adapter_params == 0 then
            error("sync: no adapter plan without LoRA (set lora_rank > 0)", 3)
        end
        return tr.adapter_params
    end
    if kind == "full" then return tr.params end
    error("sync: unknown plan kind '" .. tostring(kind) .. "' (base, adapter, full)", 3)
end

-- A trainer rank's plan of one kind, disaggregated: its shards, gathered
-- over the trainer ranks and relayed (rank 0) to the engine ranks as bf16.
local function build_sender(self, kind)
    local srcs, numels, shards, wire, plist = {}, {}, {}, {}, {}
    for i, e in ipairs(entries_of(self, kind)) do
        srcs[i], numels[i], shards[i], wire[i] = e.tensor, e.numel, e.shard_numel, "bf16"
        plist[i] = { src = e }
    end
    local r = self.relay
    plist.relay = r
    local plan = must("sync", ws.plan{ bucket_mb = self.bucket_mb, comm = self.comm,
                                       device = self.device, name = kind, role = "sender",
                                       relay = r.comm, gather_world = r.n,
                                       peers = r.peers, exchange = self.exchange })
    plan:add(srcs, nil, numels, shards, nil, wire)
    self.engine_bytes[kind] = 0
    self.plans[kind], self.pairs[kind] = plan, plist
    return plan
end

-- Server mode: what a sync of these pairs tells the engine process: the
-- manifest (the engine tensors they land in, in order) and the proofs (one
-- range per parameter: its slice of a fused tensor).
-- The engine destination of a trainer parameter, or an error naming it.
local function dest_of(engine, name)
    local d = engine.dest[name]
    if not d then error("sync: the engine's layout has no destination for parameter '" .. name .. "'", 3) end
    return d
end

local function remote_of(engine, plist)
    local manifest, index, proofs = {}, {}, {}
    for i, p in ipairs(plist) do
        local e = p.src
        local d = dest_of(engine, e.name)
        if not index[d.name] then
            manifest[#manifest + 1] = engine:manifest_entry(d.name)
            index[d.name] = #manifest
        end
        proofs[i] = { tensor = d.name, label = e.name, offset = d.offset, count = e.numel }
    end
    return { manifest = manifest, proofs = ws.proofs(proofs), engine = engine, index = index }
end

-- Server mode: the plan of one kind packs into the engine process's slots;
-- its manifest is the engine tensors its entries land in, in entry order,
-- and its proofs one range per parameter (its slice of a fused tensor).
local function build_remote(self, kind)
    local engine = self.engine
    local srcs, numels, shards, wire, plist = {}, {}, {}, {}, {}
    local bytes = 0
    for i, e in ipairs(entries_of(self, kind)) do
        local d = dest_of(engine, e.name)
        srcs[i], numels[i], shards[i], wire[i] = e.tensor, e.numel, e.shard_numel, "bf16"
        plist[i] = { src = e, dst_name = d.label, dst_tensor = d.name, dst_offset = d.offset }
        bytes = bytes + 2 * e.numel
    end
    plist.remote = remote_of(engine, plist)
    local tensors, offsets = {}, {}
    for i, e in ipairs(entries_of(self, kind)) do
        local d = engine.dest[e.name]
        tensors[i], offsets[i] = plist.remote.index[d.name] - 1, d.offset
    end
    local plan = must("sync", ws.plan{ bucket_mb = self.bucket_mb, comm = self.comm,
                                       device = self.device, name = kind, role = "remote",
                                       sender = engine.sender })
    plan:add(srcs, nil, numels, shards, nil, wire)
    plan:targets(tensors, offsets)
    self.engine_bytes[kind] = bytes
    self.plans[kind], self.pairs[kind] = plan, plist
    return plan
end

-- Server mode's send: one sync in the engine process. The proofs' checksums
-- (the trainer's, reused while it has not changed) are verification's time
-- (seal_ms); waiting for the engine's last copies and its verdict is
-- copy_out's.
local function send_remote(self, kind, plan, plist)
    local t0 = ws.now_ms()
    verify.remote_begin(plist)
    self.engine:begin(plist.remote.manifest, self.verify == "off")
    local stats = plan:execute(self:progress_fn(kind))
    local sums, seal_ms = nil, 0
    if self.verify ~= "off" then
        local t1 = ws.now_ms()
        sums = verify.remote_sums(plist, { comm = self.comm, trainer = self.trainer,
                                           world = self.comm and self.comm.size or 1 })
        seal_ms = ws.now_ms() - t1
    end
    local t2 = ws.now_ms()
    if sums then
        self.engine.sender:finish(plist.remote.proofs, sums)
    else
        self.engine.sender:finish()
    end
    if sums then verify.remote_proven(plist, self.engine) end
    stats.copy_out_ms = stats.copy_out_ms + ws.now_ms() - t2
    stats.quant_ms, stats.seal_ms = 0, seal_ms
    stats.wall_ms = ws.now_ms() - t0 - seal_ms
    stats.engine_bytes = self.engine_bytes[kind]
    -- Through the slots, what the plan handed over is what landed.
    if not self.engine.direct then stats.bytes_moved = stats.bytes_relayed end
    return stats
end

-- Builds the plan of one kind (once); returns it.
function Sync:build(kind)
    if self.plans[kind] then return self.plans[kind] end
    if self.relay and self.relay.role == "sender" then return build_sender(self, kind) end
    if self.engine.remote and not self.engine.direct then return build_remote(self, kind) end
    local srcs, dsts, numels, shards, blocks, plist = {}, {}, {}, {}, {}, {}
    local engine, touched, engine_bytes, padded_set = self.engine, {}, 0, {}
    for i, e in ipairs(entries_of(self, kind)) do
        local v, label = self:view_for(e)
        local d = engine.dest[e.name]
        local dname = d.name
        local staged = engine:is_staged(dname)
        srcs[i], dsts[i], numels[i], shards[i] = e.tensor, v, e.numel, e.shard_numel
        -- A tensor-parallel shard: only its block of the gathered tensor.
        blocks[i] = d.block or false
        plist[i] = { src = e, dst = v, dst_name = label, staged = staged, block = d.block,
                     group = d.group, replicas = d.replicas }
        -- What lands in the engine's weights: one byte per quantized element.
        engine_bytes = engine_bytes + (staged and e.numel or v:nbytes())
        touched[dname] = staged or nil
        if engine.padding and engine.padding[dname] then padded_set[dname] = true end
    end
    local quant = {}
    for _, q in ipairs(engine.quantized) do
        if touched[q.name] then
            quant[#quant + 1] = q
            engine_bytes = engine_bytes + engine.tensors[q.scale]:nbytes()
        end
    end
    if #quant > 0 then plist.quant, plist.sealed = quant, self.sealed end
    -- Vocabulary shards with padding rows, zeroed after each execution.
    local padded = {}
    for dname in pairs(padded_set) do padded[#padded + 1] = dname end
    if #padded > 0 then plist.padded = padded end
    self.engine_bytes[kind] = engine_bytes
    local plan
    if self.relay then
        -- An engine rank: every bucket comes from the trainer ranks
        -- (straight into its tensors where the comm can) or by the relay's
        -- broadcast.
        plist.relay = self.relay
        plan = must("sync", ws.plan{ bucket_mb = self.bucket_mb, device = self.device,
                                     name = kind, role = "receiver", relay = self.relay.comm,
                                     gather_world = self.relay.n,
                                     peers = self.relay.peers, exchange = self.exchange })
        plan:add(nil, dsts, numels, shards, blocks)
    else
        plan = must("sync", ws.plan{ bucket_mb = self.bucket_mb, comm = self.comm,
                                     device = self.device, name = kind,
                                     exchange = self.exchange })
        plan:add(srcs, dsts, numels, shards, blocks)
    end
    if engine.remote then
        -- Server mode with shared weights: the plan above writes them in
        -- place; each send is still a sync the engine process proves.
        plist.remote = remote_of(engine, plist)
        for i, p in ipairs(plist) do
            local d = engine.dest[p.src.name]
            p.dst_tensor, p.dst_offset = d.name, d.offset
        end
    end
    self.plans[kind], self.pairs[kind] = plan, plist
    return plan
end

-- A carriage-return progress line on stderr, shown only once a sync has run
-- for more than a second and only where a person is watching.
local function watching()
    if ws.isatty then return ws.isatty(2) end
    local term = os.getenv("TERM")
    return term ~= nil and term ~= "" and term ~= "dumb"
end

function Sync:progress_fn(kind)
    if self.rank ~= 0 or self.progress == "off" then return nil end
    if self.progress == "auto" and not watching() then return nil end
    local start, shown = ws.now_ms(), false
    return function(bucket, buckets, done, total)
        if not shown and ws.now_ms() - start < 1000 then return end
        shown = true
        io.stderr:write(string.format("\rsync %-7s bucket %d/%d  %.1f/%.1f MB", kind, bucket,
                                      buckets, done / 1e6, total / 1e6))
        if bucket == buckets then io.stderr:write("\n") end
        io.stderr:flush()
    end
end

-- Executes the plan of `kind`; returns its stats plus wall_ms (measured
-- here), engine_bytes (written into the engine's weights: fp8 and scales for
-- quantized tensors) and, when it quantizes, quant_ms (staging wake,
-- quantization and staging sleep, inside wall_ms) and seal_ms (verification's
-- record, outside wall_ms). `opts.seal = false` skips the record (benchmarks).
function Sync:send(kind, opts)
    local plan = self:build(kind)
    local plist = self.pairs[kind]
    if plist.remote then return send_remote(self, kind, plan, plist) end
    local t0 = ws.now_ms()
    if plist.quant then self.engine:stage_begin() end
    local t1 = ws.now_ms()
    local stats = plan:execute(self:progress_fn(kind))
    if plist.padded then self.engine:zero_padding(plist.padded) end
    stats.quant_ms, stats.seal_ms = 0, 0
    if plist.quant then
        local t2 = ws.now_ms()
        self.engine:quantize_staged(plist.quant)
        stats.quant_ms = t1 - t0 + ws.now_ms() - t2
        if not (opts and opts.seal == false) then
            local t3 = ws.now_ms()
            verify.seal(plist, { engine = self.engine, note = "sync " .. kind })
            stats.seal_ms = ws.now_ms() - t3
        end
        local t4 = ws.now_ms()
        self.engine:stage_end("sync " .. kind)
        stats.quant_ms = stats.quant_ms + ws.now_ms() - t4
    end
    stats.wall_ms = ws.now_ms() - t0 - stats.seal_ms
    stats.engine_bytes = self.engine_bytes[kind]
    -- A trainer rank writes no engine weights: what it sent is what it relayed.
    if self.relay and self.relay.role == "sender" then stats.bytes_moved = stats.bytes_relayed end
    return stats
end

-- Frees all it can before raising the first error it met.
function Sync:free()
    local first
    local function release(obj)
        local ok, err = pcall(obj.free, obj)
        if not ok and first == nil then first = err end
    end
    for _, plan in pairs(self.plans) do release(plan) end
    for _, plist in pairs(self.pairs) do
        local ok, err = pcall(verify.release, plist)
        if not ok and first == nil then first = err end
    end
    for _, v in ipairs(self.views) do release(v) end
    self.plans, self.pairs, self.views, self.flats = {}, {}, {}, {}
    self.sealed = { staged = {}, quant = {} }
    if first ~= nil then error(first, 0) end
end

return M
