/* module_entry.c: the entry of ws.so for stock lua5.4 (`require "ws"`).
 *
 * luaopen_ws itself lives in module.c inside the static wsbind library; a
 * static library member is linked only when something refers to it, so this
 * file refers to it. The linker then pulls module.o (and the bindings and
 * core it needs) into ws.so, where luaopen_ws is exported with default
 * visibility. Lua's own symbols come from the interpreter that loads us. */
#include "bind.h"

/* Referenced so the linker keeps module.o; exported under a name no Lua
 * searcher looks for. */
int (*const ws_module_entry)(lua_State *L) = luaopen_ws;
