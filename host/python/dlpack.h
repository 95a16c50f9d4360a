/* dlpack.h: the DLPack exchange structs (the stable C ABI of DLPack 0.x/1.x,
 * legacy unversioned form), declared here for the wshost Python module.
 *
 * A producer hands out a PyCapsule named "dltensor" holding a
 * DLManagedTensor; the consumer renames it "used_dltensor" when it takes the
 * tensor and later calls its deleter. Only the fields and codes wshost uses
 * are named. */
#ifndef WS_DLPACK_H
#define WS_DLPACK_H

#include <stdint.h>

/* Device types. */
enum {
    WS_DL_CPU = 1,
    WS_DL_CUDA = 2,
    WS_DL_CUDA_HOST = 3,    /* pinned host memory: the cpu can read it */
    WS_DL_CUDA_MANAGED = 13,
};

/* Data type codes. */
enum {
    WS_DL_INT = 0,
    WS_DL_UINT = 1,
    WS_DL_FLOAT = 2,
    WS_DL_BFLOAT = 4,
    WS_DL_FLOAT8_E4M3FN = 10, /* DLPack 1.1 */
};

typedef struct ws_dl_device {
    int32_t device_type;
    int32_t device_id;
} ws_dl_device;

typedef struct ws_dl_dtype {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} ws_dl_dtype;

typedef struct ws_dl_tensor {
    void *data;
    ws_dl_device device;
    int32_t ndim;
    ws_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL: dense row-major */
    uint64_t byte_offset;
} ws_dl_tensor;

typedef struct ws_dl_managed {
    ws_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct ws_dl_managed *self);
} ws_dl_managed;

#endif
