/* device.c: the device registry, memory accounting and layout helpers.
 *
 * The cpu device is a process-wide singleton. CUDA devices are probed once,
 * on first use, through the cuda backend (device_cuda.c) when the build has
 * it; a build or machine without a usable GPU reports why, so callers can
 * fall back to the cpu with a clear explanation. Devices are never freed. */
#include "device.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "fault.h"
#include "parallel.h"

#define WS_MAX_CUDA_DEVICES 16

static ws_device cpu_device;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static ws_device cuda_devices[WS_MAX_CUDA_DEVICES];
static int cuda_count;
static const char *cuda_reason;
static pthread_once_t cuda_once = PTHREAD_ONCE_INIT;

static void init_cpu(void)
{
    cpu_device.ops = ws_fault_wrap_ops(ws_cpu_ops());
    cpu_device.kind = WS_DEVICE_CPU;
    cpu_device.index = 0;
    snprintf(cpu_device.name, sizeof cpu_device.name, "cpu");
    int n = ws_parallel_threads();
    snprintf(cpu_device.description, sizeof cpu_device.description,
             "host memory, %d thread%s", n, n == 1 ? "" : "s");
}

ws_device *ws_device_cpu(void)
{
    pthread_once(&cpu_once, init_cpu);
    return &cpu_device;
}

static void probe_cuda(void)
{
#ifdef WS_HAVE_CUDA
    const char *reason = NULL;
    int n = ws_cuda_probe(cuda_devices, WS_MAX_CUDA_DEVICES, &reason);
    cuda_count = n > 0 ? n : 0;
    for (int i = 0; i < cuda_count; i++)
        cuda_devices[i].ops = ws_fault_wrap_ops(cuda_devices[i].ops);
    cuda_reason = cuda_count ? NULL : (reason ? reason : "no GPU found");
#else
    cuda_count = 0;
    cuda_reason = "built without CUDA";
#endif
}

int ws_device_cuda_count(void)
{
    pthread_once(&cuda_once, probe_cuda);
    return cuda_count;
}

const char *ws_device_cuda_unavailable_reason(void)
{
    pthread_once(&cuda_once, probe_cuda);
    return cuda_reason;
}

/* Parses the ordinal after "cuda:"; -1 when it is not a plain number. */
static int parse_ordinal(const char *s)
{
    if (!*s) return -1;
    long v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 100000) return -1;
        v = v * 10 + (*s - '0');
    }
    return (int)v;
}

ws_status ws_device_get(const char *name, ws_device **out)
{
    *out = NULL;
    if (!name) return WS_ERR(WS_ERR_ARG, "device name is missing: expected cpu, cuda or cuda:N");
    if (strcmp(name, "cpu") == 0) {
        *out = ws_device_cpu();
        return WS_OK;
    }
    int ordinal = -1;
    if (strcmp(name, "cuda") == 0) ordinal = 0;
    else if (strncmp(name, "cuda:", 5) == 0) ordinal = parse_ordinal(name + 5);
    if (ordinal < 0)
        return WS_ERR(WS_ERR_DEVICE, "unknown device '%s': expected cpu, cuda or cuda:N", name);
    int n = ws_device_cuda_count();
    if (n == 0)
        return WS_ERR(WS_ERR_DEVICE, "device '%s': no usable GPU: %s (use device 'cpu')", name,
                      ws_device_cuda_unavailable_reason());
    if (ordinal >= n)
        return WS_ERR(WS_ERR_DEVICE, "device '%s' does not exist: %d GPU%s found (cuda:0..cuda:%d)",
                      name, n, n == 1 ? "" : "s", n - 1);
    *out = &cuda_devices[ordinal];
    return WS_OK;
}

static char default_why[200];
static pthread_once_t default_why_once = PTHREAD_ONCE_INIT;

static void init_default_why(void)
{
    snprintf(default_why, sizeof default_why, "no usable GPU: %s",
             ws_device_cuda_unavailable_reason());
}

/* The launcher's local rank of this process, or -1 outside a launcher. Read
 * from the environment so choosing a device never starts MPI; an unusable
 * value counts as none here and is reported when the comm world starts. */
static int launcher_local_rank(const char **var)
{
    const ws_launcher *l;
    ws_env_launcher(&l);
    *var = l->local_var;
    return l->local_rank;
}

ws_device *ws_device_default(const char **why)
{
    int n = ws_device_cuda_count();
    if (n > 0) {
        /* One process per rank: each takes the GPU of its local rank
         * (--device / WSHOST_DEVICE override it). */
        static char local_why[96];
        const char *var = NULL;
        int lr = launcher_local_rank(&var);
        if (lr < 0) {
            if (why) *why = "first usable GPU";
            return &cuda_devices[0];
        }
        if (why) {
            snprintf(local_why, sizeof local_why, "GPU of local rank %d (%s) of %d usable", lr,
                     var, n);
            *why = local_why;
        }
        return &cuda_devices[lr % n];
    }
    if (why) {
        /* Built once: the reason never changes after the probe. */
        pthread_once(&default_why_once, init_default_why);
        *why = default_why;
    }
    return ws_device_cpu();
}

void ws_device_account(ws_device *d, ptrdiff_t delta_bytes)
{
    size_t held;
    if (delta_bytes >= 0)
        held = __atomic_add_fetch(&d->held, (size_t)delta_bytes, __ATOMIC_RELAXED);
    else
        held = __atomic_sub_fetch(&d->held, (size_t)(-delta_bytes), __ATOMIC_RELAXED);
    size_t peak = __atomic_load_n(&d->peak, __ATOMIC_RELAXED);
    while (held > peak &&
           !__atomic_compare_exchange_n(&d->peak, &peak, held, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
}

void ws_device_reset_peak(ws_device *d)
{
    __atomic_store_n(&d->peak, __atomic_load_n(&d->held, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

ws_status ws_device_mem_info(ws_device *d, ws_mem_info *out)
{
    memset(out, 0, sizeof *out);
    WS_TRY(d->ops->mem_info(d, &out->free, &out->total));
    out->held = __atomic_load_n(&d->held, __ATOMIC_RELAXED);
    out->peak = __atomic_load_n(&d->peak, __ATOMIC_RELAXED);
    return WS_OK;
}

ws_status ws_device_synchronize(ws_device *d) { return d->ops->synchronize(d); }

int ws_device_in_use(const ws_device *d) { return d->ops->in_use ? d->ops->in_use(d) : 1; }

int64_t ws_layout_numel(const ws_layout *l)
{
    int64_t n = 1;
    for (int i = 0; i < l->ndim; i++) n *= l->shape[i];
    return n;
}

int ws_layout_is_contiguous(const ws_layout *l)
{
    int64_t expect = 1;
    for (int i = l->ndim - 1; i >= 0; i--) {
        /* Size-1 dims may have any stride; they never move the pointer. */
        if (l->shape[i] != 1 && l->strides[i] != expect) return 0;
        expect *= l->shape[i];
    }
    return 1;
}

void ws_layout_contiguous(ws_layout *l, int ndim, const int64_t *shape)
{
    memset(l, 0, sizeof *l);
    l->ndim = ndim;
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        l->shape[i] = shape[i];
        l->strides[i] = stride;
        stride *= shape[i];
    }
}
