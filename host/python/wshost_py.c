/* wshost_py.c: the `wshost` Python module, a thin layer over ws.h.
 *
 *   wshost.Tensor       memory shown to Python, with DLPack both ways
 *   wshost.from_dlpack  wraps anything with __dlpack__ (or a capsule), zero copy
 *   wshost.Session      a pipeline session: expected, register, alloc, on,
 *                       step, close; a context manager
 *   wshost.Receiver     the engine side of server mode (receiver_py.c)
 *   wshost.Error        (RuntimeError) every failure of the host, its text
 *                       unchanged
 *
 * Lifetimes: a Tensor from from_dlpack owns the producer's DLManagedTensor
 * and calls its deleter when it goes. A Tensor from Session.alloc keeps its
 * Session alive; memory wshost lends out is valid until Session.close(),
 * which refuses (and frees nothing) while a DLPack view of it is alive. An
 * exported view holds a reference to its Tensor, dropped by the deleter.
 * Memory registered with a session holds a reference to its Tensor until the
 * session lets go of it. Callbacks from wshost into Python (events, releases,
 * DLPack deleters) take the GIL themselves: a step runs without it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "dlpack.h"
#include "wshost_py.h"

PyObject *WsError;

/* ---- dtypes -------------------------------------------------------------------------- */

typedef struct dtype_info {
    const char *name; /* wshost's name */
    ws_dl_dtype dl;
} dtype_info;

static const dtype_info dtypes[] = {
    {"f32", {WS_DL_FLOAT, 32, 1}},  {"bf16", {WS_DL_BFLOAT, 16, 1}},
    {"f16", {WS_DL_FLOAT, 16, 1}},  {"fp8", {WS_DL_FLOAT8_E4M3FN, 8, 1}},
    {"u8", {WS_DL_UINT, 8, 1}},     {"i32", {WS_DL_INT, 32, 1}},
    {"i64", {WS_DL_INT, 64, 1}},
};
#define N_DTYPES (sizeof dtypes / sizeof dtypes[0])

static const dtype_info *dtype_by_name(const char *name)
{
    static const char *const aliases[][2] = {
        {"float32", "f32"}, {"float", "f32"},  {"bfloat16", "bf16"}, {"float16", "f16"},
        {"half", "f16"},    {"float8_e4m3fn", "fp8"}, {"fp8e4m3", "fp8"}, {"uint8", "u8"},
        {"int32", "i32"},   {"int", "i32"},   {"int64", "i64"},   {"long", "i64"},
    };
    if (strncmp(name, "torch.", 6) == 0) name += 6;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (!strcmp(name, aliases[i][0])) name = aliases[i][1];
    for (size_t i = 0; i < N_DTYPES; i++)
        if (!strcmp(name, dtypes[i].name)) return &dtypes[i];
    return NULL;
}

static const dtype_info *dtype_by_dl(ws_dl_dtype d)
{
    for (size_t i = 0; i < N_DTYPES; i++)
        if (dtypes[i].dl.code == d.code && dtypes[i].dl.bits == d.bits && d.lanes == 1)
            return &dtypes[i];
    return NULL;
}

/* ---- Tensor -------------------------------------------------------------------------- */


struct SessionObject {
    PyObject_HEAD
    ws_host *h;
    int closed;
    int in_call;              /* a step or close is running (maybe without the GIL) */
    PyObject *callbacks;      /* list of the functions given to on(), kept alive */
    TensorObject **allocs;    /* borrowed: each alloc'd Tensor holds us */
    size_t n_allocs, cap_allocs;
    PyObject *callback_error; /* the exception a callback raised, for __cause__ */
    int reraise;              /* callback_error is KeyboardInterrupt or SystemExit: raised as is */
    int cuda;                 /* a CUDA tensor was registered or allocated */
};

static PyTypeObject SessionType;

PyObject *tensor_new_raw(void)
{
    TensorObject *t = PyObject_New(TensorObject, &TensorType);
    if (!t) return NULL;
    memset(&t->mem, 0, sizeof t->mem);
    t->name = Py_None;
    Py_INCREF(Py_None);
    t->managed = NULL;
    t->session = NULL;
    t->exports = 0;
    t->freed_by = NULL;
    return (PyObject *)t;
}

static void session_forget_alloc(SessionObject *s, const TensorObject *t)
{
    for (size_t i = 0; i < s->n_allocs; i++)
        if (s->allocs[i] == t) {
            s->allocs[i] = s->allocs[--s->n_allocs];
            return;
        }
}

static void tensor_dealloc(TensorObject *t)
{
    if (t->managed && t->managed->deleter) t->managed->deleter(t->managed);
    t->managed = NULL;
    if (t->session) {
        session_forget_alloc(t->session, t);
        Py_CLEAR(t->session);
    }
    Py_CLEAR(t->name);
    PyObject_Free(t);
}

static const char *tensor_label(TensorObject *t, char *buf, size_t n)
{
    const char *name = t->name != Py_None ? PyUnicode_AsUTF8(t->name) : NULL;
    if (!name) PyErr_Clear();
    if (name)
        snprintf(buf, n, "'%s'", name);
    else
        snprintf(buf, n, "<unnamed %s tensor>", t->mem.dtype ? t->mem.dtype : "?");
    return buf;
}

int tensor_check_live(TensorObject *t, const char *what)
{
    if (t->mem.data || t->mem.nbytes == 0) return 0;
    char label[300];
    PyErr_Format(WsError, "%s: tensor %s was freed by %s", what, tensor_label(t, label, sizeof label),
                 t->freed_by ? t->freed_by : "its owner");
    return -1;
}

