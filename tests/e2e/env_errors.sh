#!/usr/bin/env bash
# env_errors.sh: a failure of the environment raised through ws.errors (here a
# 100 TiB tensor: out of memory) prints one line, `argv[0]: message`, with no
# traceback and exits 1, in wshost, its REPL and stock lua5.4 with ws.so; a
# misuse keeps its traceback.
set -euo pipefail
: "${WS_BUILD_DIR:?set WS_BUILD_DIR to the build directory}"
. "$(dirname "$0")/fixtures/e2e_lib.sh"

one_line() {
    if [[ "$2" != *$'\n'* && -n "$2" ]]; then pass "$1"; else fail "$1: [$2]"; fi
}

# A library module that cannot go on without its tensor.
mkdir -p "$tmp/lib"
cat > "$tmp/lib/needs_memory.lua" <<'LUA'
local ws = require "ws"
local errors = require "ws.errors"
local M = {}
function M.buffer(elements)
    return errors.check(ws.tensor{ shape = { elements }, device = "cpu", name = "huge" })
end
return M
LUA
cat > "$tmp/huge.lua" <<'LUA'
local lib = require "needs_memory"
local function setup() return lib.buffer(25 * 1024 * 1024 * 1024 * 1024) end -- f32: 100 TiB
setup()
print("not reached")
LUA

set +e
out=$(WSHOST_PATH="$tmp/lib" "$WSHOST" "$tmp/huge.lua" 2>&1); rc=$?
set -e
check_rc "out of memory exits 1" 1 "$rc"
check "the line names the program, the tensor and the cause" \
    "$WSHOST: ws.tensor: creating tensor 'huge' f32[27487790694400]: cpu: out of memory" "$out"
one_line "exactly one line" "$out"
[[ "$out" != *traceback* ]] && pass "no traceback" || fail "traceback printed: $out"
[[ "$out" != *"not reached"* ]] && pass "the script stopped" || fail "the script went on"

# The same in the REPL: the message alone, and the session goes on.
out=$(printf 'require("needs_memory").buffer(25 * 2^40 // 1)\nprint("still here")\n' |
    WSHOST_PATH="$tmp/lib" "$WSHOST" -i 2>&1)
check "REPL: one line, no program name" "> ws.tensor: creating tensor 'huge'" "$out"
[[ "$out" != *traceback* ]] && pass "REPL: no traceback" || fail "REPL: traceback printed: $out"
check "REPL: the session goes on" "still here" "$out"

# A caller that catches it gets the code and the message.
out=$(WSHOST_PATH="$tmp/lib" "$WSHOST" -e '
    local errors = require "ws.errors"
    local ok, e = pcall(require("needs_memory").buffer, 25 * 2^40 // 1)
    print(ok, errors.is(e, "nomem"), e.code, "caught: " .. e)')
check "a caller can catch it and read the code" "false	true	nomem	caught: ws.tensor: creating tensor 'huge'" "$out"

# Stock lua5.4 with ws.so prints the same single line (not with a sanitizer
# build's ws.so, which an uninstrumented lua5.4 cannot load).
if command -v lua5.4 >/dev/null && [[ -f "$WS_BUILD_DIR/ws.so" ]] &&
    ! grep -q '^WS_SANITIZE:[A-Z]*=.' "$WS_BUILD_DIR/CMakeCache.txt" 2>/dev/null; then
    set +e
    out=$(LUA_PATH="$tmp/lib/?.lua;;" lua5.4 -e "package.cpath='$WS_BUILD_DIR/?.so;'..package.cpath" \
        "$tmp/huge.lua" 2>&1); rc=$?
    set -e
    check_rc "lua5.4 + ws.so: exits 1" 1 "$rc"
    check "lua5.4 + ws.so: one line" "lua5.4: ws.tensor: creating tensor 'huge'" "$out"
    one_line "lua5.4 + ws.so: exactly one line" "$out"
fi

# A misuse is a bug to locate: it keeps the traceback.
printf 'local function f() return ws.tensor{shape = {2}, dtype = "nope"} end\nf()\n' > "$tmp/misuse.lua"
set +e
out=$("$WSHOST" "$tmp/misuse.lua" 2>&1); rc=$?
set -e
check_rc "misuse exits 1" 1 "$rc"
check "misuse names file and line" "$WSHOST: $tmp/misuse.lua:1:" "$out"
check "misuse keeps the traceback" "stack traceback:" "$out"

finish
