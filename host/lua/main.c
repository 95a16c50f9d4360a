/* main.c: the wshost binary, a lua(1)-compatible interpreter with `ws`
 * preloaded (modelled on Lua 5.4's lua.c).
 *
 * Command line as lua(1): `wshost [options] [script [args]]`, the `arg`
 * table, -e -l -i -v -E -W -- and `-`, LUA_INIT, LUA_PATH and LUA_CPATH
 * untouched (ws finds its Lua library through a searcher of its own), the
 * REPL with _PROMPT and _PROMPT2; plus --help and --device. All of main runs
 * inside one protected call. Errors print `argv[0]: file:line: message` and a
 * traceback and exit 1; an error object with __tostring prints as that one
 * line, which is how ws.errors reports environment failures (out of memory,
 * no device) that need no traceback. Ctrl-C sets a hook that raises
 * "interrupted!" inside Lua; the process then exits 130 after lua_close, so
 * __gc returns device memory. Tools that expect lua(1) (busted --lua=wshost)
 * work because the command line is the same and Lua's symbols are exported
 * for C modules such as lfs. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "bind.h"
#include "comm.h"
#include "env.h"

#ifndef WSHOST_VERSION
#define WSHOST_VERSION "dev"
#endif

#define EXIT_INTERRUPTED 130

static const char *progname = "wshost";
static lua_State *globalL;

/* ---- Ctrl-C ------------------------------------------------------------------- */

static void lstop(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted!");
}

/* The handler never touches the Lua state beyond lua_sethook, which is safe
 * from a signal handler; the hook raises the error at the next Lua step. */
static void laction(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL; /* a second Ctrl-C kills, even inside C code */
    sigaction(sig, &sa, NULL);
    ws_lua_set_interrupted();
    lua_sethook(globalL, lstop, LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

static void set_sigint(void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

/* ---- messages ------------------------------------------------------------------- */

static void print_usage(const char *badoption)
{
    if (badoption) {
        if (badoption[1] == 'e' || badoption[1] == 'l')
            fprintf(stderr, "%s: '%s' needs argument\n", progname, badoption);
        else if (strcmp(badoption, "--device") == 0)
            fprintf(stderr, "%s: '--device' needs argument (cpu, cuda or cuda:N)\n", progname);
        else
            fprintf(stderr, "%s: unrecognized option '%s'\n", progname, badoption);
    }
    fprintf(badoption ? stderr : stdout,
            "usage: %s [options] [script [args]]\n"
            "Available options are:\n"
            "  -e stat            execute string 'stat'\n"
            "  -i                 enter interactive mode after executing 'script'\n"
            "  -l mod             require library 'mod' into global 'mod'\n"
            "  -l g=mod           require library 'mod' into global 'g'\n"
            "  -v                 show version information and the chosen device\n"
            "  -E                 ignore environment variables\n"
            "  -W                 turn warnings on\n"
            "  --device D         default device: cpu, cuda or cuda:N (checked at startup)\n"
            "  --help             show this help\n"
            "  --                 stop handling options\n"
            "  -                  stop handling options and execute stdin\n"
            "Environment (ignored with -E):\n"
            "  WSHOST_DEVICE      default device, as --device\n"
            "  WSHOST_PATH        colon-separated dirs searched first for Lua modules\n"
            "                     (D/?.lua and D/?/init.lua, ahead of package.path)\n"
            "  WSHOST_THREADS     threads for cpu copies, conversions and checksums\n"
            "                     (default: the number of online CPUs)\n"
            "  WSHOST_COMM_CHECK  0: skip the size check before each multi-rank collective\n"
            "  WSHOST_COMM_NCCL   1: cuda tensors use NCCL even in a world of one (testing)\n"
            "  WSHOST_NCCL_LIBRARY  path of libnccl.so.2 (default: the loader's search)\n"
            "  WSHOST_CUDA_MEMCPY_MIN_BYTES  plain GPU copies from this size use\n"
            "                     cudaMemcpyAsync, smaller ones one batched kernel (16 MiB)\n"
            "  LUA_INIT_5_4, LUA_INIT  code or @file run before the arguments\n"
            "  LUA_PATH, LUA_CPATH     as in lua(1)\n",
            progname);
    fflush(stdout);
}

static void l_message(const char *pname, const char *msg)
{
    if (pname) fprintf(stderr, "%s: ", pname);
    fprintf(stderr, "%s\n", msg);
    fflush(stderr);
}

static int report(lua_State *L, int status)
{
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        l_message(progname, msg ? msg : "(error object is not a string)");
        lua_pop(L, 1);
    }
    return status;
}

/* Appends a traceback to a string error. An error object with __tostring is
 * its one-line message, with no traceback: ws.errors raises environment
 * failures that way (the message says it all), while a bug or a misuse,
 * raised as a string, keeps the traceback that locates it. */
static int msghandler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static int docall(lua_State *L, int narg, int nres)
{
    int base = lua_gettop(L) - narg;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base); /* [handler, chunk, args...] */
    globalL = L;
    set_sigint(laction);
    int status = lua_pcall(L, narg, nres, base);
    set_sigint(SIG_DFL);
    lua_remove(L, base);
    return status;
}

/* wshost's own line; lua_version_line ends the banner, as lua(1)'s only line. */
static void print_version(void)
{
    printf("wshost %s (%s)\n", WSHOST_VERSION, LUA_RELEASE);
    fflush(stdout);
}

static void lua_version_line(void)
{
    fputs(LUA_COPYRIGHT "\n", stdout);
    fflush(stdout);
}

/* arg[0] = script, negative indices: interpreter and options, positive:
 * script arguments. */
static void createargtable(lua_State *L, char **argv, int argc, int script)
{
    if (script == argc) script = 0; /* no script: arg[0] is the interpreter */
    lua_createtable(L, argc - script - 1, script + 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - script);
    }
    lua_setglobal(L, "arg");
}