static PyObject *tensor_shape(TensorObject *t, void *c)
{
    PyObject *tup = PyTuple_New(t->mem.ndim);
    if (!tup) return NULL;
    for (int k = 0; k < t->mem.ndim; k++) {
        PyObject *v = PyLong_FromLongLong(t->mem.shape[k]);
        if (!v) {
            Py_DECREF(tup);
            return NULL;
        }
        PyTuple_SET_ITEM(tup, k, v);
    }
    return tup;
}

static PyObject *tensor_dtype(TensorObject *t, void *c) { return PyUnicode_FromString(t->mem.dtype); }

static PyObject *tensor_device(TensorObject *t, void *c)
{
    if (t->mem.device_type == WS_HOST_CUDA) return PyUnicode_FromFormat("cuda:%d", t->mem.device_index);
    return PyUnicode_FromString("cpu");
}

static PyObject *tensor_data_ptr(TensorObject *t, void *c)
{
    return PyLong_FromVoidPtr(t->mem.data);
}

static PyObject *tensor_nbytes(TensorObject *t, void *c)
{
    return PyLong_FromSize_t(t->mem.nbytes);
}

static PyObject *tensor_name(TensorObject *t, void *c)
{
    Py_INCREF(t->name);
    return t->name;
}

static PyObject *tensor_repr(TensorObject *t)
{
    char shape[160] = "", label[300];
    size_t at = 0;
    for (int k = 0; k < t->mem.ndim && at < sizeof shape; k++)
        at += (size_t)snprintf(shape + at, sizeof shape - at, "%s%lld", k ? "," : "",
                               (long long)t->mem.shape[k]);
    char dev[32] = "cpu";
    if (t->mem.device_type == WS_HOST_CUDA) snprintf(dev, sizeof dev, "cuda:%d", t->mem.device_index);
    return PyUnicode_FromFormat("wshost.Tensor(%s[%s] %s %s%s)", t->mem.dtype, shape, dev,
                                tensor_label(t, label, sizeof label),
                                t->mem.data || !t->mem.nbytes ? "" : " freed");
}

/* The exported view: the DLManagedTensor and the arrays it points into. */
typedef struct export_ctx {
    ws_dl_managed m;
    int64_t shape[WS_HOST_MAX_DIMS];
    int64_t strides[WS_HOST_MAX_DIMS];
    TensorObject *owner;
} export_ctx;

/* The consumer's deleter: may run on any thread, with or without the GIL. */
static void export_deleter(ws_dl_managed *m)
{
    export_ctx *e = (export_ctx *)m;
    PyGILState_STATE g = PyGILState_Ensure();
    e->owner->exports--;
    Py_DECREF(e->owner);
    PyMem_RawFree(e);
    PyGILState_Release(g);
}

/* A capsule nobody consumed still owns its tensor. */
static void capsule_destructor(PyObject *cap)
{
    if (!PyCapsule_IsValid(cap, "dltensor")) return; /* "used_dltensor": the consumer's */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    ws_dl_managed *m = PyCapsule_GetPointer(cap, "dltensor");
    if (m && m->deleter) m->deleter(m);
    PyErr_Restore(type, value, tb);
}

static int device_matches(TensorObject *t, PyObject *dl_device)
{
    long type, id;
    if (!PyArg_ParseTuple(dl_device, "ll;dl_device must be a (device_type, device_id) tuple", &type,
                          &id))
        return -1;
    int mine = t->mem.device_type == WS_HOST_CUDA ? WS_DL_CUDA : WS_DL_CPU;
    if (type != mine || (mine == WS_DL_CUDA && id != t->mem.device_index)) {
        PyErr_Format(PyExc_BufferError,
                     "__dlpack__: dl_device (%ld, %ld) differs from the tensor's device; wshost "
                     "exports views only, with no copy to another device", type, id);
        return -1;
    }
    return 0;
}

static PyObject *tensor_dlpack(TensorObject *t, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$OOO:__dlpack__", kwlist, &stream, &max_version,
                                     &dl_device, &copy))
        return NULL;
    if (tensor_check_live(t, "__dlpack__") != 0) return NULL;
    if (copy != Py_None && PyObject_IsTrue(copy)) {
        PyErr_SetString(PyExc_BufferError, "__dlpack__: copy=True: wshost exports views only");
        return NULL;
    }
    if (dl_device != Py_None && device_matches(t, dl_device) != 0) return NULL;
    const dtype_info *dt = dtype_by_name(t->mem.dtype);
    if (!dt) return PyErr_Format(WsError, "__dlpack__: dtype '%s' has no DLPack code", t->mem.dtype);
    if (t->mem.device_type == WS_HOST_CUDA) {
        /* The consumer will use `stream`: wshost's own work on the memory
         * must be complete first (stream -1: the consumer asked for no
         * synchronization). */
        long long s = -2;
        if (stream != Py_None) {
            s = PyLong_AsLongLong(stream);
            if (s == -1 && PyErr_Occurred()) return NULL;
        }
        if (s != -1) {
            char err[512];
            int rc;
            Py_BEGIN_ALLOW_THREADS
            rc = ws_host_cuda_synchronize(t->mem.device_index, err, sizeof err);
            Py_END_ALLOW_THREADS
            if (rc != 0) return PyErr_Format(WsError, "__dlpack__: %s", err);
        }
    } else if (stream != Py_None) {
        PyErr_SetString(PyExc_BufferError, "__dlpack__: stream must be None for a cpu tensor");
        return NULL;
    }
    export_ctx *e = PyMem_RawCalloc(1, sizeof *e);
    if (!e) return PyErr_NoMemory();
    int64_t stride = 1;
    for (int k = t->mem.ndim - 1; k >= 0; k--) {
        e->shape[k] = t->mem.shape[k];
        e->strides[k] = stride;
        stride *= t->mem.shape[k];
    }
    ws_dl_tensor *d = &e->m.dl_tensor;
    d->data = t->mem.data;
    d->device.device_type = t->mem.device_type == WS_HOST_CUDA ? WS_DL_CUDA : WS_DL_CPU;
    d->device.device_id = t->mem.device_type == WS_HOST_CUDA ? t->mem.device_index : 0;
    d->ndim = t->mem.ndim;
    d->dtype = dt->dl;
    d->shape = e->shape;
    d->strides = e->strides;
    d->byte_offset = 0;
    e->m.manager_ctx = e;
    e->m.deleter = export_deleter;
    e->owner = t;
    PyObject *cap = PyCapsule_New(&e->m, "dltensor", capsule_destructor);
    if (!cap) {
        PyMem_RawFree(e);
        return NULL;
    }
    Py_INCREF(t);
    t->exports++;
    return cap;
}

