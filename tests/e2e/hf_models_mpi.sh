#!/usr/bin/env bash
# hf_models_mpi.sh: the main job on tiny Hugging Face directories under
# `mpirun -n 2`: each rank reads only its own FSDP rows of the checkpoint,
# every step verifies, and save= gathers whole tensors back into a checkpoint
# equal to the source bit for bit (checked by tests/fixtures/st_check.py).
# Apart from hf_models.sh so the sanitizer build runs it with the Open MPI
# leak suppressions. Skipped (77) without MPI or python3 + torch.
set -euo pipefail
PYTHON=${PYTHON:-/usr/bin/python3}
[ "${WS_HAVE_MPI:-OFF}" = ON ] && command -v mpirun > /dev/null \
    || { echo "hf_models_mpi: no MPI"; exit 77; }
"$PYTHON" -c 'import torch' 2>/dev/null \
    || { echo "hf_models_mpi: $PYTHON cannot import torch"; exit 77; }
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. "$(dirname "$0")/fixtures/e2e_lib.sh"
fx=tests/fixtures
st() { "$PYTHON" $fx/st_check.py "$@"; }

"$PYTHON" - "$tmp" <<'EOF'
import sys
sys.path.insert(0, "tests/fixtures")
import hf_tiny
t = sys.argv[1]
for argv in (f"{t}/qwen3 --family qwen3 --shards 3 --seed 3",
             f"{t}/qwen2 --family qwen2 --tied --seed 4",
             f"{t}/moe --family qwen3_moe --shards 2 --mlp-only-layers 1 --seed 8"):
    hf_tiny.main(argv.split())
EOF

for m in qwen3 qwen2 moe; do
    set +e
    out=$(mpirun --allow-run-as-root --oversubscribe -n 2 "$WSHOST" pipelines/verl_lora.lua \
          progress=off model="$tmp/$m" steps=2 lora_rank=4 save="$tmp/mpi_$m" \
          save_shard_mb=0.05 2>&1)
    rc=$?
    set -e
    check_rc "$m: mpirun -n 2" 0 "$rc"
    check "$m: mpirun -n 2 verified every step" "verified 2 of 2" "$out"
    check "$m: mpirun -n 2 save= gives the source back" "same:" \
        "$(st compare "$tmp/$m" "$tmp/mpi_$m" 2>&1)"
done
finish
