/* receiver_py.c: wshost.Receiver, the engine side of server mode.
 *
 * An engine process registers its own parameters (torch tensors through
 * DLPack, zero copy) and serves a trainer process that sends weights through
 * shared-memory slots (remote.h, docs/server-mode.md):
 *
 *     r = wshost.Receiver("wshost-job-0")       # listens; nothing on disk
 *     r.add(name, tensor)                        # each parameter, kept alive
 *     r.on("wake", fn); r.on("sleep", fn)        # run inside serve()/next()
 *     r.serve()                                  # until the trainer closes
 *
 * serve() and next() run without the GIL: another thread (the engine's
 * rollouts) runs while this one waits and copies, and the callbacks take the
 * GIL back. On the main thread Python's signal handlers are run at every
 * liveness check of a wait (at least every 200 ms), so Ctrl-C raises
 * KeyboardInterrupt at once. stop() (or close()) from another thread ends a
 * serve() there within the same time.
 *
 * The core is linked into the module (libwshost exports only ws.h); this
 * copy of it serves the receivers, libwshost's the sessions. */
#include "wshost_py.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "device.h"
#include "dtype.h"
#include "remote.h"
#include "status.h"
#include "tensor.h"

typedef struct ReceiverObject {
    PyObject_HEAD
    ws_receiver *r;       /* NULL: closed or never opened */
    PyObject *name;       /* the channel name */
    PyObject *on_wake, *on_sleep;
    PyObject *callback_error; /* the latest exception of a callback (last_error) */
    int reraise;              /* it is KeyboardInterrupt or SystemExit: stop and raise it */
    int callback_raised;      /* a callback failed during the running call */
    PyObject *signal_error;   /* what Python's signal handlers raised during a wait */
    int main_thread;          /* the running serve/next is on the main thread */
    int in_callback;
    int cuda;                 /* a CUDA tensor was added */
    atomic_int stop;          /* stop(): the running (or next) serve/next returns */
    atomic_int closing;       /* close() waits for a serve/next in another thread */
    atomic_int busy;          /* a serve/next runs (maybe without the GIL) */
    unsigned long busy_thread;
    /* Snapshots taken by the serving thread after every message, so that
     * another thread reads them without touching the receiver. */
    atomic_int peer_pid;
    atomic_int state;
    _Atomic uint64_t valid_version;
    uint64_t messages, buckets, bucket_bytes, syncs;
} ReceiverObject;

static PyTypeObject ReceiverType;

static void snapshot(ReceiverObject *o)
{
    uint64_t v = 0;
    ws_weights_state st = ws_receiver_state(o->r, &v);
    atomic_store(&o->state, (int)st);
    atomic_store(&o->valid_version, v);
    atomic_store(&o->peer_pid, (int)ws_receiver_peer_pid(o->r));
}

/* ---- callbacks from the core (no GIL held) ------------------------------------------ */

/* The exception a callback raised: kept for last_error, turned into the
 * status the receiver reports to the sender ("ValueError: text"). */
static ws_status callback_failed(ReceiverObject *o)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    o->reraise = type && (PyErr_GivenExceptionMatches(type, PyExc_KeyboardInterrupt) ||
                          PyErr_GivenExceptionMatches(type, PyExc_SystemExit));
    if (tb && value) PyException_SetTraceback(value, tb);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *msg = text ? PyUnicode_AsUTF8(text) : NULL;
    if (!msg) PyErr_Clear();
    ws_status rc = WS_ERR(WS_ERR_ARG, "%s: %s", type ? ((PyTypeObject *)type)->tp_name : "error",
                          msg && *msg ? msg : "(no message)");
    Py_XDECREF(text);
    Py_XSETREF(o->callback_error, value);
    o->callback_raised = 1;
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return rc;
}