static PyObject *tensor_dlpack_device(TensorObject *t, PyObject *unused)
{
    if (t->mem.device_type == WS_HOST_CUDA) return Py_BuildValue("(ii)", WS_DL_CUDA, t->mem.device_index);
    return Py_BuildValue("(ii)", WS_DL_CPU, 0);
}

static PyMethodDef tensor_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))tensor_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(stream=None, *, max_version=None, dl_device=None, copy=None): a DLPack capsule "
     "viewing this tensor's memory (no copy); the view keeps the tensor alive."},
    {"__dlpack_device__", (PyCFunction)tensor_dlpack_device, METH_NOARGS,
     "(device_type, device_id) in DLPack's numbering: (1, 0) cpu, (2, n) cuda:n."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef tensor_getset[] = {
    {"shape", (getter)tensor_shape, NULL, "tuple of sizes", NULL},
    {"dtype", (getter)tensor_dtype, NULL, "wshost dtype name: f32 bf16 f16 fp8 u8 i32 i64", NULL},
    {"device", (getter)tensor_device, NULL, "'cpu' or 'cuda:N'", NULL},
    {"data_ptr", (getter)tensor_data_ptr, NULL, "address of the first byte (0 once freed)", NULL},
    {"nbytes", (getter)tensor_nbytes, NULL, "size in bytes", NULL},
    {"name", (getter)tensor_name, NULL, "name (Session.alloc), or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject TensorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "wshost.Tensor",
    .tp_basicsize = sizeof(TensorObject),
    .tp_dealloc = (destructor)tensor_dealloc,
    .tp_repr = (reprfunc)tensor_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memory wshost shows to Python: from wshost.from_dlpack (someone else's, zero copy) "
              "or Session.alloc (wshost's sleepable pool). Exports DLPack: torch.from_dlpack(t).",
    .tp_methods = tensor_methods,
    .tp_getset = tensor_getset,
};

/* ---- from_dlpack ------------------------------------------------------------------------ */

static PyObject *get_capsule(PyObject *obj)
{
    if (PyCapsule_CheckExact(obj)) {
        Py_INCREF(obj);
        return obj;
    }
    PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (!dev) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            return PyErr_Format(PyExc_TypeError,
                                "from_dlpack: a %s has no __dlpack__ / __dlpack_device__ (pass a "
                                "torch tensor or any DLPack producer)", Py_TYPE(obj)->tp_name);
        }
        return NULL;
    }
    long type, id;
    int ok = PyArg_ParseTuple(dev, "ll;__dlpack_device__ must return (device_type, device_id)",
                              &type, &id);
    Py_DECREF(dev);
    if (!ok) return NULL;
    if (type != WS_DL_CUDA) return PyObject_CallMethod(obj, "__dlpack__", NULL);
    /* The producer orders its pending work before wshost's stream (see
     * ws_host_cuda_stream); without CUDA in wshost, the legacy default. */
    void *stream = ws_host_cuda_stream((int)id);
    PyObject *s = stream ? PyLong_FromVoidPtr(stream) : PyLong_FromLong(1);
    if (!s) return NULL;
    PyObject *kw = Py_BuildValue("{s:O}", "stream", s);
    Py_DECREF(s);
    if (!kw) return NULL;
    PyObject *meth = PyObject_GetAttrString(obj, "__dlpack__");
    PyObject *empty = PyTuple_New(0);
    PyObject *cap = meth && empty ? PyObject_Call(meth, empty, kw) : NULL;
    Py_XDECREF(meth);
    Py_XDECREF(empty);
    Py_DECREF(kw);
    return cap;
}

/* Fills t->mem from the DLPack tensor; raises naming what wshost cannot take. */
static int describe(TensorObject *t, const ws_dl_tensor *d)
{
    if (d->ndim < 0 || d->ndim > WS_HOST_MAX_DIMS) {
        PyErr_Format(WsError, "from_dlpack: %d dimensions (wshost takes up to %d)", (int)d->ndim,
                     WS_HOST_MAX_DIMS);
        return -1;
    }
    const dtype_info *dt = dtype_by_dl(d->dtype);
    if (!dt) {
        PyErr_Format(WsError,
                     "from_dlpack: DLPack dtype (code %d, %d bits, %d lanes) is not one wshost "
                     "takes (f32, bf16, f16, fp8 e4m3fn, u8, i32, i64)",
                     d->dtype.code, d->dtype.bits, d->dtype.lanes);
        return -1;
    }
    int type = d->device.device_type;
    if (type != WS_DL_CPU && type != WS_DL_CUDA && type != WS_DL_CUDA_HOST) {
        PyErr_Format(WsError, "from_dlpack: DLPack device type %d is not cpu (1), cuda (2) or "
                     "pinned host memory (3)", type);
        return -1;
    }
    char shape[200] = "", strides[200] = "";
    size_t as = 0, at = 0;
    for (int k = 0; k < d->ndim; k++) {
        as += (size_t)snprintf(shape + as, as < sizeof shape ? sizeof shape - as : 0, "%s%lld",
                               k ? ", " : "", (long long)d->shape[k]);
        if (d->strides)
            at += (size_t)snprintf(strides + at, at < sizeof strides ? sizeof strides - at : 0,
                                   "%s%lld", k ? ", " : "", (long long)d->strides[k]);
    }
    int64_t numel = 1;
    for (int k = 0; k < d->ndim; k++) {
        if (d->shape[k] < 0) {
            PyErr_Format(WsError, "from_dlpack: negative size in shape [%s]", shape);
            return -1;
        }
        numel *= d->shape[k];
    }
    /* Dense row-major: each stride is the product of the sizes after it. A
     * dimension of size 1 may carry any stride, and an empty tensor has no
     * bytes to lay out. */
    int dense = 1;
    for (int64_t k = d->ndim - 1, expect = 1; k >= 0 && d->strides && numel > 0; k--) {
        if (d->shape[k] != 1 && d->strides[k] != expect) dense = 0;
        expect *= d->shape[k];
    }
    if (!dense) {
        PyErr_Format(WsError,
                     "from_dlpack: tensor of shape [%s] with strides [%s] is not contiguous; "
                     "wshost takes dense row-major memory only (pass t.contiguous(), which "
                     "copies, or register the tensor it is a view of)",
                     shape, strides);
        return -1;
    }
    t->mem.data = (char *)d->data + d->byte_offset;
    t->mem.nbytes = (size_t)numel * (d->dtype.bits / 8);
    t->mem.device_type = type == WS_DL_CUDA ? WS_HOST_CUDA : WS_HOST_CPU;
    t->mem.device_index = type == WS_DL_CUDA ? d->device.device_id : 0;
    t->mem.dtype = dt->name;
    t->mem.ndim = d->ndim;
    for (int k = 0; k < d->ndim; k++) t->mem.shape[k] = d->shape[k];
    return 0;
}

PyObject *py_from_dlpack(PyObject *mod, PyObject *obj)
{
    PyObject *cap = get_capsule(obj);
    if (!cap) return NULL;
    if (!PyCapsule_IsValid(cap, "dltensor")) {
        const char *name = PyCapsule_GetName(cap);
        PyErr_Clear();
        PyErr_Format(WsError, "from_dlpack: the capsule is %s",
                     name && !strcmp(name, "used_dltensor")
                         ? "already consumed ('used_dltensor'): a DLPack capsule can be taken once"
                         : "not a DLPack 'dltensor' capsule");
        Py_DECREF(cap);
        return NULL;
    }
    ws_dl_managed *m = PyCapsule_GetPointer(cap, "dltensor");
    TensorObject *t = m ? (TensorObject *)tensor_new_raw() : NULL;
    if (!t || describe(t, &m->dl_tensor) != 0) {
        Py_XDECREF(t);
        Py_DECREF(cap); /* not consumed: its destructor deletes the producer's tensor */
        return NULL;
    }
    if (PyCapsule_SetName(cap, "used_dltensor") != 0) {
        Py_DECREF(t);
        Py_DECREF(cap);
        return NULL;
    }
    t->managed = m; /* ours now: deleted in tensor_dealloc */
    Py_DECREF(cap);
    return (PyObject *)t;
}

/* ---- Session ------------------------------------------------------------------------------ */

static PyObject *host_error(SessionObject *s)
{
    if (s->callback_error && s->reraise) {
        /* Ctrl-C or sys.exit() inside a callback: the same exception, so the
         * program stops as it would have without wshost in between. */
        PyObject *v = s->callback_error;
        s->callback_error = NULL;
        s->reraise = 0;
        PyErr_SetObject((PyObject *)Py_TYPE(v), v);
        Py_DECREF(v);
        return NULL;
    }
    PyErr_SetString(WsError, ws_host_error(s->h));
    if (s->callback_error) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value) PyException_SetCause(value, s->callback_error); /* steals */
        else Py_DECREF(s->callback_error);
        s->callback_error = NULL;
        PyErr_Restore(type, value, tb);
    }
    return NULL;
}

