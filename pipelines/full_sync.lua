-- pipelines/full_sync.lua: full-parameter training, every weight synced every step.
--
--   wshost pipelines/full_sync.lua steps=10 model=qwen3-0.6b sleep_level=2 --json out.jsonl
--
-- The policy: edit it, rerun, no rebuild (runner: lua/ws/pipeline.lua).
local pipeline = require("ws.pipeline")

return pipeline.main_or(pipeline.define{
    name = "full_sync",
    description = "full-parameter training with a full weight sync every step",
    plans = { "full" },
    step = function(ctx, step)
        local cfg, trainer, engine = ctx.cfg, ctx.trainer, ctx.engine
        ctx:phase("train", trainer.train_step, trainer, step)
        if cfg.param_offload then
            ctx:phase("offload", trainer.offload, trainer, "step " .. step)
        end
        ctx:phase("load", trainer.load, trainer)
        if engine:is_asleep("weights") then
            ctx:phase("wake", engine.wake_up, engine, { "weights" })
        end
        ctx:send("full")
        ctx:phase("wake", engine.wake_up, engine, { "kv_cache" })
        ctx:rollout(step)
        if cfg.free_cache_engine then
            ctx:phase("sleep", engine.sleep, engine, cfg.sleep_level, "step " .. step)
        end
    end,
})
