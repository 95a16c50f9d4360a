#!/usr/bin/env bash
# lua_module.sh: ws.so under stock lua5.4, ws's own module searcher
# (WSHOST_PATH first, then lua/ beside the binary, package.path left alone)
# and edits taking effect without a rebuild. Also that busted can use wshost
# as its interpreter.
set -euo pipefail
: "${WS_BUILD_DIR:?set WS_BUILD_DIR to the build directory}"
. "$(dirname "$0")/fixtures/e2e_lib.sh"

if command -v lua5.4 >/dev/null && [[ -f "$WS_BUILD_DIR/ws.so" ]]; then
    plain_path=$(lua5.4 -e 'print(package.path)')
    out=$(lua5.4 -e "package.cpath='$WS_BUILD_DIR/?.so;'..package.cpath
        local ws = require 'ws'
        local t = ws.tensor{shape={4,2}, dtype='bf16', device='cpu', name='from.lua54'}
        t:fill(1.5)
        print(tostring(t), t:get(8), ws.version)
        print(select(2, require 'ws.json'))
        package.loaded.ws = nil
        require 'ws' -- opened again: still one searcher
        local n = 0
        for _, s in ipairs(package.searchers) do if s == package.searchers[2] then n = n + 1 end end
        print('searchers', #package.searchers, n)
        print(package.path)" 2>&1)
    check "lua5.4 loads ws.so and makes a tensor" "ws.Tensor(bf16[4,2] cpu 'from.lua54')	1.5" "$out"
    check "ws.so finds build/lua/ws" "$WS_BUILD_DIR/lua/ws/json.lua" "$out"
    check "ws.so opened twice installs one searcher" "searchers	5	1" "$out"
    check "ws.so leaves package.path alone" "$plain_path" "$(tail -1 <<<"$out")"
    [[ "$(tail -1 <<<"$out")" == "$plain_path" ]] || fail "package.path changed: $(tail -1 <<<"$out")"
else
    fail "lua5.4 or $WS_BUILD_DIR/ws.so missing"
fi

# WSHOST_PATH comes first, ahead of the lua/ beside the binary.
mkdir -p "$tmp/a/ws" "$tmp/b/pkg_e2e"
printf 'return "override"\n' > "$tmp/a/ws/probe_e2e.lua"
printf 'return { who = "init" }\n' > "$tmp/b/pkg_e2e/init.lua"
out=$(WSHOST_PATH="$tmp/a:$tmp/b" "$WSHOST" -e 'print(require "ws.probe_e2e", require("pkg_e2e").who)' 2>&1)
check "WSHOST_PATH dirs are searched (D/?.lua, D/?/init.lua)" "override	init" "$out"
mkdir -p "$tmp/a/ws" "$tmp/c"
printf 'return "shadowed json"\n' > "$tmp/a/ws/json.lua"
check "WSHOST_PATH comes before lua/ beside the binary" "shadowed json" \
    "$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(require "ws.json")')"
printf 'return "user json"\n' > "$tmp/c/json.lua"
mkdir -p "$tmp/c/ws"
printf 'return "user ws.config"\n' > "$tmp/c/ws/config.lua"
out=$(LUA_PATH="$tmp/c/?.lua" "$WSHOST" -e 'print(require "json", type(require "ws.config"))')
check "LUA_PATH serves other modules; ws.* come from the library" "user json	table" "$out"
check "-E ignores WSHOST_PATH" "table" \
    "$(WSHOST_PATH="$tmp/a" "$WSHOST" -E -e 'print(type(require "ws.json"))')"
check "WSHOST_PATH leaves package.path alone" "$("$WSHOST" -e 'print(package.path)')" \
    "$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(package.path)')"
# lua/ beside the binary serves ws.* only: a lua/ dir next to a copy of the
# binary must not shadow the user's own modules.
mkdir -p "$tmp/bin/lua"
cp "$WSHOST" "$tmp/bin/wshost"
printf 'return "beside the binary"\n' > "$tmp/bin/lua/mine.lua"
printf 'return "mine from LUA_PATH"\n' > "$tmp/c/mine.lua"
check "lua/ beside the binary serves only ws.*" "mine from LUA_PATH" \
    "$(LUA_PATH="$tmp/c/?.lua" "$tmp/bin/wshost" -e 'print(require "mine")')"

# Editing a module changes behaviour without a rebuild.
printf 'return { value = 1 }\n' > "$tmp/a/editme.lua"
check "module before the edit" "1" "$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(require("editme").value)')"
printf 'return { value = 2 }\n' > "$tmp/a/editme.lua"
check "module after the edit" "2" "$(WSHOST_PATH="$tmp/a" "$WSHOST" -e 'print(require("editme").value)')"

# The build tree links lua/ to the source tree, so library edits are live too.
if [[ -d "$WS_BUILD_DIR/lua/ws" ]]; then
    check "lua/ws is found through the build tree" "$WS_BUILD_DIR/lua/ws/config.lua" \
        "$("$WSHOST" -e 'print(select(2, require "ws.config"))')"
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