static int session_usable(SessionObject *s, const char *what)
{
    if (!s->h) {
        PyErr_Format(WsError, "%s: the session was not opened", what);
        return -1;
    }
    if (s->in_call) {
        PyErr_Format(WsError, "%s: called while a step or close of this session runs (from a "
                     "callback or another thread)", what);
        return -1;
    }
    if (s->closed) {
        PyErr_Format(WsError, "%s: the session was closed", what);
        return -1;
    }
    return 0;
}

/* Config values become strings (the pipeline's config converts them):
 * True/False as Lua writes them, everything else as str() does. */
static PyObject *config_text(PyObject *v)
{
    if (v == Py_True) return PyUnicode_FromString("true");
    if (v == Py_False) return PyUnicode_FromString("false");
    return PyObject_Str(v);
}

static int session_init(SessionObject *s, PyObject *args, PyObject *kw)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:Session", &path)) return -1;
    if (s->h) {
        PyErr_SetString(WsError, "Session: already opened");
        return -1;
    }
    Py_ssize_t n = kw ? PyDict_Size(kw) : 0;
    PyObject *texts = PyList_New(0); /* keeps the strings alive */
    const char **keys = PyMem_Calloc((size_t)n + 1, sizeof *keys);
    const char **values = PyMem_Calloc((size_t)n + 1, sizeof *values);
    int rc = -1;
    if (!texts || !keys || !values) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (kw && PyDict_Next(kw, &pos, &k, &v)) {
        PyObject *text = config_text(v);
        if (!text || PyList_Append(texts, text) != 0) {
            Py_XDECREF(text);
            goto done;
        }
        Py_DECREF(text);
        keys[i] = PyUnicode_AsUTF8(k);
        values[i] = PyUnicode_AsUTF8(text);
        if (!keys[i] || !values[i]) goto done;
        i++;
    }
    s->h = ws_host_new();
    if (!s->h) {
        PyErr_NoMemory();
        goto done;
    }
    int lrc;
    Py_BEGIN_ALLOW_THREADS
    lrc = ws_host_load(s->h, path, (size_t)n, keys, values);
    Py_END_ALLOW_THREADS
    if (lrc != 0) {
        host_error(s);
        ws_host_free(s->h);
        s->h = NULL;
        goto done;
    }
    rc = 0;
