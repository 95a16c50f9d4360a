-- bench/sync.lua: how fast the sync plans move weights, against references
-- measured in the same run.
--
--   wshost bench/sync.lua [model=qwen3-0.6b] [iters=3] [bucket_mb=512] [checksum_mb=1024]
--                         [sleep_mb=1024] [check=true] [--json FILE]
--   mpirun -n 2 wshost bench/sync.lua
--
-- (1) full sync throughput vs a plain memcpy of the same bytes (ws.reference_copy), target >= 0.8x;
-- (2) LoRA-only sync time vs full sync time, against their byte ratio (target <= 1.5x);
-- (3) per-tensor overhead of a plan with 100k tiny tensors (target <= 2 us);
-- (4) staging memory held during execution vs the bucket size;
-- (5) checksum of a bf16 tensor (checksum_mb, capped by free memory) vs a copy of the same
--     bytes (t:copy_), target >= 0.8x of the copy's bandwidth;
-- (6) a pool's level-1 sleep + wake vs the two plain copies they amount to (out to the host
--     backup and back; t:copy_ twice over the same bytes), target >= 0.5x on the cpu; the first
--     cycle (which allocates the backup) is shown apart from the steady state;
-- (7) engine_dtype=fp8_block vs bf16: bytes into the engine and time of a base sync (target:
--     the quantized tensors <= 0.51x their bf16 bytes), and the quantization error on random
--     weights.
-- check=true makes the exit status fail when a target is missed.
local ws = require("ws")
local config = require("ws.config")
local models = require("ws.models")
local lora = require("ws.lora")
local trainer_mod = require("ws.trainer")
local engine_mod = require("ws.engine")
local sync_mod = require("ws.sync")
local verify = require("ws.verify")
local json = require("ws.json")
local must = require("ws.errors").must

