#!/usr/bin/env bash
# errors.sh: error output (`wshost: file:line: message` + traceback, exit 1),
# non-string error objects, and Ctrl-C (exit 130, "interrupted", memory freed).
set -euo pipefail
. "$(dirname "$0")/fixtures/e2e_lib.sh"

cat > "$tmp/boom.lua" <<'LUA'
local function inner() error("boom happened") end
local function outer() inner() end
outer()
LUA
set +e
out=$("$WSHOST" "$tmp/boom.lua" 2>&1 >/dev/null); rc=$?
set -e
check_rc "runtime error exits 1" 1 "$rc"
check "message has wshost: file:line:" "wshost: $tmp/boom.lua:1: boom happened" "$out"
check "message has a traceback" "stack traceback:" "$out"
check "traceback names the caller" "in local 'outer'" "$out"

cat > "$tmp/misuse.lua" <<'LUA'
local a = ws.tensor{shape = {2, 3}, name = "a", device = "cpu"}
local b = ws.tensor{shape = {3, 2}, name = "b", device = "cpu"}
a:copy_(b)
LUA
set +e
out=$("$WSHOST" "$tmp/misuse.lua" 2>&1); rc=$?
set -e
check_rc "binding misuse exits 1" 1 "$rc"
check "binding misuse names line and tensors" \
    "wshost: $tmp/misuse.lua:3: bad argument #1 to 'copy_' (shape mismatch: dst 'a' is f32[2,3], src 'b' f32[3,2])" "$out"

printf 'local x = = 1\n' > "$tmp/syntax.lua"
set +e
out=$("$WSHOST" "$tmp/syntax.lua" 2>&1); rc=$?
set -e
check_rc "syntax error exits 1" 1 "$rc"
check "syntax error is reported with file:line" "wshost: $tmp/syntax.lua:1:" "$out"

set +e
out=$("$WSHOST" -e 'error(setmetatable({}, {__tostring = function() return "custom object" end}))' 2>&1); rc=$?
set -e
check_rc "error object exits 1" 1 "$rc"
check "error object uses __tostring" "wshost: custom object" "$out"
set +e
out=$("$WSHOST" -e 'error({})' 2>&1); rc=$?
set -e
check "plain table error is described" "(error object is a table value)" "$out"

set +e
out=$("$WSHOST" "$tmp/missing.lua" 2>&1); rc=$?
set -e
check_rc "missing script exits 1" 1 "$rc"
check "missing script is named" "cannot open $tmp/missing.lua" "$out"

# Ctrl-C: a busy loop holding a tensor; SIGINT must end it with 130.
cat > "$tmp/busy.lua" <<'LUA'
local t = ws.tensor{shape = {1024, 1024}, device = "cpu", name = "held"}
io.stdout:write("ready\n"); io.stdout:flush()
local x = 0
while true do x = x + 1 end
LUA
"$WSHOST" "$tmp/busy.lua" > "$tmp/busy.out" 2> "$tmp/busy.err" &
pid=$!
for _ in $(seq 100); do grep -q ready "$tmp/busy.out" 2>/dev/null && break; sleep 0.05; done
kill -INT "$pid"
set +e
wait "$pid"; rc=$?
set -e
check_rc "SIGINT exits 130" 130 "$rc"
check "SIGINT says interrupted" "interrupted!" "$(cat "$tmp/busy.err")"

cat > "$tmp/catch.lua" <<'LUA'
io.stdout:write("ready\n"); io.stdout:flush()
local ok, err = pcall(function() while true do end end)
print("caught", ws.interrupted(), err)
LUA
"$WSHOST" "$tmp/catch.lua" > "$tmp/catch.out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q ready "$tmp/catch.out" 2>/dev/null && break; sleep 0.05; done
kill -INT "$pid"
set +e
wait "$pid"; rc=$?
set -e
check_rc "a script that handles Ctrl-C exits normally" 0 "$rc"
check "ws.interrupted() reports it" "caught	true" "$(cat "$tmp/catch.out")"

finish
