#!/usr/bin/env bash
# cli.sh: wshost's command line behaves like lua(1): -e, -l, -v, -i, -, --,
# the arg table, --help, --device validation, LUA_INIT and -E.
set -euo pipefail
. "$(dirname "$0")/fixtures/e2e_lib.sh"

check "-e runs a statement" "hello 3" "$("$WSHOST" -e 'print("hello", 1 + 2)' | tr '\t' ' ')"
check "ws is preloaded" "table" "$("$WSHOST" -e 'print(type(ws), type(require("ws").tensor))')"
check "-e several times, in order" "ab" "$("$WSHOST" -e 'io.write("a")' -e 'io.write("b")')"

mkdir -p "$tmp/mods"
printf 'return { answer = 42 }\n' > "$tmp/mods/mymod.lua"
check "-l mod" "42" "$(LUA_PATH="$tmp/mods/?.lua" "$WSHOST" -l mymod -e 'print(mymod.answer)')"
check "-l g=mod" "42" "$(LUA_PATH="$tmp/mods/?.lua" "$WSHOST" -l m=mymod -e 'print(m.answer)')"

out=$("$WSHOST" -v)
check "-v prints the version" "wshost " "$out"
check "-v prints the device and why" "device: " "$out"

cat > "$tmp/args.lua" <<'LUA'
print("n=" .. select("#", ...), "arg0=" .. arg[0], "arg1=" .. tostring(arg[1]),
      "arg2=" .. tostring(arg[2]), "argm1=" .. tostring(arg[-1]), "vararg=" .. tostring((...)))
LUA
out=$("$WSHOST" -e 'x=1' "$tmp/args.lua" a b | tr '\t' ' ')
check "arg table: script and args" "n=2 arg0=$tmp/args.lua arg1=a arg2=b argm1=x=1 vararg=a" "$out"
out=$("$WSHOST" -- "$tmp/args.lua" -e | tr '\t' ' ')
check "-- stops option handling" "n=1 arg0=$tmp/args.lua arg1=-e" "$out"

check "- runs stdin" "from stdin" "$(echo 'print("from stdin")' | "$WSHOST" -)"
check "stdin without a tty runs it" "piped 7" "$(echo 'print("piped", 7)' | "$WSHOST" | tr '\t' ' ')"

out=$(printf 'x = 6 * 7\nx\nfor i = 1, 2 do\nprint("loop", i)\nend\n' | "$WSHOST" -i 2>&1 | tr '\t' ' ')
check "-i evaluates expressions" "42" "$out"
check "-i reads multi-line statements" "loop 2" "$out"
check "-i prints the version" "wshost " "$out"

out=$("$WSHOST" --help)
for word in "-e stat" "-l mod" "-i" "-v" "-E" "--device" "--help" "WSHOST_DEVICE" "WSHOST_PATH" \
            "WSHOST_THREADS" "LUA_INIT"; do
    check "--help mentions $word" "$word" "$out"
done

set +e
out=$("$WSHOST" --device bogus -e 'print("ran")' 2>&1); rc=$?
set -e
check_rc "--device bogus fails" 1 "$rc"
check "--device bogus says why" "wshost: --device bogus: unknown device" "$out"
[[ "$out" != *ran* ]] || fail "--device bogus still ran the script"

cuda_ok=$("$WSHOST" -e 'print(ws.device("cuda") and "yes" or "no")')
set +e
out=$("$WSHOST" --device cuda -e 'print(ws.default_device().name)' 2>&1); rc=$?
set -e
if [[ "$cuda_ok" == no ]]; then
    check_rc "--device cuda without a GPU fails" 1 "$rc"
    check "--device cuda says no usable GPU" "wshost: --device cuda: no usable GPU (" "$out"
else
    check_rc "--device cuda with a GPU works" 0 "$rc"
    check "--device cuda selects cuda:0" "cuda:0" "$out"
fi
check "--device cpu selects the cpu" "cpu --device cpu" \
    "$("$WSHOST" --device cpu -e 'print(ws.default_device())' -e 'print(ws.default_device().name, select(2, ws.default_device()))' | tail -1 | tr '\t' ' ')"
check "--device=cpu form" "cpu" "$("$WSHOST" --device=cpu -e 'print(ws.default_device().name)')"
set +e
out=$(WSHOST_DEVICE=nonsense "$WSHOST" -e 'print(1)' 2>&1); rc=$?
set -e
check_rc "WSHOST_DEVICE=nonsense fails" 1 "$rc"
check "WSHOST_DEVICE is named" "WSHOST_DEVICE" "$out"
check "-E ignores WSHOST_DEVICE" "ok" "$(WSHOST_DEVICE=nonsense "$WSHOST" -E -e 'print("ok")')"

check "LUA_INIT runs first" "init ran" "$(LUA_INIT='init_flag = "init ran"' "$WSHOST" -e 'print(init_flag)')"
printf 'init_flag = "from file"\n' > "$tmp/init.lua"
check "LUA_INIT=@file" "from file" "$(LUA_INIT="@$tmp/init.lua" "$WSHOST" -e 'print(init_flag)')"
check "-E ignores LUA_INIT" "nil" "$(LUA_INIT='init_flag = 1' "$WSHOST" -E -e 'print(init_flag)')"

set +e
out=$("$WSHOST" -x 2>&1); rc=$?
set -e
check_rc "unknown option fails" 1 "$rc"
check "unknown option is named" "unrecognized option '-x'" "$out"

finish
