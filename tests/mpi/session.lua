-- tests/mpi/session.lua: an in-process session over several ranks (CTest
-- runs it under mpirun -n 2 and -n 4). Each rank registers only its FSDP2
-- dim-0 shard of every trainer tensor (ceil(rows / world) rows, the last
-- ranks' shards without padding or empty), each holds a whole engine; the
-- values are a formula of the global index, so the full tensors are known
-- on every rank. After each step the engine must equal the full tensors,
-- checked here element by element on a few tensors besides the runner's
-- checksums. Fails by raising an error.
local ws = require("ws")
local session = require("ws.session")
local inprocess = require("ws.inprocess")

local comm = ws.comm()
local W, rank = comm.size, comm.rank

local S = session.open("pipelines/verl_lora.lua",
                       { model = "tiny", steps = 3, lora_rank = 4, lora_alpha = 8,
                         sleep_level = 2, progress = "off" }, { quiet = true })

local function cols_of(shape)
    local n = 1
    for i = 2, #shape do n = n * shape[i] end
    return n
end

-- This rank's rows of tensor i (seeded by i, global indices).
local function shard(role, i, e, seed)
    local per, first, mine = inprocess.row_shard(e.shape, rank, W)
    local cols = cols_of(e.shape)
    local local_shape = { mine }
    for d = 2, #e.shape do local_shape[d] = e.shape[d] end
    local t = ws.tensor{ shape = local_shape, dtype = "f32", name = role .. " shard " .. e.name }
    if mine > 0 then t:random_(seed + i, 0.02, first * cols) end
    return t, per
end

local mine, engine = {}, {}
for _, role in ipairs({ "trainer", "adapter" }) do
    for i, e in ipairs(S:expected(role)) do
        local t = shard(role, i, e, role == "trainer" and 100 or 5000)
        S:add(role, e.name, t, e.shape)
        mine[#mine + 1] = { t = t, i = i, e = e }
    end
end
for _, e in ipairs(S:expected("engine")) do
    local t = ws.tensor{ shape = e.shape, dtype = "bf16", name = "engine " .. e.name }
    t:fill(0)
    S:add("engine", e.name, t)
    engine[e.name] = t
end
S:on("train", function(step)
    for _, m in ipairs(mine) do
        if m.e.name:find("lora_", 1, true) and m.t:numel() > 0 then
            local _, first = inprocess.row_shard(m.e.shape, rank, W)
            m.t:random_(7000 * step + m.i, 0.01, first * cols_of(m.e.shape))
        end
    end
end)

-- The norm is not fused: the engine's copy equals the formula directly.
local norm = "model.norm.weight"
local want_norm
for i, e in ipairs(S:expected("trainer")) do
    if e.name == norm then
        want_norm = ws.tensor{ shape = e.shape, dtype = "f32" }:random_(100 + i, 0.02, 0)
    end
end
local rollouts = 0
S:on("rollout", function(step)
    rollouts = rollouts + 1
    local got, want = engine[norm], want_norm:to("cpu", "bf16")
    for k = 1, got:numel() do
        if got:get(k) ~= want:get(k) then
            error(string.format("rank %d step %d: %s element %d is %s, expected %s", rank, step,
                                norm, k, got:get(k), want:get(k)), 0)
        end
    end
end)
for step = 1, 3 do
    local rec = S:step()
    assert(rec.verified and rec.base_sent, "step " .. step .. " not verified")
end
local summary = S:close()
assert(summary.verified_steps == 3 and rollouts == 3, "3 verified steps expected")

-- A rank whose shard has the wrong number of rows is named.
local S2 = session.open("pipelines/verl_lora.lua", { model = "tiny", lora_rank = 0,
                                                    progress = "off" }, { quiet = true })
local e = S2:expected("trainer")[1]
local wrong = ws.tensor{ shape = e.shape, dtype = "bf16" }
local ok, err = pcall(S2.add, S2, "trainer", e.name, wrong, e.shape)
assert(not ok and tostring(err):find(string.format("rank %d of %d holds rows", rank, W), 1, true),
       tostring(err))
-- The right number of elements in the wrong shape (columns instead of
-- rows) is refused too: a shard is this rank's rows.
local q
for _, x in ipairs(S2:expected("trainer")) do
    if x.name == "model.layers.0.self_attn.q_proj.weight" then q = x end
end
local per = inprocess.row_shard(q.shape, rank, W)
local cols = ws.tensor{ shape = { q.shape[2], per }, dtype = "bf16" }
ok, err = pcall(S2.add, S2, "trainer", q.name, cols, q.shape)
assert(not ok and tostring(err):find("holds rows", 1, true) and
       tostring(err):find("but the tensor given has shape", 1, true), tostring(err))
S2:close()
