#!/usr/bin/env bash
# install.sh: `cmake --install` into a scratch prefix gives a usable
# libwshost: a consumer builds against it with find_package(wshost) and with
# pkg-config, runs, and the installed library finds its Lua files under
# <prefix>/share/wshost; the installed Python module imports from the prefix.
set -euo pipefail
. "$(dirname "$0")/fixtures/e2e_lib.sh"
: "${WS_BUILD_DIR:?set WS_BUILD_DIR to the build directory}"
if [[ ! -e "$WS_BUILD_DIR/libwshost.so" ]]; then
    echo "libwshost was not built (no shared Lua 5.4): skipped"
    exit 77
fi
prefix=$tmp/prefix
cmake --install "$WS_BUILD_DIR" --prefix "$prefix" >"$tmp/install.log" 2>&1 \
    || { cat "$tmp/install.log"; fail "cmake --install"; finish; }
libdir=$(dirname "$(find "$prefix" -name 'libwshost.so' | head -1)")
[[ -f "$prefix/include/wshost/ws.h" ]] && pass "ws.h installed" || fail "ws.h missing"
[[ -f "$libdir/cmake/wshost/wshostConfig.cmake" ]] && pass "CMake package config installed" \
    || fail "wshostConfig.cmake missing"
[[ -d "$prefix/share/wshost/lua/ws" ]] && pass "Lua library installed" || fail "share/wshost/lua missing"
exported=$(nm -D --defined-only "$libdir/libwshost.so" | awk '{print $3}' | grep -v '^ws_host_' || true)
if [[ -z "$exported" ]]; then pass "only ws_host_* exported"; else fail "also exported: $exported"; fi

src=$(cd "$(dirname "$0")/fixtures/consumer" && pwd)
# A pipeline path that does not exist: the error must come from the session
# module the installed library found, naming the file.
missing=$tmp/no_such_pipeline.lua

# find_package(wshost)
cmake -S "$src" -B "$tmp/cm" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >"$tmp/cm.log" 2>&1 \
    && ninja -C "$tmp/cm" >>"$tmp/cm.log" 2>&1 \
    && pass "consumer builds with find_package(wshost)" || { cat "$tmp/cm.log"; fail "find_package build"; }
if [[ -x "$tmp/cm/consumer" ]]; then
    out=$(cd "$tmp" && "$tmp/cm/consumer" "$missing" 2>&1 || true)
    echo "$out" | sed 's/^/     | /'
    check "find_package consumer runs" "version " "$out"
    check "installed library finds ws.session and names the file" "no_such_pipeline.lua" "$out"
    if [[ "$out" == *"module 'ws.session' not found"* ]]; then
        fail "installed library does not find its Lua files"
    fi
    used=$(cd "$tmp" && LD_DEBUG=libs "$tmp/cm/consumer" "$missing" 2>&1 | grep -m1 'calling init: .*libwshost' || true)
    check "the installed libwshost is the one loaded" "$prefix" "$used"
fi

# pkg-config
if command -v pkg-config >/dev/null; then
    export PKG_CONFIG_PATH=$libdir/pkgconfig
    flags=$(pkg-config --cflags --libs wshost)
    cc -o "$tmp/pc_consumer" "$src/consumer.c" $flags -Wl,-rpath,"$(pkg-config --variable=libdir wshost)" \
        && pass "consumer builds with pkg-config ($flags)" || fail "pkg-config build"
    [[ -x "$tmp/pc_consumer" ]] && check "pkg-config consumer runs" "version " "$("$tmp/pc_consumer" "$missing" 2>&1)"
else
    echo "pkg-config not found: that half skipped"
fi

# The Python module, from the prefix.
pymod=$(find "$prefix" -name 'wshost.cpython-*.so' | head -1)
if [[ -n "$pymod" ]]; then
    out=$(cd "$tmp" && PYTHONPATH=$(dirname "$pymod") /usr/bin/python3 -c '
import wshost, sys
print(wshost.__file__)
print([l.split()[-1] for l in open("/proc/self/maps") if "libwshost" in l][0])' 2>&1 || true)
    echo "$out" | sed 's/^/     | /'
    check "installed Python module imports from the prefix" "$prefix" "$(echo "$out" | head -1)"
    check "and loads the installed libwshost" "$prefix" "$(echo "$out" | tail -1)"
fi
finish