done:
    PyMem_Free(keys);
    PyMem_Free(values);
    Py_XDECREF(texts);
    return rc;
}

static PyObject *session_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    SessionObject *s = (SessionObject *)type->tp_alloc(type, 0);
    if (!s) return NULL;
    s->callbacks = PyList_New(0);
    if (!s->callbacks) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static void session_dealloc(SessionObject *s)
{
    PyObject_GC_UnTrack(s);
    /* No alloc'd Tensor is left (each holds us), so no view of our memory. */
    if (s->h) ws_host_free(s->h); /* runs the release callbacks of lent memory */
    s->h = NULL;
    Py_CLEAR(s->callbacks);
    Py_CLEAR(s->callback_error);
    PyMem_Free(s->allocs);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* One registration of on(): ud of the C callback. Kept in s->callbacks
 * (as a capsule) so it lives as long as the session. */
typedef struct callback_ctx {
    SessionObject *s; /* borrowed: the host, which calls us, dies with the session */
    PyObject *fn;
} callback_ctx;

static int session_traverse(SessionObject *s, visitproc visit, void *arg)
{
    Py_VISIT(s->callbacks);
    /* The callbacks sit in capsules, which the collector cannot see into: a
     * callback that refers back to the session (a bound method of an object
     * holding it) would otherwise keep both alive forever. */
    if (s->callbacks) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(s->callbacks); i++) {
            const callback_ctx *c =
                PyCapsule_GetPointer(PyList_GET_ITEM(s->callbacks, i), "wshost.callback");
            if (c) Py_VISIT(c->fn);
            else PyErr_Clear();
        }
    }
    Py_VISIT(s->callback_error);
    return 0;
}

static int session_clear(SessionObject *s)
{
    Py_CLEAR(s->callbacks);
    Py_CLEAR(s->callback_error);
    return 0;
}

static PyObject *session_expected(SessionObject *s, PyObject *args)
{
    const char *role;
    if (!PyArg_ParseTuple(args, "s:expected", &role)) return NULL;
    if (session_usable(s, "expected") != 0) return NULL;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    ws_host_param p;
    int rc;
    for (size_t i = 0; (rc = ws_host_expected(s->h, role, i, &p)) == 0; i++) {
        PyObject *shape = PyTuple_New(p.ndim);
        if (!shape) goto fail;
        for (int k = 0; k < p.ndim; k++) PyTuple_SET_ITEM(shape, k, PyLong_FromLongLong(p.shape[k]));
        PyObject *item = Py_BuildValue("(sNs)", p.name, shape, p.dtype);
        if (!item || PyList_Append(list, item) != 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    if (rc < 0) {
        Py_DECREF(list);
        return host_error(s);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* Lent memory goes back: drop the reference that kept the Tensor alive. */
static void release_lent(void *ctx)
{
    PyGILState_STATE g = PyGILState_Ensure();
    Py_DECREF((PyObject *)ctx);
    PyGILState_Release(g);
}

static int read_shape(PyObject *seq, const char *what, int *ndim, int64_t *shape)
{
    PyObject *fast = PySequence_Fast(seq, "");
    if (!fast) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence of ints", what);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > WS_HOST_MAX_DIMS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s has %zd dimensions (at most %d)", what, n,
                     WS_HOST_MAX_DIMS);
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, k));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_TypeError, "%s[%zd] is not an int", what, k);
            return -1;
        }
        shape[k] = v;
    }
    *ndim = (int)n;
    Py_DECREF(fast);
    return 0;
}

/* If obj is a DTensor (it has to_local and placements), *local is its
 * local tensor and *shape its global shape (new references); it must be
 * sharded as FSDP2 shards: Shard(0) on a one-dimensional mesh. Otherwise
 * both stay NULL. Returns -1 with an exception set on error. */
static int dtensor_local(const char *name, PyObject *obj, PyObject **local, PyObject **shape)
{
    *local = *shape = NULL;
    if (!PyObject_HasAttrString(obj, "to_local") || !PyObject_HasAttrString(obj, "placements"))
        return 0;
    PyObject *pl = PyObject_GetAttrString(obj, "placements");
    if (!pl) return -1;
    int ok = 0;
    if (PySequence_Check(pl) && PySequence_Size(pl) == 1) {
        PyObject *p0 = PySequence_GetItem(pl, 0);
        PyObject *r = p0 ? PyObject_CallMethod(p0, "is_shard", "i", 0) : NULL;
        ok = r && PyObject_IsTrue(r) == 1;
        Py_XDECREF(r);
        Py_XDECREF(p0);
        PyErr_Clear();
    }
    if (!ok) {
        PyObject *txt = PyObject_Repr(pl);
        PyErr_Format(WsError, "register: DTensor '%s' is placed as %s; wshost takes FSDP2's "
                     "dim-0 shards (Shard(0) on a one-dimensional mesh)", name,
                     txt ? PyUnicode_AsUTF8(txt) : "?");
        Py_XDECREF(txt);
        Py_DECREF(pl);
        return -1;
    }
    Py_DECREF(pl);
    PyObject *sz = PyObject_GetAttrString(obj, "shape");
    *shape = sz ? PySequence_Tuple(sz) : NULL;
    Py_XDECREF(sz);
    *local = *shape ? PyObject_CallMethod(obj, "to_local", NULL) : NULL;
    if (!*local) {
        Py_CLEAR(*shape);
        return -1;
    }
    return 0;
}