static int dochunk(lua_State *L, int status)
{
    if (status == LUA_OK) status = docall(L, 0, 0);
    return report(L, status);
}

static int dofile(lua_State *L, const char *name)
{
    return dochunk(L, luaL_loadfile(L, name));
}

static int dostring(lua_State *L, const char *s, const char *name)
{
    return dochunk(L, luaL_loadbuffer(L, s, strlen(s), name));
}

/* -l [g=]mod: global g (default mod) = require(mod). */
static int dolibrary(lua_State *L, char *globname)
{
    char *modname = strchr(globname, '=');
    if (modname) {
        *modname = '\0';
        modname++;
    } else {
        modname = globname;
    }
    lua_getglobal(L, "require");
    lua_pushstring(L, modname);
    int status = docall(L, 1, 1);
    if (status == LUA_OK) lua_setglobal(L, globname);
    return report(L, status);
}

static int pushargs(lua_State *L)
{
    if (lua_getglobal(L, "arg") != LUA_TTABLE) luaL_error(L, "'arg' is not a table");
    int n = (int)luaL_len(L, -1);
    luaL_checkstack(L, n + 3, "too many arguments to script");
    for (int i = 1; i <= n; i++) lua_rawgeti(L, -i, i);
    lua_remove(L, -n - 1);
    return n;
}

static int handle_script(lua_State *L, char **argv)
{
    const char *fname = argv[0];
    if (strcmp(fname, "-") == 0 && strcmp(argv[-1], "--") != 0) fname = NULL; /* stdin */
    int status = luaL_loadfile(L, fname);
    if (status == LUA_OK) {
        int n = pushargs(L);
        status = docall(L, n, 1);
    }
    /* A pipeline file returns its pipeline (ws.pipeline.define); running the
     * file runs it with the script's arguments. */
    if (status == LUA_OK && lua_istable(L, -1) &&
        luaL_getmetafield(L, -1, "__name") == LUA_TSTRING) {
        int is_pipeline = strcmp(lua_tostring(L, -1), "ws.Pipeline") == 0;
        lua_pop(L, 1);
        if (is_pipeline) {
            lua_getfield(L, -1, "main");
            lua_getglobal(L, "arg");
            status = docall(L, 1, 0);
        }
    }
    return report(L, status);
}

