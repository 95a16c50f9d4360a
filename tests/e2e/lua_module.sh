#!/usr/bin/env bash
# lua_module.sh: ws.so under stock lua5.4, the module search path
# (WSHOST_PATH first, lua/ beside the binary) and edits taking effect
# without a rebuild. Also that busted can use wshost as its interpreter.
set -euo pipefail
: "${WS_BUILD_DIR:?set WS_BUILD_DIR to the build directory}"
. "$(dirname "$0")/fixtures/e2e_lib.sh"

if command -v lua5.4 >/dev/null && [[ -f "$WS_BUILD_DIR/ws.so" ]]; then
    out=$(lua5.4 -e "package.cpath='$WS_BUILD_DIR/?.so;'..package.cpath
        local ws = require 'ws'
        local t = ws.tensor{shape={4,2}, dtype='bf16', device='cpu', name='from.lua54'}
        t:fill(1.5)
        print(tostring(t), t:get(8), ws.version)
        print(package.path)" 2>&1)
    check "lua5.4 loads ws.so and makes a tensor" "ws.Tensor(bf16[4,2] cpu 'from.lua54')	1.5" "$out"
    check "ws.so adds build/lua to package.path" "$WS_BUILD_DIR/lua/?.lua" "$out"
else
    fail "lua5.4 or $WS_BUILD_DIR/ws.so missing"
fi

# WSHOST_PATH comes first, ahead of the lua/ beside the binary.
mkdir -p "$tmp/a/ws" "$tmp/b/pkg_e2e"
printf 'return "override"\n' > "$tmp/a/ws/probe_e2e.lua"
printf 'return { who = "init" }\n' > "$tmp/b/pkg_e2e/init.lua"
out=$(WSHOST_PATH="$tmp/a:$tmp/b" "$WSHOST" -e 'print(require "ws.probe_e2e", require("pkg_e2e").who)' 2>&1)
check "WSHOST_PATH dirs are searched (D/?.lua, D/?/init.lua)" "override	init" "$out"
out=$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(package.path)')
first=${out%%;*}
check "WSHOST_PATH is first on package.path" "$tmp/a/?.lua" "$first"
check "lua/ beside the binary follows" "$(dirname "$WSHOST")/lua/?.lua" "$out"
check "-E ignores WSHOST_PATH" "false" \
    "$(WSHOST_PATH="$tmp/a" "$WSHOST" -E -e 'print(package.path:find("'"$tmp"'", 1, true) ~= nil)')"

# Editing a module changes behaviour without a rebuild.
printf 'return { value = 1 }\n' > "$tmp/a/editme.lua"
check "module before the edit" "1" "$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(require("editme").value)')"
printf 'return { value = 2 }\n' > "$tmp/a/editme.lua"
check "module after the edit" "2" "$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(require("editme").value)')"

# The build tree links lua/ to the source tree, so library edits are live too.
if [[ -d "$WS_BUILD_DIR/lua/ws" ]]; then
    check "lua/ws is found through the build tree" "$WS_BUILD_DIR/lua/" \
        "$("$WSHOST" -e 'print(package.searchpath("ws.config", package.path) or "none")')"
fi

# busted runs with wshost as its interpreter (it needs lfs from the system cpath).
if command -v busted >/dev/null; then
    cat > "$tmp/mini_spec.lua" <<'LUA'
describe("under wshost", function()
  it("sees ws", function()
    local ws = require "ws"
    assert.are.equal("cpu", ws.tensor{shape = {1}, device = "cpu"}:device().name)
    assert.is_function(ws.interrupted)
  end)
end)
LUA
    set +e
    out=$(busted --lua="$WSHOST" "$tmp/mini_spec.lua" 2>&1); rc=$?
    set -e
    check "busted --lua=wshost passes a spec" "1 success / 0 failures" "$out"
    [[ $rc == 0 ]] || fail "busted exit $rc"
fi

finish