static PyObject *session_register(SessionObject *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"role", "name", "tensor", "global_shape", NULL};
    const char *role, *name;
    PyObject *obj, *gshape = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ssO|O:register", kwlist, &role, &name, &obj,
                                     &gshape))
        return NULL;
    if (session_usable(s, "register") != 0) return NULL;
    /* A DTensor (torch 2.x, FSDP2's parameters): its local shard, with its
     * global shape unless one is given. */
    PyObject *local = NULL, *dshape = NULL;
    if (dtensor_local(name, obj, &local, &dshape) != 0) return NULL;
    if (local) {
        obj = local;
        if (gshape == Py_None) gshape = dshape;
    }
    int64_t gs[WS_HOST_MAX_DIMS];
    int gndim = 0;
    TensorObject *t = NULL;
    if (gshape != Py_None && read_shape(gshape, "global_shape", &gndim, gs) != 0) goto fail;
    if (Py_IS_TYPE(obj, &TensorType)) {
        t = (TensorObject *)obj;
        if (t->session && t->session != s) {
            PyErr_Format(WsError, "register: %s tensor '%s' is memory another session allocated "
                         "(Session.alloc), which its close frees; allocate it in this session",
                         role, name);
            goto fail;
        }
        Py_INCREF(t);
    } else {
        /* A parameter that needs gradients cannot be exported as it is; its
         * detached view is the same memory. */
        PyObject *rg = PyObject_GetAttrString(obj, "requires_grad");
        int needs = rg && PyObject_IsTrue(rg) == 1;
        Py_XDECREF(rg);
        PyErr_Clear();
        PyObject *plain = needs ? PyObject_CallMethod(obj, "detach", NULL) : NULL;
        if (needs && !plain) goto fail;
        t = (TensorObject *)py_from_dlpack(NULL, plain ? plain : obj);
        Py_XDECREF(plain);
        if (!t) {
            /* The producer's refusal, with the tensor it is about. */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *txt = value ? PyObject_Str(value) : NULL;
            PyErr_Format(WsError, "register: %s tensor '%s': %s", role, name,
                         txt ? PyUnicode_AsUTF8(txt) : "not a DLPack tensor");
            Py_XDECREF(txt);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            goto fail;
        }
    }
    Py_XDECREF(local);
    Py_XDECREF(dshape);
    local = dshape = NULL;
    if (tensor_check_live(t, "register") != 0) {
        Py_DECREF(t);
        return NULL;
    }
    ws_host_memory m = t->mem;
    if (m.device_type == WS_HOST_CUDA) s->cuda = 1;
    m.release = release_lent;
    m.release_ctx = t; /* our reference goes to wshost, dropped by release_lent */
    if (ws_host_register(s->h, role, name, &m, gndim, gndim ? gs : NULL) != 0) return host_error(s);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(local);
    Py_XDECREF(dshape);
    return NULL;
}

static PyObject *session_alloc(SessionObject *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "shape", "dtype", NULL};
    PyObject *name, *shape_obj, *dtype_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "UOO:alloc", kwlist, &name, &shape_obj, &dtype_obj))
        return NULL;
    if (session_usable(s, "alloc") != 0) return NULL;
    int64_t shape[WS_HOST_MAX_DIMS];
    int ndim;
    if (read_shape(shape_obj, "shape", &ndim, shape) != 0) return NULL;
    PyObject *dstr = PyObject_Str(dtype_obj);
    if (!dstr) return NULL;
    const char *dname = PyUnicode_AsUTF8(dstr);
    const dtype_info *dt = dname ? dtype_by_name(dname) : NULL;
    if (!dt) {
        if (dname) PyErr_Format(PyExc_ValueError, "alloc: unknown dtype '%s' (f32, bf16, f16, fp8, "
                                "u8, i32, i64 or the torch dtype)", dname);
        Py_DECREF(dstr);
        return NULL;
    }
    Py_DECREF(dstr);
    if (s->n_allocs == s->cap_allocs) {
        size_t cap = s->cap_allocs ? 2 * s->cap_allocs : 16;
        TensorObject **a = PyMem_Realloc(s->allocs, cap * sizeof *a);
        if (!a) return PyErr_NoMemory();
        s->allocs = a;
        s->cap_allocs = cap;
    }
    TensorObject *t = (TensorObject *)tensor_new_raw();
    if (!t) return NULL;
    if (ws_host_alloc(s->h, PyUnicode_AsUTF8(name), ndim, shape, dt->name, &t->mem) != 0) {
        Py_DECREF(t);
        return host_error(s);
    }
    if (t->mem.device_type == WS_HOST_CUDA) s->cuda = 1;
    Py_INCREF(name);
    Py_SETREF(t->name, name);
    Py_INCREF(s);
    t->session = s;
    s->allocs[s->n_allocs++] = t;
    return (PyObject *)t;
}


static void callback_ctx_free(PyObject *cap)
{
    callback_ctx *c = PyCapsule_GetPointer(cap, "wshost.callback");
    if (!c) return;
    Py_XDECREF(c->fn);
    PyMem_Free(c);
}

/* Ctrl-C while a step or close runs without the GIL: Python's own handler
 * would only run at the next callback, so for the call's duration SIGINT
 * stops the host at its next Lua step (ws_host_interrupt is safe in a
 * signal handler) and the call then raises KeyboardInterrupt. Only on the
 * main thread, and only where SIGINT is not ignored. */
