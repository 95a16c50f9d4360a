/* shm.h: shared-memory slots for handing bytes to another process.
 *
 * A slot is a memfd (memfd_create, MFD_CLOEXEC): anonymous memory with a file
 * descriptor, so it has no name in /dev/shm or anywhere else and is gone once
 * the last mapping and fd are. The creator sizes it, seals its size (so the
 * other side may trust the length and never takes SIGBUS from a file that
 * shrank), maps it read-write and passes the fd over a channel (chan.h); the
 * receiver maps it read-only and closes the fd. */
#ifndef WS_SHM_H
#define WS_SHM_H

#include <stddef.h>

#include "status.h"
#include "tensor.h"

typedef struct ws_shm {
    int fd;          /* -1 once closed or passed on */
    void *data;      /* NULL: not mapped */
    size_t nbytes;
    int writable;
} ws_shm;

#define WS_SHM_INIT {-1, NULL, 0, 0}

/* Creates and maps a slot of nbytes (> 0), every page committed now.
 * `what` names it for messages. */
ws_status ws_shm_create(ws_shm *s, size_t nbytes, const char *what);
/* The same with pages committed as they are first written: a slot sized
 * for the largest bucket that a small model uses in part, an arena filled
 * as it is carved up. */
ws_status ws_shm_create_lazy(ws_shm *s, size_t nbytes, const char *what);
/* Maps a slot received from another process, read-only (pages are not
 * populated). Takes fd: it is closed on success and on failure. The fd must
 * hold at least nbytes and its size must be sealed. */
ws_status ws_shm_map(ws_shm *s, int fd, size_t nbytes, const char *what);
/* The same read-write: memory another process shares to be written (an
 * engine's weights, ws_receiver_alloc). */
ws_status ws_shm_map_rw(ws_shm *s, int fd, size_t nbytes, const char *what);
/* Hands s's mapping to a new u8 tensor `name` over all of it: the mapping
 * then lives as long as that tensor or any view of it (released with the
 * last one) and *s keeps only its fd. On failure *s is unchanged. */
ws_status ws_shm_to_tensor(ws_shm *s, const char *source, const char *name, ws_tensor *out);
/* Closes the fd (once passed on, the mapping is all that is needed). */
void ws_shm_close_fd(ws_shm *s);
/* Unmaps and closes; idempotent. */
void ws_shm_free(ws_shm *s);

#endif