static ws_status call_back(ReceiverObject *o, PyObject *fn, const char *tag, int level)
{
    if (!fn) return WS_OK;
    PyGILState_STATE g = PyGILState_Ensure();
    o->in_callback = 1;
    PyObject *r = tag ? PyObject_CallFunction(fn, "s", tag) : PyObject_CallFunction(fn, "i", level);
    o->in_callback = 0;
    /* What the callback queued on torch's streams (a restore from a backup)
     * is done before the receiver writes the same memory. */
    if (r && o->cuda) r = sync_torch_cuda(r);
    ws_status rc = r ? WS_OK : callback_failed(o);
    Py_XDECREF(r);
    PyGILState_Release(g);
    return rc;
}

static ws_status on_wake(void *ctx, const char *tag)
{
    ReceiverObject *o = ctx;
    return call_back(o, o->on_wake, tag, 0);
}

static ws_status on_sleep(void *ctx, int level)
{
    ReceiverObject *o = ctx;
    return call_back(o, o->on_sleep, NULL, level);
}

/* Polled by every wait of the receiver. */
static int interrupted(void *ctx)
{
    ReceiverObject *o = ctx;
    if (atomic_load(&o->stop) || atomic_load(&o->closing) || o->reraise) return 1;
    if (!o->main_thread) return 0; /* Python runs signal handlers on the main thread only */
    PyGILState_STATE g = PyGILState_Ensure();
    int stop = 0;
    if (PyErr_CheckSignals() < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb && value) PyException_SetTraceback(value, tb);
        Py_XSETREF(o->signal_error, value);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        stop = 1;
    }
    PyGILState_Release(g);
    return stop;
}

/* ---- lifetime --------------------------------------------------------------------- */

static int usable(ReceiverObject *o, const char *what)
{
    if (!o->r) {
        PyErr_Format(WsError, "Receiver.%s: the receiver is closed", what);
        return -1;
    }
    if (atomic_load(&o->closing)) {
        PyErr_Format(WsError, "Receiver.%s: the receiver is closing", what);
        return -1;
    }
    if (atomic_load(&o->busy)) {
        PyErr_Format(WsError, "Receiver.%s: called while serve() or next() runs (%s)", what,
                     o->in_callback && o->busy_thread == PyThread_get_thread_ident()
                         ? "from its wake or sleep callback"
                         : "in another thread; stop() it first");
        return -1;
    }
    return 0;
}

static PyObject *receiver_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    ReceiverObject *o = (ReceiverObject *)type->tp_alloc(type, 0);
    return (PyObject *)o; /* tp_alloc zeroes: closed until __init__ */
}

static int receiver_init(ReceiverObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "timeout_ms", NULL};
    PyObject *name;
    int timeout_ms = 30000;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "U|i:Receiver", kwlist, &name, &timeout_ms))
        return -1;
    if (o->r) {
        PyErr_SetString(WsError, "Receiver: already opened");
        return -1;
    }
    if (timeout_ms <= 0) {
        PyErr_Format(PyExc_ValueError, "Receiver: timeout_ms must be positive, not %d", timeout_ms);
        return -1;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (!cname) return -1;
    ws_receiver_opts opts = {.timeout_ms = timeout_ms, .on_wake = on_wake, .on_sleep = on_sleep,
                             .interrupted = interrupted, .ctx = o};
    ws_status rc = ws_receiver_create(cname, &opts, &o->r);
    if (rc != WS_OK) {
        PyErr_SetString(WsError, ws_errmsg());
        return -1;
    }
    Py_INCREF(name);
    Py_XSETREF(o->name, name);
    snapshot(o);
    return 0;
}

static void receiver_free(ReceiverObject *o)
{
    if (!o->r) return;
    ws_receiver *r = o->r;
    o->r = NULL;
    ws_receiver_free(r); /* lets go of the tensors: release_tensor takes the GIL itself */
    atomic_store(&o->peer_pid, 0);
}