/* ---- options ---------------------------------------------------------------------- */

enum { HAS_ERROR = 1, HAS_I = 2, HAS_V = 4, HAS_E = 8, HAS_BIGE = 16, HAS_HELP = 32 };

/* Returns flags; *first = index of the script (argc when none). *device is
 * the --device value. */
static int collectargs(char **argv, int *first, const char **device)
{
    int args = 0;
    int i;
    for (i = 1; argv[i] != NULL; i++) {
        *first = i;
        if (argv[i][0] != '-') return args; /* the script */
        if (strcmp(argv[i], "-") == 0) return args;
        if (strcmp(argv[i], "--") == 0) {
            *first = i + 1;
            return args;
        }
        if (strcmp(argv[i], "--help") == 0) {
            args |= HAS_HELP;
        } else if (strcmp(argv[i], "--device") == 0) {
            if (argv[i + 1] == NULL || argv[i + 1][0] == '-') return args | HAS_ERROR;
            *device = argv[++i];
        } else if (strncmp(argv[i], "--device=", 9) == 0) {
            *device = argv[i] + 9;
        } else if (strcmp(argv[i], "-E") == 0) {
            args |= HAS_BIGE;
        } else if (strcmp(argv[i], "-W") == 0) {
        } else if (strcmp(argv[i], "-i") == 0) {
            args |= HAS_I | HAS_V;
        } else if (strcmp(argv[i], "-v") == 0) {
            args |= HAS_V;
        } else if (argv[i][1] == 'e' || argv[i][1] == 'l') {
            if (argv[i][1] == 'e') args |= HAS_E;
            if (argv[i][2] == '\0') {
                i++;
                if (argv[i] == NULL || argv[i][0] == '-') return args | HAS_ERROR;
            }
        } else {
            return args | HAS_ERROR;
        }
    }
    *first = i;
    return args;
}

/* Runs -e, -l and -W in order. */
static int runargs(lua_State *L, char **argv, int n)
{
    for (int i = 1; i < n; i++) {
        if (strcmp(argv[i], "--device") == 0) {
            i++;
            continue;
        }
        if (argv[i][0] != '-') continue;
        int opt = argv[i][1];
        if (opt == 'e' || opt == 'l') {
            char *extra = argv[i] + 2;
            if (*extra == '\0') extra = argv[++i];
            int status = opt == 'e' ? dostring(L, extra, "=(command line)") : dolibrary(L, extra);
            if (status != LUA_OK) return 0;
        } else if (opt == 'W') {
            lua_warning(L, "@on", 0);
        }
    }
    return 1;
}

static int handle_luainit(lua_State *L)
{
    const char *name = "=LUA_INIT_5_4";
    const char *init = ws_env_get(name + 1);
    if (init == NULL) {
        name = "=LUA_INIT";
        init = ws_env_get(name + 1);
    }
    if (init == NULL) return LUA_OK;
    if (init[0] == '@') return dofile(L, init + 1);
    return dostring(L, init, name);
}

/* ---- interactive mode ------------------------------------------------------------------- */

/* As lua(1) built without readline: each prompt goes to stdout, also when
 * stdin is not a terminal, and lines come from stdin. */

/* Pushes the prompt: _PROMPT (first line) or _PROMPT2 (continuation lines)
 * through tostring, so a table with __tostring works, else "> " or ">> ". */
static const char *push_prompt(lua_State *L, int first)
{
    if (lua_getglobal(L, first ? "_PROMPT" : "_PROMPT2") == LUA_TNIL) {
        lua_pop(L, 1);
        return lua_pushstring(L, first ? "> " : ">> ");
    }
    const char *p = luaL_tolstring(L, -1, NULL);
    lua_remove(L, -2);
    return p;
}

