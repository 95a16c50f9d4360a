/* checkpoint.h: a checkpoint of one or more safetensors files, by path.
 *
 * ws_ckpt_open takes a .safetensors file, the index json of a sharded
 * checkpoint, or a directory holding model.safetensors.index.json (preferred)
 * or model.safetensors. Every shard is opened and validated once, up front,
 * and every tensor the index lists must be in its shard, so a bad download
 * fails at open naming the shard and a tensor, not halfway through a sync.
 * Tensors are the zero-copy read-only views of ws_st_tensor: they keep their
 * shard mapped after the checkpoint is freed. */
#ifndef WS_CHECKPOINT_H
#define WS_CHECKPOINT_H

#include <stddef.h>

#include "safetensors.h"

/* The largest index json read (an index of 37,000 tensors is a few MB). */
#define WS_CKPT_MAX_INDEX_BYTES ((size_t)100000000)

typedef struct ws_ckpt ws_ckpt;

/* WS_ERR_IO when a path or shard cannot be opened, WS_ERR_FORMAT when a
 * file is malformed or a listed tensor is missing from its shard. */
ws_status ws_ckpt_open(const char *path, ws_ckpt **out);
void ws_ckpt_free(ws_ckpt *c); /* NULL is fine; tensors handed out stay valid */

const char *ws_ckpt_path(const ws_ckpt *c); /* as given to ws_ckpt_open */
/* Tensors in index order (file order for a single file). */
size_t ws_ckpt_count(const ws_ckpt *c);
const char *ws_ckpt_name(const ws_ckpt *c, size_t i);
/* Entry i, its file's position in *file when not NULL. */
const ws_st_entry *ws_ckpt_entry(const ws_ckpt *c, size_t i, size_t *file);
/* The entry named `name` (NULL: absent), its file's position in *file. */
const ws_st_entry *ws_ckpt_find(const ws_ckpt *c, const char *name, size_t *file);
/* The files (shards), in order of first mention in the index. */
size_t ws_ckpt_file_count(const ws_ckpt *c);
const char *ws_ckpt_file_name(const ws_ckpt *c, size_t j); /* "model-00001-of-00002.safetensors" */
ws_st_file *ws_ckpt_file(const ws_ckpt *c, size_t j);
/* The index's "metadata" (strings; other values as JSON text), or a single
 * file's "__metadata__". */
size_t ws_ckpt_metadata_count(const ws_ckpt *c);
const char *ws_ckpt_metadata_key(const ws_ckpt *c, size_t i);
const char *ws_ckpt_metadata_value(const ws_ckpt *c, size_t i);

/* The tensor `name` as ws_st_tensor makes it; WS_ERR_ARG naming the tensor
 * and the checkpoint when it has no such tensor. */
ws_status ws_ckpt_tensor(const ws_ckpt *c, const char *name, ws_tensor *out);

/* Copies elements [first[i], first[i] + numel(dsts[i])) of the flattened
 * tensor names[i] into dsts[i] (contiguous, any device and dtype: values are
 * converted), for every i, in one batched copy: a trainer rank loading its
 * FSDP rows. Only those rows of the mapping are touched; they are faulted in
 * ahead with one madvise per range (MADV_POPULATE_READ where the kernel has
 * it) rather than one page fault per 4 KiB. Errors name the tensor. */
ws_status ws_ckpt_read_rows(const ws_ckpt *c, size_t n, const char *const *names,
                            const int64_t *first, ws_tensor *const *dsts);

#endif