static int receiver_traverse(ReceiverObject *o, visitproc visit, void *arg)
{
    Py_VISIT(o->on_wake);
    Py_VISIT(o->on_sleep);
    Py_VISIT(o->callback_error);
    Py_VISIT(o->signal_error);
    return 0;
}

static int receiver_clear(ReceiverObject *o)
{
    Py_CLEAR(o->on_wake);
    Py_CLEAR(o->on_sleep);
    Py_CLEAR(o->callback_error);
    Py_CLEAR(o->signal_error);
    return 0;
}

static void receiver_dealloc(ReceiverObject *o)
{
    PyObject_GC_UnTrack(o);
    receiver_free(o); /* no call runs: it would hold a reference to us */
    receiver_clear(o);
    Py_CLEAR(o->name);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

/* ---- add, on ------------------------------------------------------------------------ */

/* The memory goes back: drop the reference that kept its Tensor alive. */
static void release_tensor(void *ctx)
{
    PyGILState_STATE g = PyGILState_Ensure();
    Py_DECREF((PyObject *)ctx);
    PyGILState_Release(g);
}

/* A new reference to obj as a wshost.Tensor, or NULL with wshost.Error
 * naming the tensor. */
static TensorObject *as_tensor(const char *name, PyObject *obj)
{
    if (Py_IS_TYPE(obj, &TensorType)) {
        TensorObject *t = (TensorObject *)obj;
        if (t->session) {
            PyErr_Format(WsError, "Receiver.add: tensor '%s' is memory a Session allocated "
                         "(Session.alloc), which its close frees; add memory the engine owns",
                         name);
            return NULL;
        }
        Py_INCREF(t);
        return t;
    }
    /* A parameter that needs gradients cannot be exported as it is; its
     * detached view is the same memory. */
    PyObject *rg = PyObject_GetAttrString(obj, "requires_grad");
    int needs = rg && PyObject_IsTrue(rg) == 1;
    Py_XDECREF(rg);
    PyErr_Clear();
    PyObject *plain = needs ? PyObject_CallMethod(obj, "detach", NULL) : NULL;
    if (needs && !plain) return NULL;
    TensorObject *t = (TensorObject *)py_from_dlpack(NULL, plain ? plain : obj);
    Py_XDECREF(plain);
    if (!t) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *txt = value ? PyObject_Str(value) : NULL;
        const char *msg = txt ? PyUnicode_AsUTF8(txt) : NULL;
        if (!msg) PyErr_Clear();
        PyErr_Format(WsError, "Receiver.add: tensor '%s': %s", name, msg ? msg : "not a DLPack tensor");
        Py_XDECREF(txt);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    return t;
}

static PyObject *receiver_add(ReceiverObject *o, PyObject *args)
{
    const char *name;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "sO:add", &name, &obj)) return NULL;
    if (usable(o, "add") != 0) return NULL;
    TensorObject *t = as_tensor(name, obj);
    if (!t) return NULL;
    if (tensor_check_live(t, "Receiver.add") != 0) {
        Py_DECREF(t);
        return NULL;
    }
    ws_dtype dt;
    if (ws_dtype_parse(t->mem.dtype, &dt) != 0) {
        Py_DECREF(t);
        return PyErr_Format(WsError, "Receiver.add: tensor '%s': dtype '%s' unknown to the core",
                            name, t->mem.dtype);
    }
    ws_device *dev = ws_device_cpu();
    if (t->mem.device_type == WS_HOST_CUDA) {
        char dname[32];
        snprintf(dname, sizeof dname, "cuda:%d", t->mem.device_index);
        if (ws_device_get(dname, &dev) != WS_OK) {
            Py_DECREF(t);
            return PyErr_Format(WsError, "Receiver.add: tensor '%s': %s", name, ws_errmsg());
        }
        o->cuda = 1;
        /* The receiver writes on its own copy of wshost's streams, which
         * DLPack's handshake (made with the library's) did not order after
         * torch's work: what torch queued on this tensor is done first. */
        PyObject *done = sync_torch_cuda_device(Py_NewRef(Py_None), t->mem.device_index);
        if (!done) {
            Py_DECREF(t);
            return NULL;
        }
        Py_DECREF(done);
    }
    int64_t shape[WS_MAX_DIMS];
    for (int k = 0; k < t->mem.ndim; k++) shape[k] = t->mem.shape[k];
    ws_external ext = {.data = t->mem.data, .nbytes = t->mem.nbytes, .device = dev,
                       .read_only = 0, .source = "a tensor added to wshost.Receiver",
                       .release = release_tensor, .release_ctx = t};
    ws_tensor view;
    if (ws_tensor_external(&view, &ext, dt, t->mem.ndim, shape, name) != WS_OK) {
        Py_DECREF(t); /* not taken: the release was not called */
        return PyErr_Format(WsError, "Receiver.add: %s", ws_errmsg());
    }
    /* From here the storage owns our reference to t. */
    ws_status rc = ws_receiver_add(o->r, name, &view);
    ws_tensor_free(&view); /* the receiver's own view keeps the memory, if it took it */
    if (rc != WS_OK) return PyErr_Format(WsError, "Receiver.add: %s", ws_errmsg());
    Py_RETURN_NONE;
}

