#!/usr/bin/env bash
# lua_compat.sh: wshost next to the real lua5.4, case by case: package.path and
# package.cpath from LUA_PATH / LUA_PATH_5_4 / LUA_CPATH (";;" is the default
# path), the REPL (values of expressions, multi-line statements, _PROMPT and
# _PROMPT2 including tables with __tostring), argv[0] in error messages, and
# -v ending with Lua's own line. Skips (77) without lua5.4.
set -euo pipefail
. "$(dirname "$0")/fixtures/e2e_lib.sh"

if ! command -v lua5.4 >/dev/null; then
    echo "lua5.4 not installed: nothing to compare with"
    exit 77
fi
# Debian's lua5.4 reads lines with readline, which echoes each input line after
# its prompt even when stdin is a file; lua.c without readline (and wshost)
# does not. unecho.lua removes those echoes, in order: each input line is
# dropped at its first occurrence (followed by a newline) after the previous
# one. The inputs below are chosen so that no output line ends with a later
# input line.
cat > "$tmp/unecho.lua" <<'LUA'
local input, output = io.open(arg[1]):read("a"), io.read("a")
local pos = 1
for line in input:gmatch("([^\n]*)\n") do
    local at = output:find(line .. "\n", pos, true)
    if at then
        output = output:sub(1, at - 1) .. output:sub(at + #line + 1)
        pos = at
    end
end
io.write(output)
LUA
export TERM=dumb # no terminal set-up sequences from readline

# same NAME ENV... -- ARGS: runs both with env(1)'s arguments ENV and then ARGS;
# both must succeed with equal output (stdout and stderr together).
same() {
    local name=$1; shift
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    local want got rc_want=0 rc_got=0
    want=$(env "${envs[@]}" lua5.4 "$@" 2>&1) || rc_want=$?
    got=$(env "${envs[@]}" "$WSHOST" "$@" 2>&1) || rc_got=$?
    if [[ $rc_want != 0 || $rc_got != 0 ]]; then
        fail "$name: exit $rc_want from lua5.4 [$want], $rc_got from wshost [$got]"
    elif [[ "$want" == "$got" ]]; then
        pass "$name"
    else
        fail "$name: lua5.4 gave [$want], wshost [$got]"
    fi
}

# ---- package.path and package.cpath -------------------------------------------------
paths='print(package.path) print(package.cpath)'
same "LUA_PATH=x" LUA_INIT= LUA_PATH=x -- -e "$paths"
for p in ";" ";;" "a;;b" ";;b" "a;;" "a;b;;c"; do
    same "LUA_PATH='$p' (;; is the default path)" LUA_INIT= "LUA_PATH=$p" -- -e "$paths"
done
same "LUA_PATH_5_4 wins over LUA_PATH" LUA_INIT= LUA_PATH_5_4=y LUA_PATH=x -- -e "$paths"
same "LUA_CPATH=xuxu" LUA_INIT= LUA_CPATH=xuxu -- -e "$paths"
same "LUA_CPATH='a;;b'" LUA_INIT= "LUA_CPATH=a;;b" -- -e "$paths"
same "LUA_CPATH_5_4 wins over LUA_CPATH" LUA_INIT= LUA_CPATH_5_4=yacc LUA_CPATH=x -- -e "$paths"
same "-E ignores LUA_PATH and LUA_CPATH" LUA_INIT= LUA_PATH=xxx LUA_CPATH=xxx -- -E -e "$paths"
same "no LUA_PATH at all" -u LUA_PATH -u LUA_PATH_5_4 -u LUA_CPATH -u LUA_CPATH_5_4 -- -e "$paths"
same "WSHOST_PATH leaves package.path alone" WSHOST_PATH="$tmp" -- -e "$paths"

# The ws library is found whatever the path says.
out=$(LUA_PATH="$tmp/?.lua" LUA_PATH_5_4= "$WSHOST" -e 'print(select(2, require "ws.json"))' 2>&1)
check "ws.json is found with a LUA_PATH that lacks it" "/lua/ws/json.lua" "$out"

# ---- the REPL -------------------------------------------------------------------------
# repl NAME INPUT [ARGS...]: feeds INPUT to `-i` on a pipe and compares.
repl() {
    local name=$1 input=$2; shift 2
    printf '%s' "$input" > "$tmp/in.txt"
    local want got
    want=$(lua5.4 "$@" -i < "$tmp/in.txt" 2>&1 | lua5.4 "$tmp/unecho.lua" "$tmp/in.txt") || true
    # wshost's banner has its own lines first; Lua's line and the REPL follow.
    got=$("$WSHOST" "$@" -i < "$tmp/in.txt" 2>&1 | sed '1,2d') || true
    if [[ "$want" == "$got" ]]; then pass "$name"; else fail "$name: lua5.4 gave [$want], wshost [$got]"; fi
}
repl "-i prints the value of 1+1" $'1+1\n'
repl "-i prints several values and nil" $'1, nil, "three"\n'
repl "-i runs statements and keeps globals" $'x = 6 * 7\nx\n'
repl "-i reads multi-line statements" $'for i = 1, 2 do\nprint("loop", i)\nend\n'
repl "-i multi-line with _PROMPT2" $'_PROMPT2 = "..more "\nt = {\n10,\n20 }\nprint(#t)\n'
repl "-i =expr is return expr" $'=2^10\n'
repl "-i reports errors without the program name" $'error("oops")\nprint("after")\n'
repl "-i with _PROMPT set by -e" $'a = 2\n' -e "_PROMPT='alo '"
repl "-i with _PROMPT a table with __tostring" \
    $'_PROMPT = setmetatable({}, {__tostring = function() return "T> " end})\n1+1\n'
repl "-i calls __tostring for every prompt" $'a = 1\nb = 2\n' \
    -e 'local c = 0; _PROMPT = setmetatable({}, {__tostring = function() c = c + 1; return c .. "> " end})'
repl "-i with _PROMPT2 a table with __tostring" $'if true then\nprint(1)\nend\n' \
    -e '_PROMPT2 = setmetatable({}, {__tostring = function() return "cont> " end})'
repl "-i with a number as _PROMPT" $'1+1\n' -e '_PROMPT = 7'

# ---- argv[0] in messages --------------------------------------------------------------
ln -s "$WSHOST" "$tmp/wsh"
want=$(lua5.4 -e 'error("boom")' 2>&1 | head -1) || true
got=$("$tmp/wsh" -e 'error("boom")' 2>&1 | head -1) || true
check "errors name argv[0]" "${want/#lua5.4/$tmp/wsh}" "$got"
[[ "$got" == "$tmp/wsh: "* ]] && pass "errors start with argv[0]" \
    || fail "errors start with argv[0]: got [$got]"
got=$(cd "$tmp" && ./wsh -e 'error("boom")' 2>&1 | head -1) || true
check "a relative argv[0] is kept as given" "./wsh: (command line):1: boom" "$got"
got=$("$tmp/wsh" -x 2>&1) || true
check "bad options name argv[0]" "$tmp/wsh: unrecognized option '-x'" "$got"
check "usage names argv[0]" "usage: $tmp/wsh [options]" "$got"

# ---- -v -------------------------------------------------------------------------------
out=$("$WSHOST" -v)
check "-v starts with wshost's line" "wshost " "$(head -1 <<<"$out")"
check "-v ends with Lua's version and copyright" "$(lua5.4 -v)" "$(tail -1 <<<"$out")"
[[ "$(tail -1 <<<"$out")" == "$(lua5.4 -v)" ]] && pass "-v last line is exactly lua5.4's" \
    || fail "-v last line: [$(tail -1 <<<"$out")]"
out=$("$WSHOST" -v -e 'print("hello")')
check "-v then -e: Lua's line comes before the output" "PUC-Rio
hello" "$out"

finish
