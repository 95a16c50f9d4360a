# shellcheck shell=bash
# tests/e2e/torch/server_lib.sh: shared by the server-mode e2e tests (sourced
# after torch_lib.sh, from the repository root). Skips (77) when the wshost
# being tested has no trainer side of server mode (Session(engine_address=...)).

probe=$("$PY" -c 'import wshost
try:
    wshost.Session("pipelines/verl_lora.lua", model="tiny",
                   engine_address="wshost-e2e-probe-'$$'").close()
except wshost.Error as e:
    print(e)' 2>&1)
if grep -Eq "unknown config key 'engine_address'" <<<"$probe"; then
    echo "skip: this wshost's Session has no server mode: $probe"
    exit 77
fi

n_server=0
# server NAME WANT_RC LAUNCHER... -- ARGS...: runs examples/torch/server.py with
# an address of its own, checks its exit status; the output (the engine's
# too) is left in $tmp/NAME.log.
server() {
    local name=$1 want=$2 launcher=()
    shift 2
    while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
    shift
    n_server=$((n_server + 1))
    local rc=0
    "${launcher[@]}" "$PY" examples/torch/server.py --address "wshost-e2e-$$-$n_server" "$@" \
        >"$tmp/$name.log" 2>&1 || rc=$?
    if [ "$rc" = "$want" ]; then pass "$name (exit $rc)"; return 0; fi
    fail "$name: expected exit $want, got $rc"
    cat "$tmp/$name.log"
    return 1
}

# listening NAME: whether a socket is bound to abstract NAME.
listening() { grep -q "@$1\$" /proc/net/unix; }

# shm_entries: /dev/shm files wshost or torch could have made.
shm_entries() { ls /dev/shm 2>/dev/null | grep -E 'wshost|torch' | sort; }

# run_server_matrix LAUNCHER...: free_cache_engine x sleep_level with LoRA, and
# LoRA off (every parameter trains, the base goes every step) at both levels.
run_server_matrix() {
    local free level name
    for free in 0 1; do
        for level in 1 2; do
            name="server,fce=$free,level=$level"
            server "$name" 0 "$@" -- --steps 4 --free-cache-engine "$free" --sleep-level "$level" \
                --lora-rank 4 && every_step_equal "$name" 4
        done
    done
    for level in 1 2; do
        name="server,lora=0,level=$level"
        server "$name" 0 "$@" -- --steps 3 --sleep-level "$level" --lora-rank 0 --tied 1 &&
            every_step_equal "$name" 3
    done
}

# run_server_buggy LAUNCHER...: verl #3149 (the base skipped after a level-2
# sleep): the trainer's step 2 fails before its rollout, naming the tensor.
run_server_buggy() {
    local log name="server,buggy,verify=all"
    if server "$name" 1 "$@" -- --steps 3 --policy buggy --sleep-level 2 --verify all; then
        log=$(cat "$tmp/$name.log")
        check "buggy: step 1 matched" "max|diff| 0 " "$log"
        check "buggy: step 2 failed" "step 2 failed" "$log"
        check "buggy: says the contents were discarded" "discarded" "$log"
        check "buggy: names the tensor" "tensor '" "$log"
        if grep -q '^step 2 ' <<<"$log"; then fail "buggy: step 2 reached its rollout"; fi
    fi
    name="server,buggy,level=1"
    server "$name" 0 "$@" -- --steps 3 --policy buggy --sleep-level 1 && every_step_equal "$name" 3
}