/* A Receiver.alloc tensor keeps the core's view of the shared memory (and
 * so the mapping) until the Python tensor goes. */
static void free_core_view(ws_dl_managed *m)
{
    ws_tensor *v = m->manager_ctx;
    ws_tensor_free(v);
    PyMem_RawFree(v);
    PyMem_RawFree(m);
}

static PyObject *receiver_alloc(ReceiverObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "shape", "dtype", NULL};
    const char *name, *dtype = "bf16";
    PyObject *shape_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO|s:alloc", kwlist, &name, &shape_obj, &dtype))
        return NULL;
    if (usable(o, "alloc") != 0) return NULL;
    ws_dtype dt;
    if (ws_dtype_parse(dtype, &dt) != 0)
        return PyErr_Format(PyExc_ValueError, "Receiver.alloc: tensor '%s': unknown dtype '%s'",
                            name, dtype);
    PyObject *seq = PySequence_Fast(shape_obj, "Receiver.alloc: shape must be a sequence of ints");
    if (!seq) return NULL;
    Py_ssize_t ndim = PySequence_Fast_GET_SIZE(seq);
    int64_t shape[WS_MAX_DIMS];
    if (ndim > WS_MAX_DIMS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "Receiver.alloc: tensor '%s': at most %d "
                            "dimensions", name, WS_MAX_DIMS);
    }
    for (Py_ssize_t k = 0; k < ndim; k++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, k));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (v < 0) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "Receiver.alloc: tensor '%s': negative "
                                "dimension %lld", name, v);
        }
        shape[k] = (int64_t)v;
    }
    Py_DECREF(seq);
    ws_tensor *v = PyMem_RawCalloc(1, sizeof *v);
    ws_dl_managed *m = PyMem_RawCalloc(1, sizeof *m);
    TensorObject *t = (TensorObject *)tensor_new_raw();
    PyObject *pyname = PyUnicode_FromString(name);
    if (!v || !m || !t || !pyname) {
        PyMem_RawFree(v);
        PyMem_RawFree(m);
        Py_XDECREF(t);
        Py_XDECREF(pyname);
        return PyErr_NoMemory();
    }
    void *data = NULL;
    ws_status rc = ws_receiver_alloc(o->r, name, dt, (int)ndim, shape, v);
    if (rc == WS_OK) rc = ws_tensor_access(v, WS_ACCESS_WRITE, "Receiver.alloc", &data);
    if (rc != WS_OK) {
        PyErr_Format(WsError, "Receiver.alloc: %s", ws_errmsg());
        ws_tensor_free(v);
        PyMem_RawFree(v);
        PyMem_RawFree(m);
        Py_DECREF(t);
        Py_DECREF(pyname);
        return NULL;
    }
    t->mem.data = data;
    t->mem.nbytes = ws_tensor_nbytes(v);
    t->mem.device_type = WS_HOST_CPU;
    t->mem.dtype = ws_dtype_name(dt);
    t->mem.ndim = (int)ndim;
    for (Py_ssize_t k = 0; k < ndim; k++) t->mem.shape[k] = shape[k];
    m->manager_ctx = v;
    m->deleter = free_core_view;
    t->managed = m;
    Py_SETREF(t->name, pyname);
    return (PyObject *)t;
}