static ws_host *volatile sigint_host;
static volatile sig_atomic_t sigint_seen;
static struct sigaction sigint_saved; /* Python's, while ours is installed */
static int sigint_installed;

static void on_sigint(int sig)
{
    (void)sig;
    sigint_seen = 1;
    if (sigint_host) ws_host_interrupt(sigint_host);
}

static int sigint_begin(ws_host *h, struct sigaction *old)
{
    if (!_PyOS_IsMainThread()) return 0;
    if (sigaction(SIGINT, NULL, old) != 0 || old->sa_handler == SIG_IGN) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigint_seen = 0;
    sigint_host = h;
    sigint_saved = *old;
    sigint_installed = sigaction(SIGINT, &sa, NULL) == 0;
    return sigint_installed;
}

/* Restores the handler; 1 when Ctrl-C came during the call. */
static int sigint_end(int installed, const struct sigaction *old)
{
    if (!installed) return 0;
    sigaction(SIGINT, old, NULL);
    sigint_host = NULL;
    sigint_installed = 0;
    return sigint_seen != 0;
}

/* enter: while our handler is installed (a step runs), puts Python's back
 * for a callback and returns 1; leave (enter 0): ours again. */
static int sigint_python_during_callback(int enter)
{
    if (!sigint_installed || !_PyOS_IsMainThread()) return 0;
    if (enter) return sigaction(SIGINT, &sigint_saved, NULL) == 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    return 0;
}

/* torch.cuda.synchronize() when torch is loaded and its CUDA initialized;
 * returns r, or NULL (r dropped) with the exception set. */
PyObject *sync_torch_cuda(PyObject *r) { return sync_torch_cuda_device(r, -1); }

PyObject *sync_torch_cuda_device(PyObject *r, int device)
{
    PyObject *name = PyUnicode_FromString("torch");
    PyObject *torch = name ? PyImport_GetModule(name) : NULL;
    Py_XDECREF(name);
    if (!torch) {
        PyErr_Clear();
        return r;
    }
    PyObject *cuda = PyObject_GetAttrString(torch, "cuda");
    Py_DECREF(torch);
    PyObject *ready = cuda ? PyObject_CallMethod(cuda, "is_initialized", NULL) : NULL;
    if (!ready) PyErr_Clear(); /* no torch.cuda: nothing of torch's runs on a GPU */
    PyObject *done = ready && PyObject_IsTrue(ready) == 1
                         ? (device < 0 ? PyObject_CallMethod(cuda, "synchronize", NULL)
                                       : PyObject_CallMethod(cuda, "synchronize", "i", device))
                         : Py_NewRef(Py_None);
    Py_XDECREF(ready);
    Py_XDECREF(cuda);
    if (!done) {
        Py_DECREF(r);
        return NULL;
    }
    Py_DECREF(done);
    return r;
}

static int call_python(void *ud, const char *event, long long arg, const char *sarg, char *err,
                       size_t errlen)
{
    callback_ctx *c = ud;
    PyGILState_STATE g = PyGILState_Ensure();
    /* Python code runs: Python's own Ctrl-C handling, so a callback that
     * waits (a collective, a sleep) can be interrupted. */
    int ours = sigint_python_during_callback(1);
    PyObject *r = sarg ? PyObject_CallFunction(c->fn, "s", sarg)
                       : PyObject_CallFunction(c->fn, "L", arg);
    if (ours) sigint_python_during_callback(0);
    /* What the callback queued on the caller's own CUDA streams (an optimizer
     * step) must be done before wshost's streams read it: DLPack's stream
     * handshake covers the export, not later writes. */
    if (r && c->s->cuda) r = sync_torch_cuda(r);
    int rc = 0;
    if (!r) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        c->s->reraise = type && (PyErr_GivenExceptionMatches(type, PyExc_KeyboardInterrupt) ||
                                 PyErr_GivenExceptionMatches(type, PyExc_SystemExit));
        if (tb && value) PyException_SetTraceback(value, tb);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        const char *msg = text ? PyUnicode_AsUTF8(text) : NULL;
        if (!msg) PyErr_Clear();
        snprintf(err, errlen, "%s: %s", type ? ((PyTypeObject *)type)->tp_name : "error",
                 msg ? msg : "(no message)");
        Py_XDECREF(text);
        Py_XSETREF(c->s->callback_error, value); /* becomes the step error's __cause__ */
        Py_XDECREF(type);
        Py_XDECREF(tb);
        rc = 1;
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
    return rc;
}

static PyObject *session_on(SessionObject *s, PyObject *args)
{
    const char *event;
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "sO:on", &event, &fn)) return NULL;
    if (!PyCallable_Check(fn)) return PyErr_Format(PyExc_TypeError, "on: fn must be callable");
    if (session_usable(s, "on") != 0) return NULL;
    callback_ctx *c = PyMem_Malloc(sizeof *c);
    if (!c) return PyErr_NoMemory();
    c->s = s;
    c->fn = fn;
    Py_INCREF(fn);
    PyObject *cap = PyCapsule_New(c, "wshost.callback", callback_ctx_free);
    if (!cap) {
        Py_DECREF(fn);
        PyMem_Free(c);
        return NULL;
    }
    int rc = PyList_Append(s->callbacks, cap);
    Py_DECREF(cap);
    if (rc != 0) return NULL;
    if (ws_host_on(s->h, event, call_python, c) != 0) return host_error(s);
    Py_RETURN_NONE;
}

static PyObject *json_to_dict(char *text)
{
    PyObject *json = PyImport_ImportModule("json");
    PyObject *r = json ? PyObject_CallMethod(json, "loads", "s", text) : NULL;
    Py_XDECREF(json);
    ws_host_free_string(text);
    return r;
}