local schema = {
    model = { default = "qwen3-0.6b", type = "enum", values = models.names() },
    device = { default = "auto", type = "string" },
    iters = { default = 3, type = "integer", min = 1 },
    bucket_mb = { default = ws.DEFAULT_BUCKET_BYTES // (1 << 20), type = "number", min = 0.001 },
    lora_rank = { default = 32, type = "integer", min = 1 },
    tiny_tensors = { default = 100000, type = "integer", min = 1 },
    checksum_mb = { default = 1024, type = "integer", min = 1 },
    check = { default = false, type = "boolean" },
    sleep_mb = { default = 1024, type = "number", min = 1 },
}
local ok, cfg, opts = pcall(config.parse, schema, arg)
if not ok then
    io.stderr:write("bench/sync.lua: " .. tostring(cfg) .. "\n")
    os.exit(2)
end

local comm = ws.comm()
local rank, world = comm.rank, comm.size
local gcomm = world > 1 and comm or nil
local device = cfg.device == "auto" and ws.default_device()
    or must("bench/sync.lua: device " .. cfg.device, ws.device(cfg.device))
local function out(fmt, ...) if rank == 0 then io.stdout:write(string.format(fmt, ...), "\n") end end
local results = {}
local misses = {}
local function target(name, okv, fmt, ...)
    local msg = string.format(fmt, ...)
    results[#results + 1] = { test = name, ok = okv, detail = msg }
    if not okv then misses[#misses + 1] = name .. ": " .. msg end
    out("#   %-28s %s  %s", name, okv and "ok  " or "MISS", msg)
end

-- Best (minimum) time of `iters` runs of fn, which returns a stats table or nil.
local function best(fn)
    local best_ms, stats = math.huge, nil
    for _ = 1, cfg.iters do
        if gcomm then comm:barrier() end
        local t0 = ws.now_ms()
        local s = fn()
        local ms = ws.now_ms() - t0
        if ms < best_ms then best_ms, stats = ms, s end
    end
    return best_ms, stats
end

local function gbps(bytes, ms) return bytes / (ms * 1e6) end

out("# wshost %s sync benchmark", ws.version)
out("# device %s, world %d, model %s, bucket %s MB, iters %d (best of)", tostring(device), world,
    cfg.model, tostring(cfg.bucket_mb), cfg.iters)

-- (1) and (2): one trainer/engine pair with LoRA; plans "full" and "adapter".
local spec = models.get(cfg.model)
local lcfg = lora.config{ r = cfg.lora_rank }
local trainer = trainer_mod.new{ spec = spec, lora = lcfg, device = device, rank = rank, world = world }
local engine = engine_mod.new{ spec = spec, lora = lcfg, device = device, kv_cache_mb = 1 }
local sync = sync_mod.new{ trainer = trainer, engine = engine, comm = gcomm, device = device,
                           bucket_mb = cfg.bucket_mb, progress = "off", rank = rank }
sync:build("full")
sync:build("adapter")
local full_ms, full = best(function() return sync:send("full") end)
local ad_ms, ad = best(function() return sync:send("adapter") end)

-- memcpy reference over the same number of bytes.
local ref_src = must("bench/sync.lua", ws.tensor{ shape = { full.bytes_moved }, dtype = "u8",
                                                   device = device, fill = 1 })
local ref_dst = must("bench/sync.lua", ws.tensor{ shape = { full.bytes_moved }, dtype = "u8",
                                                   device = device })
local ref_ms = best(function() ws.reference_copy(ref_dst, ref_src); device:synchronize() end)
-- On a GPU, also the pinned host-to-device copy of the same bytes: the bound
-- of a sync whose trainer weights were offloaded to host memory.
local h2d_ms
if device.kind == "cuda" then
    local pinned = must("bench/sync.lua", ws.tensor{ shape = { full.bytes_moved }, dtype = "u8",
                                                     device = "cpu", pinned = true, fill = 1 })
    h2d_ms = best(function() ws.reference_copy(ref_dst, pinned); device:synchronize() end)
    pinned:free()
end
ref_src:free(); ref_dst:free()

out("#")
out("# %-24s %12s %10s %10s %10s %10s", "what", "bytes", "time(ms)", "algbw(GB/s)", "gather(ms)", "copy(ms)")
out("  %-24s %12d %10.2f %10.2f %10.2f %10.2f", "full sync", full.bytes_moved, full_ms,
    gbps(full.bytes_moved, full_ms), full.gather_ms, full.copy_out_ms)
out("  %-24s %12d %10.2f %10.2f %10.2f %10.2f", "adapter sync (r=" .. lcfg.r .. ")", ad.bytes_moved,
    ad_ms, gbps(ad.bytes_moved, ad_ms), ad.gather_ms, ad.copy_out_ms)
out("  %-24s %12d %10.2f %10.2f %10s %10s", "memcpy reference", full.bytes_moved, ref_ms,
    gbps(full.bytes_moved, ref_ms), "-", "-")
if h2d_ms then
    out("  %-24s %12d %10.2f %10.2f %10s %10s", "pinned h2d reference", full.bytes_moved, h2d_ms,
        gbps(full.bytes_moved, h2d_ms), "-", "-")
end
local bw_ratio = ref_ms / full_ms
local time_ratio, byte_ratio = ad_ms / full_ms, ad.bytes_moved / full.bytes_moved
local rel = time_ratio / byte_ratio
out("#")
-- The issue's targets: >= 0.8x of memcpy on the cpu, >= 0.85x of the device copy on a GPU.
local bw_target = device.kind == "cuda" and 0.85 or 0.8
target("(1) full sync vs memcpy", bw_ratio >= bw_target or world > 1,
       "%.2fx of %s bandwidth (target %.2fx)%s", bw_ratio,
       device.kind == "cuda" and "device-to-device copy" or "memcpy", bw_target,
       world > 1 and " (world > 1: includes the gather; not held to the target)" or "")
if h2d_ms then
    out("#   %-28s      %.1fx the pinned host-to-device bandwidth", "(1b) full sync vs h2d",
        h2d_ms / full_ms)
end
target("(2) LoRA vs full", rel <= 1.5, "time ratio %.4f, byte ratio %.4f -> %.2fx", time_ratio,
       byte_ratio, rel)
sync:free(); engine:free(); trainer:free()

-- (3) 100k tiny tensors: views of two big tensors, 16 elements each.
local n, per = cfg.tiny_tensors, 16
local shard = (per + world - 1) // world
local big_src = must("bench/sync.lua", ws.tensor{ shape = { n * shard }, dtype = "bf16",
                                                   device = device, fill = 0.5 })
local big_dst = must("bench/sync.lua", ws.tensor{ shape = { n * per }, dtype = "bf16",
                                                   device = device })
local srcs, dsts, numels = {}, {}, {}
for i = 1, n do
    srcs[i] = big_src:narrow(1, (i - 1) * shard + 1, shard)
    dsts[i] = big_dst:narrow(1, (i - 1) * per + 1, per)
    numels[i] = per
end
local t0 = ws.now_ms()
local plan = must("bench/sync.lua", ws.plan{ bucket_mb = cfg.bucket_mb, comm = gcomm,
                                             device = device, name = "tiny" })
plan:add(srcs, dsts, numels)
local add_ms = ws.now_ms() - t0
local tiny_ms, tiny = best(function() return plan:execute() end)
local us = tiny_ms * 1000 / n
out("#")
out("  %-24s %12d %10.2f %10.2f   plan:add %.1f ms", n .. " tiny tensors", tiny.bytes_moved,
    tiny_ms, gbps(tiny.bytes_moved, tiny_ms), add_ms)
target("(3) per-tensor overhead", us <= 2, "%.3f us per tensor", us)
plan:free()
for i = 1, n do srcs[i]:free(); dsts[i]:free() end
srcs, dsts = nil, nil
big_src:free(); big_dst:free()

-- (4) staging memory vs bucket size, on the full model without LoRA.
local tr2 = trainer_mod.new{ spec = spec, device = device, rank = rank, world = world }
local en2 = engine_mod.new{ spec = spec, device = device, kv_cache_mb = 1 }
out("#")
out("# %-10s %14s %14s %10s %10s %8s", "bucket(MB)", "staging(B)", "peak-held(B)", "time(ms)", "algbw", "buckets")
local staging = {}
for _, mb in ipairs({ 1, 4, 16, 64, 256 }) do
    local s2 = sync_mod.new{ trainer = tr2, engine = en2, comm = gcomm, device = device, bucket_mb = mb,
                             progress = "off", rank = rank }
    s2:build("base")
    collectgarbage()
    local held = device:memory().held
    device:reset_peak()
    local ms, st = best(function() return s2:send("base") end)
    local peak = device:memory().peak - held
    out("  %-10s %14d %14d %10.2f %10.2f %8d", tostring(mb), st.staging_bytes, peak, ms,
        gbps(st.bytes_moved, ms), st.buckets)
    staging[#staging + 1] = { bucket_mb = mb, staging_bytes = st.staging_bytes, peak_extra_bytes = peak,
                              ms = ms, buckets = st.buckets }
    local bound = 2 * (mb * 1048576 + mb * 1048576 // world)
    if st.staging_bytes > bound then
        misses[#misses + 1] = string.format("(4) staging %d > bound %d at bucket %d MB",
                                            st.staging_bytes, bound, mb)
    end
    s2:free()
end
out("#   staging bound: 2 x (bucket + bucket/world)%s", #misses > 0 and "" or " held")

-- (7) engine_dtype=fp8_block vs bf16: the base sync of the model without
-- LoRA into each engine, in the same run. fp8's time includes waking the
-- staging pool, the batched quantization and the staging's level-2 sleep;
-- verification's record (seal) is timed on its own.
local en8 = engine_mod.new{ spec = spec, device = device, kv_cache_mb = 1,
                            engine_dtype = "fp8_block" }
local s16 = sync_mod.new{ trainer = tr2, engine = en2, comm = gcomm, device = device,
                          bucket_mb = cfg.bucket_mb, progress = "off", rank = rank }
local s8 = sync_mod.new{ trainer = tr2, engine = en8, comm = gcomm, device = device,
                         bucket_mb = cfg.bucket_mb, progress = "off", rank = rank }
local ms16, st16 = best(function() return s16:send("base") end)
local ms8, st8 = best(function() return s8:send("base", { seal = false }) end)
local sealed = s8:send("base")
local t_ver = ws.now_ms()
verify.check(s8.pairs.base, { comm = gcomm, world = world, trainer = tr2, engine = en8,
                              note = "bench" })
local check_ms = ws.now_ms() - t_ver
out("#")
-- copy(ms): the plan's writes (for fp8_block into the staging, mapped
-- afresh at each sync, so on the cpu mostly first-touch page faults).
out("# %-22s %12s %12s %10s %10s %10s %12s", "base sync", "sent(B)", "engine(B)", "time(ms)",
    "copy(ms)", "quant(ms)", "weights(MB)")
out("  %-22s %12d %12d %10.2f %10.2f %10s %12.1f", "bf16", st16.bytes_moved, st16.engine_bytes,
    ms16, st16.copy_out_ms, "-", en2.weight_bytes / 1e6)
out("  %-22s %12d %12d %10.2f %10.2f %10.2f %12.1f", "fp8_block", st8.bytes_moved,
    st8.engine_bytes, ms8, st8.copy_out_ms, st8.quant_ms, en8.weight_bytes / 1e6)
-- The quantized tensors alone go to half (plus 4 bytes per 128x128 block);
-- what stays bf16 (embeddings, lm_head, norms) keeps the whole ratio above
-- that, the more so the smaller the model.
local lin16, lin8 = 0, 0
for _, q in ipairs(en8.quantized) do
    lin16 = lin16 + 2 * en8.tensors[q.name]:numel()
    lin8 = lin8 + en8.tensors[q.name]:nbytes() + en8.tensors[q.scale]:nbytes()
end
local fp8_bytes = st8.engine_bytes / st16.engine_bytes
target("(7) fp8_block vs bf16", lin8 / lin16 <= 0.51,
       "linear weights %.4fx their bf16 bytes (target <= 0.51x); all weights %.3fx; " ..
       "%.2fx the time; seal %.0f ms, rollout check %.0f ms", lin8 / lin16, fp8_bytes, ms8 / ms16,
       sealed.seal_ms, check_ms)
s8:free(); s16:free(); en8:free()
en2:free(); tr2:free()

-- (7b) quantization error on random weights (uniform in [-0.05, 0.05), a
-- weight's typical range); 16/448 is the bound (half the step of e4m3's top
-- binade, relative to 448).
local qshape = { 1024, 4096 }
local w = must("bench/sync.lua", ws.tensor{ shape = qshape, dtype = "f32", device = "cpu" })
w:random_(1234, 0.05)
local wq = must("bench/sync.lua", ws.tensor{ shape = qshape, dtype = "fp8", device = "cpu" })
local ws_ = must("bench/sync.lua", ws.tensor{ shape = ws.fp8_block_scale_shape(qshape),
                                             dtype = "f32", device = "cpu" })
must("bench/sync.lua", ws.quantize_fp8_block({ w }, { wq }, { ws_ }))
local qerr = ws.fp8_block_error(w, wq, ws_)
out("#   %-28s max |dequantized - x| / amax(block) = %.4f on %dx%d uniform random f32 " ..
    "(bound 16/448 = %.4f)", "(7b) fp8 block error", qerr, qshape[1], qshape[2], 16 / 448)
w:free(); wq:free(); ws_:free()

-- (5) verification vs a copy of the same bytes: the checksum reads once and
-- writes nothing, so it should keep up with a copy (on a GPU, the
-- device-to-device copy). Half the free memory at most for the two tensors.
local ck_bytes = math.min(cfg.checksum_mb * 1048576, device:memory().free // 4) // 2 * 2
local ck_src = must("bench/sync.lua", ws.tensor{ shape = { ck_bytes // 2 }, dtype = "bf16",
                                                  device = device })
local ck_dst = must("bench/sync.lua", ws.tensor{ shape = { ck_bytes // 2 }, dtype = "bf16",
                                                  device = device })
ck_src:random_(5)
local ck_copy_ms = best(function() ck_dst:copy_(ck_src); device:synchronize() end)
local ck_sum
local ck_ms = best(function() ck_sum = ck_src:checksum() end)
assert(ck_sum == ck_dst:checksum(), "bench/sync.lua: the copy's checksum differs from its source's")
ck_src:free(); ck_dst:free()
local ck_ratio = ck_copy_ms / ck_ms
out("#")
out("# %-24s %12s %10s %10s", "what", "bytes", "time(ms)", "algbw(GB/s)")
out("  %-24s %12d %10.2f %10.2f", "checksum bf16", ck_bytes, ck_ms, gbps(ck_bytes, ck_ms))
out("  %-24s %12d %10.2f %10.2f", "copy_ bf16", ck_bytes, ck_copy_ms, gbps(ck_bytes, ck_copy_ms))
target("(5) checksum vs copy", ck_ratio >= 0.8, "%.2fx of the copy's bandwidth (target 0.80x)",
       ck_ratio)

-- (6) level-1 sleep + wake of a pool holding sleep_mb of bf16, against two copy_ of the same
-- bytes into and out of a plain tensor (the reference is warm: both sides already resident).
local sw_bytes = math.floor(cfg.sleep_mb * 1048576) // 512 * 512
local sw_pool = must("bench/sync.lua", ws.pool{ device = device, tag = "bench", bytes = sw_bytes })
local sw_t = sw_pool:tensor{ shape = { sw_bytes // 2 }, dtype = "bf16", name = "bench.weights" }
sw_t:random_(7)
local sw_sum = sw_t:checksum()
local sw_ref = must("bench/sync.lua", ws.tensor{ shape = { sw_bytes // 2 }, dtype = "bf16",
                                                  device = device, fill = 0 })
local copies_ms = best(function() sw_ref:copy_(sw_t); sw_t:copy_(sw_ref); device:synchronize() end)
local function sleep_wake()
    local t0 = ws.now_ms()
    must("bench/sync.lua: sleep", sw_pool:sleep(1, "bench"))
    local t1 = ws.now_ms()
    must("bench/sync.lua: wake", sw_pool:wake())
    device:synchronize()
    local t2 = ws.now_ms()
    return { sleep_ms = t1 - t0, wake_ms = t2 - t1 }
end
local first = sleep_wake()
local first_ms = first.sleep_ms + first.wake_ms
local sw_ms, sw = best(sleep_wake)
local sw_ok = sw_t:checksum() == sw_sum
local sw_ratio, first_ratio = copies_ms / sw_ms, copies_ms / first_ms
out("#")
out("# %-24s %12s %10s %10s %10s %10s", "what", "bytes", "time(ms)", "algbw(GB/s)", "sleep(ms)", "wake(ms)")
out("  %-24s %12d %10.2f %10.2f %10s %10s", "2 x copy_ reference", sw_bytes, copies_ms,
    gbps(2 * sw_bytes, copies_ms), "-", "-")
out("  %-24s %12d %10.2f %10.2f %10.2f %10.2f", "sleep(1)+wake, first", sw_bytes, first_ms,
    gbps(2 * sw_bytes, first_ms), first.sleep_ms, first.wake_ms)
out("  %-24s %12d %10.2f %10.2f %10.2f %10.2f", "sleep(1)+wake, steady", sw_bytes, sw_ms,
    gbps(2 * sw_bytes, sw_ms), sw.sleep_ms, sw.wake_ms)
out("#   the backup buffer (%d bytes of host memory) stays allocated between level-1 sleeps",
    sw_pool:stats().backup_cached)
-- On a GPU the backup crosses the host link, which two device copies do not: shown, not held.
target("(6) sleep+wake vs 2 copies", (sw_ratio >= 0.5 or device.kind ~= "cpu") and sw_ok,
       "%.2fx of two copies (target 0.50x%s), first cycle %.2fx%s", sw_ratio,
       device.kind ~= "cpu" and ", cpu pools only" or "", first_ratio,
       sw_ok and "" or "; CONTENTS CHANGED by the round trip")
sw_ref:free(); sw_t:free(); sw_pool:free()

if opts.json and rank == 0 then
    local f = assert(io.open(opts.json, "w"))
    f:write(json.encode{ bench = "sync", version = ws.version, device = tostring(device), world = world,
                         model = cfg.model, bucket_mb = cfg.bucket_mb,
                         full = { bytes = full.bytes_moved, ms = full_ms, gbps = gbps(full.bytes_moved, full_ms) },
                         adapter = { bytes = ad.bytes_moved, ms = ad_ms },
                         memcpy = { bytes = full.bytes_moved, ms = ref_ms },
                         h2d_pinned = h2d_ms and { bytes = full.bytes_moved, ms = h2d_ms } or nil,
                         ratio_vs_memcpy = bw_ratio, lora_time_over_byte_ratio = rel,
                         tiny = { tensors = n, ms = tiny_ms, us_per_tensor = us, add_ms = add_ms },
                         staging = staging,
                         checksum = { bytes = ck_bytes, ms = ck_ms, copy_ms = ck_copy_ms,
                                      ratio_vs_copy = ck_ratio },
                         sleep_wake = { bytes = sw_bytes, copies_ms = copies_ms, ms = sw_ms,
                                        sleep_ms = sw.sleep_ms, wake_ms = sw.wake_ms,
                                        first_ms = first_ms, first_sleep_ms = first.sleep_ms,
                                        first_wake_ms = first.wake_ms, ratio = sw_ratio,
                                        first_ratio = first_ratio, contents_kept = sw_ok },
                         fp8_block = { bf16_bytes = st16.engine_bytes, fp8_bytes = st8.engine_bytes,
                                       bf16_ms = ms16, fp8_ms = ms8, quant_ms = st8.quant_ms,
                                       seal_ms = sealed.seal_ms, check_ms = check_ms,
                                       max_rel_block_error = qerr },
                         targets = results }, "\n")
    f:close()
end
if cfg.check and #misses > 0 then
    out("# missed: %s", table.concat(misses, "; "))
    os.exit(1)
end