static PyObject *receiver_on(ReceiverObject *o, PyObject *args)
{
    const char *event;
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "sO:on", &event, &fn)) return NULL;
    if (fn != Py_None && !PyCallable_Check(fn))
        return PyErr_Format(PyExc_TypeError, "Receiver.on: fn must be callable or None");
    if (usable(o, "on") != 0) return NULL;
    PyObject **slot = !strcmp(event, "wake") ? &o->on_wake : !strcmp(event, "sleep") ? &o->on_sleep : NULL;
    if (!slot)
        return PyErr_Format(WsError, "Receiver.on: unknown event '%s' (the engine's events are "
                            "'wake' and 'sleep'; 'train' and 'rollout' belong to the trainer's "
                            "Session)", event);
    Py_XSETREF(*slot, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_RETURN_NONE;
}

/* ---- serving ------------------------------------------------------------------------ */

static int read_timeout(PyObject *timeout, const char *what, int *ms)
{
    *ms = -1;
    if (timeout == Py_None) return 0;
    double s = PyFloat_AsDouble(timeout);
    if (s == -1.0 && PyErr_Occurred()) return -1;
    if (!(s >= 0) || s > 2e6) {
        PyErr_Format(PyExc_ValueError, "Receiver.%s: timeout must be None or 0 to 2e6 seconds", what);
        return -1;
    }
    *ms = (int)(s * 1000.0 + 0.5);
    return 0;
}

static void call_begin(ReceiverObject *o)
{
    atomic_store(&o->busy, 1);
    o->busy_thread = PyThread_get_thread_ident();
    o->main_thread = _PyOS_IsMainThread();
    o->reraise = 0;
    o->callback_raised = 0;
    Py_CLEAR(o->signal_error);
}

static void count(ReceiverObject *o, const ws_receiver_event *ev)
{
    o->messages++;
    if (ev->kind == WS_RECV_BUCKET) {
        o->buckets++;
        o->bucket_bytes += ev->bytes;
    } else if (ev->kind == WS_RECV_SYNCED) {
        o->syncs++;
    }
}

/* The outcome of a serve/next that failed with rc: the exception to raise
 * (NULL return), or Py_None when the call was stopped or timed out quietly. */
static PyObject *call_failed(ReceiverObject *o, ws_status rc, int quiet_timeout)
{
    if (o->signal_error) {
        /* Ctrl-C (or another signal handler's exception): raised as is. */
        PyObject *v = o->signal_error;
        o->signal_error = NULL;
        PyErr_SetObject((PyObject *)Py_TYPE(v), v);
        Py_DECREF(v);
        return NULL;
    }
    if (o->reraise && o->callback_error) {
        PyObject *v = o->callback_error;
        o->callback_error = NULL;
        o->reraise = 0;
        PyErr_SetObject((PyObject *)Py_TYPE(v), v);
        Py_DECREF(v);
        return NULL;
    }
    if (rc == WS_ERR_INTERRUPTED && atomic_load(&o->closing)) Py_RETURN_NONE;
    /* stop() is consumed by the call it stopped. */
    if (rc == WS_ERR_INTERRUPTED && atomic_exchange(&o->stop, 0)) Py_RETURN_NONE;
    if (rc == WS_ERR_TIMEOUT && quiet_timeout) Py_RETURN_NONE;
    PyErr_SetString(WsError, ws_errmsg());
    return NULL;
}

