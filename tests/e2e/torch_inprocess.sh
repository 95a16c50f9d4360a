#!/bin/bash
# examples/torch/inprocess.py on one rank: the engine's logits equal the
# trainer's after every sync for free_cache_engine x sleep_level x memory
# (engine-owned memory with callbacks, or wshost's pool), and the verl #3149
# bug both ways (verify=all stops it; verify=off lets wrong logits through).
# Skipped (77) without torch or the wshost Python module.
cd "$(dirname "$0")" && while [ ! -f pipelines/verl_lora.lua ] && [ "$PWD" != / ]; do cd ..; done
. tests/e2e/torch/torch_lib.sh
run_matrix
run_buggy
finish
