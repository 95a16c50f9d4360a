/* wshost_py.h: what the files of the `wshost` Python module share.
 *
 * wshost_py.c holds Tensor, from_dlpack and Session (over ws.h, libwshost);
 * receiver_py.c holds Receiver (over the core's remote.h, linked into the
 * module itself: libwshost exports only ws.h). */
#ifndef WSHOST_PY_H
#define WSHOST_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "dlpack.h"
#include "ws.h"

typedef struct SessionObject SessionObject;

typedef struct TensorObject {
    PyObject_HEAD
    ws_host_memory mem;     /* data NULL once freed */
    PyObject *name;         /* str or None */
    ws_dl_managed *managed; /* from_dlpack: the producer's tensor, deleted with us */
    SessionObject *session; /* Session.alloc: the owner (strong reference) */
    Py_ssize_t exports;     /* DLPack views of us still alive */
    const char *freed_by;   /* why mem.data is NULL ("Session.close()") */
} TensorObject;

extern PyObject *WsError;      /* wshost.Error */
extern PyTypeObject TensorType; /* wshost.Tensor */

/* A new Tensor with nothing in it (the caller fills mem, name, managed). */
PyObject *tensor_new_raw(void);
/* wshost.from_dlpack(obj): a new Tensor viewing obj's memory, or NULL with
 * the exception set (a non-contiguous tensor is refused by shape and strides). */
PyObject *py_from_dlpack(PyObject *mod, PyObject *obj);
/* 0, or -1 with wshost.Error naming the tensor and who freed it. */
int tensor_check_live(TensorObject *t, const char *what);
/* torch.cuda.synchronize() when torch has initialized CUDA; returns r, or
 * NULL (r dropped) with the exception set. */
PyObject *sync_torch_cuda(PyObject *r);
/* The same for one GPU (torch's index; -1: torch's current one). */
PyObject *sync_torch_cuda_device(PyObject *r, int device);

/* Adds wshost.Receiver to the module; -1 with the exception set. */
int receiver_py_init(PyObject *module);

#endif
