/* shm.c: memfd slots (shm.h). */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fault.h"

static const int size_seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

static ws_status create(ws_shm *s, size_t nbytes, const char *what, int populate)
{
    *s = (ws_shm)WS_SHM_INIT;
    if (nbytes == 0) return WS_ERR(WS_ERR_ARG, "%s: a slot needs at least one byte", what);
    char size[32];
    if (ws_fault_hit(WS_FAULT_HOST))
        return WS_ERR(WS_ERR_NOMEM, "%s: out of memory for a shared slot of %s", what,
                      ws_format_bytes(size, sizeof size, nbytes));
    int fd = memfd_create("wshost-slot", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return WS_ERR(WS_ERR_NOMEM, "%s: memfd_create: %s", what, strerror(errno));
    if (ftruncate(fd, (off_t)nbytes) != 0 || fcntl(fd, F_ADD_SEALS, size_seals) != 0) {
        int e = errno;
        close(fd);
        return WS_ERR(WS_ERR_NOMEM, "%s: sizing a shared slot of %s: %s", what,
                      ws_format_bytes(size, sizeof size, nbytes), strerror(e));
    }
    void *p = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED | (populate ? MAP_POPULATE : 0),
                   fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(fd);
        return WS_ERR(WS_ERR_NOMEM, "%s: mapping a shared slot of %s: %s", what,
                      ws_format_bytes(size, sizeof size, nbytes), strerror(e));
    }
    *s = (ws_shm){fd, p, nbytes, 1};
    return WS_OK;
}

/* Populated now: the first sync should not pay a page fault per 4 KiB. */
ws_status ws_shm_create(ws_shm *s, size_t nbytes, const char *what)
{
    return create(s, nbytes, what, 1);
}

/* An arena is written as it is carved up; pages never touched cost nothing. */
ws_status ws_shm_create_lazy(ws_shm *s, size_t nbytes, const char *what)
{
    return create(s, nbytes, what, 0);
}

static ws_status map_fd(ws_shm *s, int fd, size_t nbytes, const char *what, int writable)
{
    *s = (ws_shm)WS_SHM_INIT;
    struct stat st;
    ws_status rc = WS_OK;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) != 0 || seals < 0)
        rc = WS_ERR(WS_ERR_FORMAT, "%s: the slot's descriptor is not a memfd: %s", what,
                    strerror(errno));
    else if (nbytes == 0 || (size_t)st.st_size < nbytes)
        rc = WS_ERR(WS_ERR_FORMAT, "%s: the slot holds %lld bytes, not the %zu announced", what,
                    (long long)st.st_size, nbytes);
    else if ((seals & (F_SEAL_SHRINK | F_SEAL_SEAL)) != (F_SEAL_SHRINK | F_SEAL_SEAL))
        rc = WS_ERR(WS_ERR_FORMAT, "%s: the slot's size is not sealed, so it could shrink "
                    "under this process", what);
    if (rc == WS_OK) {
        /* Not populated: a slot sized for the largest bucket may be used in
         * part (a small model), and populating would commit all of it; an
         * arena of shared weights is filled as it is carved up. */
        void *p = mmap(NULL, nbytes, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED,
                       fd, 0);
        if (p == MAP_FAILED)
            rc = WS_ERR(WS_ERR_NOMEM, "%s: mapping a shared slot of %zu bytes: %s", what, nbytes,
                        strerror(errno));
        else
            *s = (ws_shm){-1, p, nbytes, writable};
    }
    close(fd);
    return rc;
}

ws_status ws_shm_map(ws_shm *s, int fd, size_t nbytes, const char *what)
{
    return map_fd(s, fd, nbytes, what, 0);
}

ws_status ws_shm_map_rw(ws_shm *s, int fd, size_t nbytes, const char *what)
{
    return map_fd(s, fd, nbytes, what, 1);
}

void ws_shm_close_fd(ws_shm *s)
{
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
}

void ws_shm_free(ws_shm *s)
{
    ws_shm_close_fd(s);
    if (s->data) munmap(s->data, s->nbytes);
    s->data = NULL;
    s->nbytes = 0;
}

typedef struct shm_mapping {
    void *data;
    size_t nbytes;
} shm_mapping;

static void unmap_released(void *ctx)
{
    shm_mapping *m = ctx;
    munmap(m->data, m->nbytes);
    free(m);
}

ws_status ws_shm_to_tensor(ws_shm *s, const char *source, const char *name, ws_tensor *out)
{
    memset(out, 0, sizeof *out);
    shm_mapping *m = ws_malloc(sizeof *m);
    if (!m) return WS_ERR(WS_ERR_NOMEM, "%s: out of memory", name);
    *m = (shm_mapping){s->data, s->nbytes};
    ws_external mem = {.data = s->data, .nbytes = s->nbytes, .read_only = !s->writable,
                       .source = source, .release = unmap_released, .release_ctx = m};
    int64_t n = (int64_t)s->nbytes;
    ws_status rc = ws_tensor_external(out, &mem, WS_U8, 1, &n, name);
    if (rc != WS_OK) {
        free(m);
        return rc;
    }
    s->data = NULL; /* the tensor's now */
    s->nbytes = 0;
    return WS_OK;
}