/* Indexed by ws_receiver_event_kind; "verified" is the answer to a VERIFY,
 * a kind this table may know before the core reports it. */
static const char *event_kind(ws_receiver_event_kind k)
{
    static const char *const names[] = {"?",      "connected", "manifest", "slots",   "bucket",
                                        "synced", "wake",      "sleep",    "closed",  "verified"};
    return (size_t)k < sizeof names / sizeof *names ? names[k] : "?";
}

static PyObject *receiver_next(ReceiverObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    int ms;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:next", kwlist, &timeout)) return NULL;
    if (read_timeout(timeout, "next", &ms) != 0 || usable(o, "next") != 0) return NULL;
    call_begin(o);
    int was_syncing = ws_receiver_state(o->r, NULL) == WS_WEIGHTS_SYNCING;
    ws_receiver_event ev;
    ws_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ws_receiver_next(o->r, ms, &ev);
    if (rc == WS_OK) count(o, &ev);
    snapshot(o);
    Py_END_ALLOW_THREADS
    atomic_store(&o->busy, 0);
    PyObject *result;
    if (rc != WS_OK) {
        /* A wait that found nothing (no sender, no request) is None; a
         * timeout inside a sync is an error (its tensors are invalid). */
        result = call_failed(o, rc, !was_syncing);
        if (!result && o->callback_raised && o->callback_error && PyErr_ExceptionMatches(WsError)) {
            /* A wake or sleep callback failed (the sender was told): its
             * exception is the cause. */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (value) PyException_SetCause(value, Py_NewRef(o->callback_error));
            PyErr_Restore(type, value, tb);
        }
    } else {
        result = Py_BuildValue("{s:s,s:K,s:n,s:n}", "kind", event_kind(ev.kind), "weight_version",
                               (unsigned long long)ev.weight_version, "pieces",
                               (Py_ssize_t)ev.pieces, "bytes", (Py_ssize_t)ev.bytes);
    }
    return result;
}

static PyObject *receiver_serve(ReceiverObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    int ms;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:serve", kwlist, &timeout)) return NULL;
    if (read_timeout(timeout, "serve", &ms) != 0 || usable(o, "serve") != 0) return NULL;
    call_begin(o);
    ws_status rc;
    int closed = 0;
    Py_BEGIN_ALLOW_THREADS
    /* ws_receiver_serve's loop, with a snapshot after every message. A
     * request the receiver refused and told the sender about (a manifest
     * that disagrees, a failed callback) leaves the connection up: the
     * sender handles it, serving goes on. */
    for (;;) {
        ws_receiver_event ev;
        rc = ws_receiver_next(o->r, ms, &ev);
        if (rc == WS_OK) count(o, &ev);
        snapshot(o);
        if (rc == WS_OK) {
            if (ev.kind == WS_RECV_CLOSED) {
                closed = 1;
                break;
            }
            continue;
        }
        if (rc == WS_ERR_TIMEOUT || rc == WS_ERR_INTERRUPTED || !atomic_load(&o->peer_pid)) break;
        if (o->reraise) break;
    }
    Py_END_ALLOW_THREADS
    atomic_store(&o->busy, 0);
    PyObject *result = closed ? Py_NewRef(Py_True) : call_failed(o, rc, 0);
    if (result == Py_None) {
        Py_DECREF(result);
        result = Py_NewRef(Py_False); /* stopped */
    }
    return result;
}

static PyObject *receiver_stop(ReceiverObject *o, PyObject *unused)
{
    atomic_store(&o->stop, 1);
    Py_RETURN_NONE;
}

