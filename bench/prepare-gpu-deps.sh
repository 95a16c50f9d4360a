#!/usr/bin/env bash
# prepare-gpu-deps.sh: stage what the GPU machine cannot install.
#
# The GPU machine has CUDA, CMake, ninja and PyTorch but no package registry
# and no Lua. This copies the Lua 5.4 headers and static library from this
# machine (liblua5.4-dev) into .deps/lua/, so the lead can carry `.deps` to
# the GPU, where bench/gpu-check.sh configures with it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/.deps/lua
inc_src=${LUA_INCLUDE_SRC:-/usr/include/lua5.4}
lib_src=${LUA_LIB_SRC:-/usr/lib/x86_64-linux-gnu/liblua5.4.a}
# Debian's luaconf.h includes this multiarch header from the triplet dir.
multiarch=${LUA_MULTIARCH_HEADER:-/usr/include/x86_64-linux-gnu/lua5.4-deb-multiarch.h}

if [ ! -f "$inc_src/lua.h" ] || [ ! -f "$lib_src" ]; then
    echo "prepare-gpu-deps: Lua 5.4 not found ($inc_src/lua.h, $lib_src);" \
         "install liblua5.4-dev first" >&2
    exit 1
fi

rm -rf "$dest"
mkdir -p "$dest/include"
# Copy the files, not links: on Debian some headers are symlinks into /usr/include.
cp -L "$inc_src"/*.h "$dest/include/"
if grep -q 'lua5.4-deb-multiarch.h' "$dest/include/luaconf.h"; then
    if [ ! -f "$multiarch" ]; then
        echo "prepare-gpu-deps: luaconf.h needs $multiarch, which is missing" >&2
        exit 1
    fi
    cp -L "$multiarch" "$dest/include/"
fi
cp -L "$lib_src" "$dest/liblua5.4.a"
# The shared library too: libwshost.so and the Python module link it.
so_src=${LUA_SO_SRC:-/usr/lib/x86_64-linux-gnu/liblua5.4.so.0}
if [ -f "$so_src" ]; then
    cp -L "$so_src" "$dest/liblua5.4.so.0"
else
    echo "prepare-gpu-deps: no $so_src; the GPU check will build without libwshost" >&2
fi
echo "prepare-gpu-deps: staged $(ls "$dest/include" | wc -l) headers and" \
     "$(du -h "$dest/liblua5.4.a" | cut -f1) liblua5.4.a in $dest"
echo "prepare-gpu-deps: carry '.deps' to the GPU machine, then run bench/gpu-check.sh there"

# cJSON (Debian ships no static library): the header and the shared library,
# which the build tree's RPATH then finds (gpu-check.sh passes -DWS_CJSON_*).
cdest=$root/.deps/cjson
cjson_inc=${CJSON_INCLUDE_SRC:-/usr/include/cjson}
cjson_lib=${CJSON_LIB_SRC:-/usr/lib/x86_64-linux-gnu/libcjson.so.1}
if [ ! -f "$cjson_inc/cJSON.h" ] || [ ! -f "$cjson_lib" ]; then
    echo "prepare-gpu-deps: cJSON not found ($cjson_inc/cJSON.h, $cjson_lib);" \
         "install libcjson-dev first" >&2
    exit 1
fi
rm -rf "$cdest"
mkdir -p "$cdest/include/cjson" "$cdest/lib"
cp -L "$cjson_inc/cJSON.h" "$cdest/include/cjson/"
cp -L "$cjson_lib" "$cdest/lib/libcjson.so.1"
echo "prepare-gpu-deps: staged cJSON in $cdest"

# busted and its modules (pure Lua plus a few small C modules), so the Lua
# specs run inside wshost on the GPU machine too: .deps/busted/busted is a
# wrapper that CMake takes as BUSTED (gpu-check.sh passes -DBUSTED=...).
bdest=$root/.deps/busted
share_src=${LUA_SHARE_SRC:-/usr/share/lua/5.4}
cmod_src=${LUA_CMOD_SRC:-/usr/lib/x86_64-linux-gnu/lua/5.4}
if [ -f "$share_src/busted/runner.lua" ]; then
    rm -rf "$bdest"
    mkdir -p "$bdest/share" "$bdest/lib"
    cp -rL "$share_src"/. "$bdest/share/"
    cp -rL "$cmod_src"/. "$bdest/lib/"
    cat >"$bdest/runner.lua" <<'LUA'
-- busted's command-line runner, run by wshost itself (see busted wrapper).
require 'busted.runner'({ standalone = false })
LUA
    cat >"$bdest/busted" <<'SH'
#!/bin/sh
# busted for a machine without Lua packages: wshost runs busted's runner.
d=$(cd "$(dirname "$0")" && pwd)
export LUA_PATH="$d/share/?.lua;$d/share/?/init.lua;;"
export LUA_CPATH="$d/lib/?.so;;"
exec "${WSHOST:?WSHOST must name the wshost binary}" "$d/runner.lua" "$@"
SH
    chmod +x "$bdest/busted"
    echo "prepare-gpu-deps: staged busted ($(du -sh "$bdest" | cut -f1)) in $bdest"
else
    echo "prepare-gpu-deps: busted not installed (lua-busted); the GPU check will skip the Lua specs"
fi