/* Shows the prompt and pushes the next line without its newline; 0 at the
 * end of input. Lines of any length are read whole. A first line "=expr" is
 * "return expr", as in Lua 5.2. */
static int push_line(lua_State *L, int first)
{
    fputs(push_prompt(L, first), stdout);
    fflush(stdout);
    lua_pop(L, 1);
    luaL_Buffer b;
    char chunk[512];
    int got = 0;
    luaL_buffinit(L, &b);
    while (fgets(chunk, sizeof chunk, stdin) != NULL) {
        size_t n = strlen(chunk);
        got = 1;
        if (n > 0 && chunk[n - 1] == '\n') {
            luaL_addlstring(&b, chunk, n - 1);
            break;
        }
        luaL_addlstring(&b, chunk, n);
    }
    luaL_pushresult(&b);
    if (!got) {
        lua_pop(L, 1);
        return 0;
    }
    const char *line = lua_tostring(L, -1);
    if (first && line[0] == '=') {
        lua_pushfstring(L, "return %s", line + 1);
        lua_remove(L, -2);
    }
    return 1;
}

/* A syntax error ending in "<eof>" means the statement goes on. */
static int incomplete(lua_State *L, int status)
{
    static const char mark[] = "<eof>";
    size_t lmsg, lmark = sizeof mark - 1;
    if (status != LUA_ERRSYNTAX) return 0;
    const char *msg = lua_tolstring(L, -1, &lmsg);
    return lmsg >= lmark && strcmp(msg + lmsg - lmark, mark) == 0;
}

/* Reads one statement and leaves its compiled chunk (or the error) on the
 * stack; -1 at the end of input. The line is tried first as "return <line>;"
 * so that `> 1+1` prints 2; as a statement it may take more lines. */
static int load_statement(lua_State *L)
{
    lua_settop(L, 0);
    if (!push_line(L, 1)) return -1;
    size_t len;
    const char *ret = lua_pushfstring(L, "return %s;", lua_tostring(L, 1));
    lua_tolstring(L, -1, &len);
    if (luaL_loadbuffer(L, ret, len, "=stdin") == LUA_OK) { /* [line, ret, chunk] */
        lua_replace(L, 1);
        lua_settop(L, 1);
        return LUA_OK;
    }
    lua_settop(L, 1); /* [code] */
    for (;;) {
        const char *code = lua_tolstring(L, 1, &len);
        int status = luaL_loadbuffer(L, code, len, "=stdin"); /* [code, chunk or error] */
        /* Input that ends inside a statement reports why it is incomplete. */
        if (!incomplete(L, status) || !push_line(L, 0)) {
            lua_remove(L, 1);
            return status;
        }
        lua_remove(L, 2); /* [code, more] */
        lua_pushliteral(L, "\n");
        lua_insert(L, 2);
        lua_concat(L, 3); /* [code .. "\n" .. more] */
    }
}

static void print_results(lua_State *L)
{
    int n = lua_gettop(L);
    if (n == 0) return;
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    lua_getglobal(L, "print");
    lua_insert(L, 1);
    if (lua_pcall(L, n, 0, 0) != LUA_OK)
        l_message(progname, lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1)));
}

static void do_repl(lua_State *L)
{
    const char *old = progname;
    progname = NULL; /* lua.c: no program name before errors in the REPL */
    int status;
    while ((status = load_statement(L)) != -1) {
        if (status == LUA_OK) status = docall(L, 0, LUA_MULTRET);
        if (status == LUA_OK)
            print_results(L);
        else
            report(L, status);
    }
    lua_settop(L, 0);
    fputs("\n", stdout);
    fflush(stdout);
    progname = old;
}

/* ---- startup ------------------------------------------------------------------------------ */

/* --device / WSHOST_DEVICE: checked before any script runs, so a typo or a
 * missing GPU fails at once with exit 1. */
