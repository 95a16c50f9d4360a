-- pipelines/verl_lora.lua: verl's colocated LoRA loop with PR #5147's rule.
--
--   wshost pipelines/verl_lora.lua steps=20 sleep_level=2 lora_rank=32 --json out.jsonl
--
-- This file is the policy: edit it, rerun, no rebuild. It runs unchanged with
-- wshost's simulated trainer and engine and with the caller's PyTorch tensors
-- (in-process, the Python module). The runner (lua/ws/pipeline.lua) builds
-- the trainer, the engine and the sync plans once; step() below decides,
-- every step, what is woken, sent and slept.
local pipeline = require("ws.pipeline")

local P = pipeline.define{
    name = "verl_lora",
    description = "verl colocated LoRA loop (PR #5147: send the base only when the engine lost it)",
    defaults = {
        -- The rank's upper bound depends on the model: ws.lora.check_rank.
        lora_rank = { default = 32, type = "integer", min = 0,
                      help = "LoRA rank (0: LoRA off; at most the smallest targeted layer side)" },
        lora_alpha = { default = 16, type = "number", above = 0, help = "LoRA alpha" },
        target_modules = { default = "all-linear", type = "string",
                           help = "all-linear or a list: q_proj,v_proj" },
    },
    plans = { "base", "adapter" },
}

-- PR #5147: the base weights are needed unless the engine still holds them:
-- never sent yet, or discarded by a level-2 sleep after the last rollout.
-- A variant overrides this method (tests/e2e/fixtures/skip_base.lua).
function P:need_base(ctx)
    local cfg = ctx.cfg
    return not ctx.state.base_sync_done or (cfg.free_cache_engine and cfg.sleep_level == 2)
end

function P:step(ctx)
    ctx:train()                                                  -- 1
    if ctx.cfg.param_offload then ctx:offload() end
    ctx:load()                                                   -- 2
    ctx:wake("weights")                                          -- 3
    -- Without LoRA every parameter trains, so the base changes every step.
    if not ctx.lora or self:need_base(ctx) then                  -- 4
        ctx:send("base")
    end
    if ctx.lora then ctx:send("adapter") end                     -- 5
    ctx:wake("kv_cache")                                         -- 6
    ctx:rollout()                                                -- 7
    if ctx.cfg.free_cache_engine then ctx:sleep() end            -- 8
end

return P
