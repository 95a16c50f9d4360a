-- pipelines/full_sync.lua: full-parameter training, every weight synced every step.
--
--   wshost pipelines/full_sync.lua steps=10 model=qwen3-0.6b sleep_level=2 --json out.jsonl
--
-- The policy: edit it, rerun, no rebuild (runner: lua/ws/pipeline.lua).
local pipeline = require("ws.pipeline")

local P = pipeline.define{
    name = "full_sync",
    description = "full-parameter training with a full weight sync every step",
    plans = { "full" },
}

function P:step(ctx)
    ctx:train()
    if ctx.cfg.param_offload then ctx:offload() end
    ctx:load()
    ctx:wake("weights")
    ctx:send("full")
    ctx:wake("kv_cache")
    ctx:rollout()
    if ctx.cfg.free_cache_engine then ctx:sleep() end
end

return P
