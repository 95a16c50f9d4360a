/* safetensors_write.h: writing tensors to safetensors files, one file or a
 * Hugging Face style sharded checkpoint.
 *
 * File layout (the safetensors format): an 8-byte little-endian header
 * length N, N bytes of JSON header, then the data region with the tensors
 * back to back in the order given. The header is one object:
 *   {"__metadata__": {"k": "v", ...},            (only when there is metadata)
 *    "<name>": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
 * with offsets relative to the data region. dtypes: F32, BF16, F16, F8_E4M3,
 * U8, I32, I64. The header is padded with spaces so the data region starts
 * 8-byte aligned, as the reference (Rust) implementation does.
 *
 * Tensors may live on any device. Host tensors are written straight from
 * their memory; device tensors go through one bounded host staging buffer
 * (pinned through their device), chunk by chunk, so a save never holds a host
 * copy of the model. Tensors must be contiguous and readable (not freed, not
 * discarded by a pool sleep). The writer holds its own reference to each
 * tensor for the whole save and checks the caller's tensor again before
 * every chunk: a progress callback that frees one (ws_tensor_free or
 * ws_tensor_release), puts its pool to sleep or discards it fails the save
 * with WS_ERR_FREED / WS_ERR_DISCARDED naming it. The ws_tensor structs
 * themselves, the names and the metadata must stay valid until the call
 * returns.
 *
 * Every file is written atomically: to a hidden temporary file of a unique
 * name in the same directory (".NAME.tmp.XXXXXX", mkostemp, so writers of
 * one target, a nested save among them, never share a file), given the mode
 * 0666 & ~umask a plain create has, flushed with fsync, then renamed over
 * the target. A failed save removes its temporary file and never leaves a
 * file under the target name that looks complete but is not. */
#ifndef WS_SAFETENSORS_WRITE_H
#define WS_SAFETENSORS_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"
#include "tensor.h"

/* Staging buffer size when 0 is given: bytes of device tensors in flight. */
#define WS_ST_DEFAULT_STAGING_BYTES ((size_t)64 << 20)
/* Shard size limit when 0 is given: Hugging Face's default, "5GB" (decimal). */
#define WS_ST_DEFAULT_MAX_SHARD_BYTES ((uint64_t)5000000000)

/* Progress of a save: tensor bytes written so far out of the total (over all
 * shards of a checkpoint). Called after each chunk of about the staging size
 * and once at the end with done == total, before the last file is renamed
 * into place (with nothing to write, that is the only call). Return 0 to go
 * on; any other value, the final call's included, stops the save, which then
 * fails with WS_ERR_INTERRUPTED and leaves no file of its own behind (shards
 * already completed stay, without an index). */
typedef int (*ws_st_progress_fn)(uint64_t bytes_done, uint64_t bytes_total, void *ctx);

/* Writes n tensors to one safetensors file at `path`, tensor i under
 * names[i] (unique, non-empty, not "__metadata__"; the tensor's own name is
 * not used). meta_kv holds n_meta key/value pairs (meta_kv[2i] = key,
 * meta_kv[2i+1] = value; keys unique) for "__metadata__", which is omitted
 * when n_meta is 0. Note that transformers only loads a file whose metadata,
 * when present, has "format": "pt" (ws_st_save_sharded adds it).
 * staging_bytes: size of the host staging buffer for device tensors (0: the
 * default). progress may be NULL.
 * Errors: WS_ERR_ARG for a bad argument (a non-contiguous tensor, a duplicate
 * name, a file name over NAME_MAX: the message names it), WS_ERR_FREED /
 * WS_ERR_DISCARDED for a tensor that cannot be read (also when it becomes so
 * during the save), WS_ERR_IO naming the path and the system's reason,
 * WS_ERR_NOMEM, WS_ERR_DEVICE, WS_ERR_INTERRUPTED (progress said stop).
 * Arguments are all checked before the file system is touched. */
ws_status ws_st_write(const char *path, size_t n, const char *const *names,
                      const ws_tensor *const *tensors, size_t n_meta, const char *const *meta_kv,
                      size_t staging_bytes, ws_st_progress_fn progress, void *progress_ctx);

/* Saves n tensors as a checkpoint in directory `dir` (created, with missing
 * parents, when absent), split into shards like Hugging Face's
 * save_pretrained: tensors in the order given, a new shard begins when adding
 * the next tensor would take the current one over max_shard_bytes (0: the
 * default) and the current one is not empty, so a tensor larger than the
 * limit gets a shard of its own.
 *   one shard:  <prefix>.safetensors, no index
 *   N shards:   <prefix>-00001-of-0000N.safetensors ... (5 digits each) and
 *               <prefix>.safetensors.index.json =
 *               {"metadata": {"total_size": <tensor bytes>}, "weight_map": {name: file}}
 * Each shard carries "__metadata__": {"format": "pt"} plus the caller's
 * metadata (a caller's "format" replaces "pt"). Each file is atomic and the
 * index is written last, so an interrupted save never leaves an index that
 * points at missing shards. Files of an earlier save under the same prefix
 * that would mislead a loader are removed: before a sharded save its old
 * index; after it, the single file or shards of another count (the old
 * index and shards after a single-file save). *n_shards_out (may be NULL)
 * receives the number of shards; ws_st_shard_filename names them.
 * prefix NULL means "model"; one that makes a shard or index name longer
 * than NAME_MAX is WS_ERR_ARG. Errors as ws_st_write. */
ws_status ws_st_save_sharded(const char *dir, const char *prefix, size_t n,
                             const char *const *names, const ws_tensor *const *tensors,
                             uint64_t max_shard_bytes, size_t n_meta, const char *const *meta_kv,
                             size_t staging_bytes, ws_st_progress_fn progress, void *progress_ctx,
                             size_t *n_shards_out);

/* save_pretrained's split (see ws_st_save_sharded) of tensors of bytes[i]
 * bytes, in order: shard_of[i] receives tensor i's shard (0-based). Returns
 * the number of shards (1 for n = 0). A caller that writes the shards itself
 * (gathering one shard of whole tensors at a time over ranks) splits with it,
 * writes each shard with ws_st_write under ws_st_shard_filename, then the
 * index with ws_st_save_index. */
size_t ws_st_shard_split(size_t n, const uint64_t *bytes, uint64_t max_shard_bytes,
                         size_t *shard_of);
/* Writes <dir>/<prefix>.safetensors.index.json for that split, atomically
 * (total_bytes: the tensors' bytes). Errors as ws_st_write. */
ws_status ws_st_save_index(const char *dir, const char *prefix, size_t n,
                           const char *const *names, const size_t *shard_of, size_t n_shards,
                           uint64_t total_bytes);
/* Writes `text` to path atomically (a temporary of its own, synced, renamed):
 * the config files a saved checkpoint or adapter carries. */
ws_status ws_st_write_text(const char *path, const char *text);

/* The file name (no directory) of shard `index` (0-based) of `n_shards`:
 * "<prefix>.safetensors" when n_shards is 1, else
 * "<prefix>-00001-of-00003.safetensors". Returns the length snprintf
 * reports (>= n: truncated). */
int ws_st_shard_filename(char *buf, size_t n, const char *prefix, size_t index, size_t n_shards);
/* "<prefix>.safetensors.index.json", as ws_st_shard_filename. */
int ws_st_index_filename(char *buf, size_t n, const char *prefix);

#endif