static PyObject *receiver_close(ReceiverObject *o, PyObject *unused)
{
    if (atomic_load(&o->busy)) {
        if (o->busy_thread == PyThread_get_thread_ident())
            return PyErr_Format(WsError, "Receiver.close: called from a wake or sleep callback "
                                "of this receiver's serve()");
        /* serve() in another thread: it returns at its next liveness check,
         * and no new call starts meanwhile (closing stays set). */
        atomic_store(&o->closing, 1);
        Py_BEGIN_ALLOW_THREADS
        struct timespec ms = {0, 1000000};
        while (atomic_load(&o->busy)) nanosleep(&ms, NULL);
        Py_END_ALLOW_THREADS
    }
    receiver_free(o);
    atomic_store(&o->closing, 0);
    Py_RETURN_NONE;
}

static PyObject *receiver_valid(ReceiverObject *o, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s:valid", &name)) return NULL;
    if (!o->r) return PyErr_Format(WsError, "Receiver.valid: the receiver is closed");
    /* Read while another thread may serve, under the receiver's lock; the
     * tensors never move once added (add is refused while serving). */
    int v = ws_receiver_tensor_valid(o->r, name);
    if (v < 0) return PyErr_Format(WsError, "Receiver.valid: no tensor '%s' was added", name);
    return PyBool_FromLong(v);
}

static PyObject *receiver_why(ReceiverObject *o, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s:why", &name)) return NULL;
    if (!o->r) return PyErr_Format(WsError, "Receiver.why: the receiver is closed");
    char why[512];
    int v = ws_receiver_tensor_state(o->r, name, why, sizeof why);
    if (v < 0) return PyErr_Format(WsError, "Receiver.why: no tensor '%s' was added", name);
    if (v) Py_RETURN_NONE;
    return PyUnicode_FromString(why[0] ? why : "not valid");
}

static PyObject *receiver_enter(ReceiverObject *o, PyObject *unused) { return Py_NewRef(o); }

static PyObject *receiver_exit(ReceiverObject *o, PyObject *args)
{
    PyObject *r = receiver_close(o, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *receiver_get_state(ReceiverObject *o, void *c)
{
    return Py_BuildValue("(sK)", ws_weights_state_name((ws_weights_state)atomic_load(&o->state)),
                         (unsigned long long)atomic_load(&o->valid_version));
}

static PyObject *receiver_get_peer_pid(ReceiverObject *o, void *c)
{
    return PyLong_FromLong(atomic_load(&o->peer_pid));
}

static PyObject *receiver_get_name(ReceiverObject *o, void *c)
{
    return Py_NewRef(o->name ? o->name : Py_None);
}

static PyObject *receiver_get_closed(ReceiverObject *o, void *c)
{
    return PyBool_FromLong(!o->r || atomic_load(&o->closing));
}

static PyObject *receiver_get_last_error(ReceiverObject *o, void *c)
{
    return Py_NewRef(o->callback_error ? o->callback_error : Py_None);
}

static PyObject *receiver_get_stats(ReceiverObject *o, void *c)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K}", "messages", (unsigned long long)o->messages,
                         "buckets", (unsigned long long)o->buckets, "bucket_bytes",
                         (unsigned long long)o->bucket_bytes, "syncs", (unsigned long long)o->syncs);
}

static PyObject *receiver_repr(ReceiverObject *o)
{
    return PyUnicode_FromFormat("wshost.Receiver(%R, %s%s)", o->name ? o->name : Py_None,
                                ws_weights_state_name((ws_weights_state)atomic_load(&o->state)),
                                o->r ? "" : ", closed");
}

