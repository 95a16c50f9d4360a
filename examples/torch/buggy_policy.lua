-- examples/torch/buggy_policy.lua: pipelines/verl_lora.lua with the bug behind
-- verl #3149, for inprocess.py --policy buggy.
--
-- The base is sent once and never again, even after a level-2 sleep discarded
-- the engine's copy. With verify=all (or sent) wshost stops before the rollout
-- naming the discarded engine tensor; with verify=off the rollout runs on
-- discarded weights and the engine's logits come out wrong.
local here = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./"
local verl_lora = dofile(here .. "../../pipelines/verl_lora.lua")

local P = verl_lora:with{ name = "verl_lora_buggy" }

function P:need_base(ctx) return not ctx.state.base_sync_done end

return P