static int choose_device(const char *source, const char *name)
{
    ws_device *d;
    if (ws_device_get(name, &d) == WS_OK) {
        char why[96];
        snprintf(why, sizeof why, "%s %s", source, name);
        ws_lua_set_default_device(d, why);
        return 1;
    }
    if (strncmp(name, "cuda", 4) == 0 && ws_device_cuda_count() == 0) {
        const char *reason = ws_device_cuda_unavailable_reason();
        fprintf(stderr, "%s: %s %s: no usable GPU (%s)\n", progname, source, name,
                reason ? reason : "unknown reason");
    } else if (strcmp(name, "cpu") != 0 && strcmp(name, "cuda") != 0 &&
               strncmp(name, "cuda:", 5) != 0) {
        fprintf(stderr, "%s: %s %s: unknown device (valid: cpu, cuda, cuda:N)\n", progname,
                source, name);
    } else {
        fprintf(stderr, "%s: %s %s: %s\n", progname, source, name, ws_errmsg());
    }
    return 0;
}

static int pmain(lua_State *L)
{
    int argc = (int)lua_tointeger(L, 1);
    char **argv = (char **)lua_touserdata(L, 2);
    if (argv[0] && argv[0][0]) progname = argv[0];
    int script = argc;
    const char *device = NULL;
    int args = collectargs(argv, &script, &device);
    if (args & HAS_ERROR) {
        print_usage(argv[script]);
        return 0;
    }
    if (args & HAS_HELP) {
        print_usage(NULL);
        lua_pushboolean(L, 1);
        return 1;
    }
    if (args & HAS_V) print_version();
    if (args & HAS_BIGE) {
        lua_pushboolean(L, 1);
        lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
    }
    const char *env_device = (args & HAS_BIGE) ? NULL : ws_env_get("WSHOST_DEVICE");
    if (device) {
        if (!choose_device("--device", device)) return 0;
    } else if (env_device && *env_device) {
        if (!choose_device("WSHOST_DEVICE=", env_device)) return 0;
    }
    if (args & HAS_V) {
        /* -v asks for the device, so probing here is fine. */
        const char *why = device ? "--device" : "WSHOST_DEVICE";
        ws_device *d = (device || (env_device && *env_device)) ? ws_lua_default_device(L)
                                                                : ws_device_default(&why);
        printf("device: %s (%s)\n", d->name, why ? why : "default");
        lua_version_line();
    }
    luaL_openlibs(L);
    luaL_requiref(L, "ws", luaopen_ws, 1); /* package.loaded.ws and global ws */
    lua_pop(L, 1);
    createargtable(L, argv, argc, script);
    lua_gc(L, LUA_GCRESTART);
    lua_gc(L, LUA_GCGEN, 0, 0);
    if (!(args & HAS_BIGE) && handle_luainit(L) != LUA_OK) return 0;
    if (!runargs(L, argv, script)) return 0;
    if (script < argc && handle_script(L, argv + script) != LUA_OK) return 0;
    if (args & HAS_I) {
        do_repl(L);
    } else if (script == argc && !(args & (HAS_E | HAS_V))) {
        if (isatty(0)) {
            print_version();
            lua_version_line();
            do_repl(L);
        } else if (dofile(L, NULL) != LUA_OK) {
            return 0;
        }
    }
    lua_pushboolean(L, 1);
    return 1;
}

int main(int argc, char **argv)
{
    lua_State *L = luaL_newstate();
    if (L == NULL) {
        l_message(argv[0], "cannot create state: not enough memory");
        return EXIT_FAILURE;
    }
    lua_gc(L, LUA_GCSTOP);
    lua_pushcfunction(L, pmain);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int status = lua_pcall(L, 2, 1, 0);
    int ok = lua_toboolean(L, -1);
    report(L, status);
    lua_close(L); /* __gc frees tensors, pools and device memory */
    if (status == LUA_OK && ok) {
        ws_comm_shutdown();
        return EXIT_SUCCESS;
    }
    int code = ws_lua_is_interrupted() ? EXIT_INTERRUPTED : EXIT_FAILURE;
    /* Ends the other ranks too when MPI is running, so none of them hangs. */
    ws_comm_abort(code);
    return code;
}