static PyMethodDef receiver_methods[] = {
    {"add", (PyCFunction)receiver_add, METH_VARARGS,
     "add(name, tensor): registers an engine parameter (a contiguous torch tensor or any DLPack "
     "producer, or a wshost.Tensor; any dtype wshost knows, cpu or cuda); kept alive until close."},
    {"alloc", (PyCFunction)(void (*)(void))receiver_alloc, METH_VARARGS | METH_KEYWORDS,
     "alloc(name, shape, dtype='bf16') -> wshost.Tensor: a tensor in memory this receiver "
     "shares with the trainer, registered as `name`; the trainer writes it in place (one copy "
     "instead of two). Call before serve(). torch.from_dlpack(t) views it."},
    {"on", (PyCFunction)receiver_on, METH_VARARGS,
     "on(event, fn): fn(tag) on 'wake', fn(level) on 'sleep', run inside serve()/next() with the "
     "GIL. An exception is sent to the trainer as an ERROR (its step raises) and kept as "
     "last_error; KeyboardInterrupt and SystemExit stop serve() and are raised as they are."},
    {"serve", (PyCFunction)(void (*)(void))receiver_serve, METH_VARARGS | METH_KEYWORDS,
     "serve(timeout=None) -> bool: handles messages until the trainer closes the connection "
     "(True) or stop() is called (False). timeout: seconds to wait for each message (None: "
     "forever). Raises wshost.Error when the trainer dies, breaks the protocol or goes silent."},
    {"next", (PyCFunction)(void (*)(void))receiver_next, METH_VARARGS | METH_KEYWORDS,
     "next(timeout=None) -> dict or None: handles one message (accepting a trainer first) and "
     "returns {'kind', 'weight_version', 'pieces', 'bytes'}; None when nothing came within "
     "timeout outside a sync, or stop() was called."},
    {"stop", (PyCFunction)receiver_stop, METH_NOARGS,
     "stop(): makes a serve()/next() running in another thread return within 200 ms (one "
     "called before serve() starts makes it return at once)."},
    {"valid", (PyCFunction)receiver_valid, METH_VARARGS,
     "valid(name) -> bool: whether the named tensor holds bytes a verified sync wrote."},
    {"why", (PyCFunction)receiver_why, METH_VARARGS,
     "why(name) -> str or None: why the named tensor is not valid (never written, discarded by "
     "a level-2 sleep, the error that ended its sync), None when it is."},
    {"close", (PyCFunction)receiver_close, METH_NOARGS,
     "close(): stops a serve() in another thread, drops the connection and the socket, and lets "
     "go of the tensors."},
    {"__enter__", (PyCFunction)receiver_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)receiver_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef receiver_getset[] = {
    {"state", (getter)receiver_get_state, NULL,
     "(state, weight_version): 'none', 'syncing', 'valid' or 'invalid', and the last verified "
     "weight version", NULL},
    {"peer_pid", (getter)receiver_get_peer_pid, NULL, "the connected trainer's pid, 0 if none", NULL},
    {"name", (getter)receiver_get_name, NULL, "the channel name it listens on", NULL},
    {"closed", (getter)receiver_get_closed, NULL, "whether close() ran (or runs)", NULL},
    {"last_error", (getter)receiver_get_last_error, NULL,
     "the exception the latest failed wake or sleep callback raised, or None", NULL},
    {"stats", (getter)receiver_get_stats, NULL, "messages, buckets, bucket_bytes, syncs so far", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "wshost.Receiver",
    .tp_basicsize = sizeof(ReceiverObject),
    .tp_dealloc = (destructor)receiver_dealloc,
    .tp_repr = (reprfunc)receiver_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Receiver(name, timeout_ms=30000): the engine side of server mode, listening on the "
              "abstract socket `name` for a trainer's Session(engine_address=...); a context manager.",
    .tp_traverse = (traverseproc)receiver_traverse,
    .tp_clear = (inquiry)receiver_clear,
    .tp_methods = receiver_methods,
    .tp_getset = receiver_getset,
    .tp_init = (initproc)receiver_init,
    .tp_new = receiver_new,
};

int receiver_py_init(PyObject *module)
{
    if (PyType_Ready(&ReceiverType) < 0) return -1;
    return PyModule_AddObjectRef(module, "Receiver", (PyObject *)&ReceiverType);
}