static PyObject *session_step(SessionObject *s, PyObject *unused)
{
    if (session_usable(s, "step") != 0) return NULL;
    char *rec = NULL;
    int rc;
    s->in_call = 1;
    struct sigaction old_int;
    int installed = sigint_begin(s->h, &old_int);
    Py_BEGIN_ALLOW_THREADS
    rc = ws_host_step(s->h, &rec);
    Py_END_ALLOW_THREADS
    int interrupted = sigint_end(installed, &old_int);
    s->in_call = 0;
    if (interrupted) {
        /* Ctrl-C at any moment of the call, even one that then completed. */
        free(rec);
        PyErr_SetString(PyExc_KeyboardInterrupt, rc != 0 ? ws_host_error(s->h) : "interrupted!");
        return NULL;
    }
    if (rc != 0) return host_error(s);
    Py_CLEAR(s->callback_error);
    return json_to_dict(rec);
}

static PyObject *session_close(SessionObject *s, PyObject *unused)
{
    if (session_usable(s, "close") != 0) return NULL;
    /* Memory a view still uses must not be freed: refuse, free nothing. */
    for (size_t i = 0; i < s->n_allocs; i++) {
        TensorObject *t = s->allocs[i];
        if (t->exports > 0) {
            char label[300];
            return PyErr_Format(WsError,
                                "close: tensor %s from Session.alloc is still viewed by %zd "
                                "DLPack consumer(s) (a torch tensor made with from_dlpack); "
                                "delete those views first, nothing was freed",
                                tensor_label(t, label, sizeof label), t->exports);
        }
    }
    char *summary = NULL;
    int rc;
    s->in_call = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = ws_host_close(s->h, &summary);
    Py_END_ALLOW_THREADS
    s->in_call = 0;
    s->closed = 1;
    for (size_t i = 0; i < s->n_allocs; i++) {
        s->allocs[i]->mem.data = NULL;
        s->allocs[i]->freed_by = "Session.close()";
    }
    if (rc != 0) return host_error(s);
    return json_to_dict(summary);
}

static PyObject *session_enter(SessionObject *s, PyObject *unused)
{
    Py_INCREF(s);
    return (PyObject *)s;
}

static PyObject *session_exit(SessionObject *s, PyObject *args)
{
    if (s->h && !s->closed) {
        PyObject *r = session_close(s, NULL);
        if (!r) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_FALSE;
}

static PyObject *session_closed(SessionObject *s, void *c) { return PyBool_FromLong(s->closed); }

static PyMethodDef session_methods[] = {
    {"expected", (PyCFunction)session_expected, METH_VARARGS,
     "expected(role) -> [(name, shape, dtype), ...]: the tensors role ('trainer', 'adapter', "
     "'engine') must register."},
    {"register", (PyCFunction)(void (*)(void))session_register, METH_VARARGS | METH_KEYWORDS,
     "register(role, name, tensor, global_shape=None): lends tensor's memory (anything with "
     "__dlpack__, or a wshost.Tensor) as role's tensor name; global_shape: the full shape when "
     "tensor is this rank's dim-0 shard."},
    {"alloc", (PyCFunction)(void (*)(void))session_alloc, METH_VARARGS | METH_KEYWORDS,
     "alloc(name, shape, dtype) -> wshost.Tensor in the session's sleepable weights pool."},
    {"on", (PyCFunction)session_on, METH_VARARGS,
     "on(event, fn): fn(step) on 'train' and 'rollout', fn(level) on 'sleep', fn(tag) on 'wake'. "
     "An exception in fn fails the step."},
    {"step", (PyCFunction)session_step, METH_NOARGS, "step() -> dict: runs one step."},
    {"close", (PyCFunction)session_close, METH_NOARGS,
     "close() -> dict: ends the session and frees wshost's memory (refused while a DLPack view "
     "of an alloc'd tensor is alive)."},
    {"__enter__", (PyCFunction)session_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)session_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef session_getset[] = {
    {"closed", (getter)session_closed, NULL, "whether close() ran", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "wshost.Session",
    .tp_basicsize = sizeof(SessionObject),
    .tp_dealloc = (destructor)session_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Session(pipeline_path, **config): a wshost pipeline session run in this process.",
    .tp_traverse = (traverseproc)session_traverse,
    .tp_clear = (inquiry)session_clear,
    .tp_methods = session_methods,
    .tp_getset = session_getset,
    .tp_init = (initproc)session_init,
    .tp_new = session_new,
};

/* ---- module ----------------------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"from_dlpack", py_from_dlpack, METH_O,
     "from_dlpack(obj) -> wshost.Tensor viewing obj's memory (no copy): obj has __dlpack__ (a "
     "torch tensor) or is a DLPack capsule. The memory must be dense row-major."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, .m_name = "wshost",
    .m_doc = "wshost in Python: DLPack tensors, pipeline sessions and the server-mode receiver "
             "(docs/python.md).",
    .m_size = -1, .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit_wshost(void);
PyMODINIT_FUNC PyInit_wshost(void)
{
    if (PyType_Ready(&TensorType) < 0 || PyType_Ready(&SessionType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    WsError = PyErr_NewExceptionWithDoc("wshost.Error", "A failure reported by wshost.",
                                        PyExc_RuntimeError, NULL);
    if (!WsError || PyModule_AddObjectRef(m, "Error", WsError) < 0 ||
        PyModule_AddObjectRef(m, "Tensor", (PyObject *)&TensorType) < 0 ||
        PyModule_AddObjectRef(m, "Session", (PyObject *)&SessionType) < 0 ||
        receiver_py_init(m) < 0 ||
        PyModule_AddStringConstant(m, "__version__", ws_host_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
