#!/usr/bin/env bash
# fuzz.sh BUILD_DIR [SECONDS]: runs the libFuzzer targets of a WS_FUZZ build
# (make fuzz) for SECONDS each (default 30), starting from tests/fuzz/corpus.
# The corpus is copied to a scratch directory, so the inputs the fuzzer finds
# never dirty the tree. Any crash, leak, sanitizer report or broken parser
# contract fails the run; its reproducer is kept in BUILD_DIR/fuzz-artifacts/
# and replays with `BUILD_DIR/tests/fuzz/TARGET FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: scripts/fuzz.sh BUILD_DIR [SECONDS]}
seconds=${2:-30}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts=$build/fuzz-artifacts
mkdir -p "$artifacts"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
failed=0
for pair in fuzz_safetensors:safetensors fuzz_safetensors_index:index; do
    target=${pair%%:*}
    corpus=${pair#*:}
    bin=$build/tests/fuzz/$target
    [[ -x $bin ]] || { echo "fuzz: $bin is missing; build it with make fuzz" >&2; exit 1; }
    cp -r "tests/fuzz/corpus/$corpus" "$work/$corpus"
    echo "fuzz: $target for ${seconds}s from tests/fuzz/corpus/$corpus"
    if "$bin" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
            -dict=tests/fuzz/safetensors.dict -artifact_prefix="$artifacts/$target-" \
            -print_final_stats=1 "$work/$corpus" > "$work/$target.log" 2>&1; then
        grep -E '^(Done [0-9]+ runs|stat::peak_rss_mb)' "$work/$target.log" | sed 's/^/fuzz:   /'
        echo "fuzz:   corpus grew from $(find "tests/fuzz/corpus/$corpus" -type f | wc -l)" \
             "to $(find "$work/$corpus" -type f | wc -l) inputs; no crash, leak or report"
    else
        tail -n 80 "$work/$target.log"
        echo "fuzz: $target FAILED; the input is under $artifacts/ (replay: $bin FILE)" >&2
        failed=1
    fi
done
exit $failed
