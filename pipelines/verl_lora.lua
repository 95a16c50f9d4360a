-- pipelines/verl_lora.lua: verl's colocated LoRA loop with PR #5147's rule.
--
--   wshost pipelines/verl_lora.lua steps=20 sleep_level=2 lora_rank=32 --json out.jsonl
--
-- This file is the policy: edit it, rerun, no rebuild. The runner
-- (lua/ws/pipeline.lua) builds the trainer, the engine and the sync plans
-- once; step() below decides, every step, what is woken, sent and slept.
local pipeline = require("ws.pipeline")

-- PR #5147: the base weights are needed unless the engine still holds them.
local function need_base(state, cfg)
    return not state.base_sync_done or (cfg.free_cache_engine and cfg.sleep_level == 2)
end

return pipeline.main_or(pipeline.define{
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
    need_base = need_base,
    step = function(ctx, step)
        local cfg, trainer, engine = ctx.cfg, ctx.trainer, ctx.engine
        ctx:phase("train", trainer.train_step, trainer, step)                  -- 1
        if cfg.param_offload then
            ctx:phase("offload", trainer.offload, trainer, "step " .. step)
        end
        ctx:phase("load", trainer.load, trainer)                               -- 2
        if engine:is_asleep("weights") then                                    -- 3
            ctx:phase("wake", engine.wake_up, engine, { "weights" })
        end
        -- Without LoRA every parameter trains, so the base changes every step.
        if not ctx.lora or ctx.pipeline.need_base(ctx.state, cfg) then        -- 4
            ctx:send("base")
        end
        ctx.state.base_sync_done = true
        if ctx.lora then ctx:send("adapter") end                               -- 5
        ctx:phase("wake", engine.wake_up, engine, { "kv_cache" })              -- 6
        ctx:rollout(step)                                                      -- 7
        if cfg.free_cache_engine then                                          -- 8
            ctx:phase("sleep", engine.sleep, engine, cfg.sleep_level, "step " .. step)
        end
    end,
})
