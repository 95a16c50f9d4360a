/* safetensors.h: reading safetensors files and sharded-checkpoint indexes.
 *
 * A safetensors file is an 8-byte little-endian header length N, N bytes of
 * JSON (name -> {"dtype", "shape", "data_offsets": [begin, end]}, and an
 * optional "__metadata__" of string -> string), then the data region, which
 * the offsets address. A file is validated whole before anything is handed
 * out: every failure is WS_ERR_FORMAT with one message naming the file and,
 * where there is one, the tensor. Tensors are zero-copy, read-only views of
 * the mapping; each keeps the file (and its mapping) alive.
 *
 * An index (model.safetensors.index.json) maps tensor names to the shard
 * files of a checkpoint: {"metadata": {...}, "weight_map": {name: file}}. */
#ifndef WS_SAFETENSORS_H
#define WS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "device.h"
#include "dtype.h"
#include "status.h"
#include "tensor.h"

/* The largest header accepted, as the reference implementation's. */
#define WS_ST_MAX_HEADER_BYTES ((uint64_t)100000000)

typedef struct ws_st_entry {
    const char *name;
    ws_dtype dtype;
    int ndim;
    int64_t shape[WS_MAX_DIMS];
    size_t begin, end; /* bytes, from the start of the data region */
} ws_st_entry;

typedef struct ws_st_file ws_st_file;

/* Parses and validates a whole file image (header and data region) of
 * `size` bytes; `label` names it in messages. The image is not copied: it
 * must outlive the file object and every tensor made from it. */
ws_status ws_st_parse(const void *data, size_t size, const char *label, ws_st_file **out);
/* Maps the file at `path` read-only and parses it. WS_ERR_IO when it cannot
 * be opened or mapped, WS_ERR_FORMAT when it is malformed. */
ws_status ws_st_open(const char *path, ws_st_file **out);
/* References: the opener holds one, each tensor one; the last unref unmaps. */
void ws_st_retain(ws_st_file *f);
void ws_st_unref(ws_st_file *f); /* NULL is fine */

const char *ws_st_label(const ws_st_file *f); /* the path for ws_st_open */
size_t ws_st_count(const ws_st_file *f);
const ws_st_entry *ws_st_entry_at(const ws_st_file *f, size_t i); /* header order */
const ws_st_entry *ws_st_find(const ws_st_file *f, const char *name); /* NULL: absent */
/* The data region (the bytes the entries' offsets address). */
const void *ws_st_data(const ws_st_file *f, size_t *size);
/* The open file of ws_st_open (-1 for an image parsed from memory) and the
 * file offset of the data region, for positioned reads (pread) that copy
 * straight into a destination without mapping the source pages. */
int ws_st_fd(const ws_st_file *f, uint64_t *data_offset);
size_t ws_st_metadata_count(const ws_st_file *f);
const char *ws_st_metadata_key(const ws_st_file *f, size_t i);
const char *ws_st_metadata_value(const ws_st_file *f, size_t i);

/* A read-only, zero-copy cpu tensor over entry e of f, named by the entry;
 * it keeps f alive. A write fails naming the tensor and the file. */
ws_status ws_st_tensor(ws_st_file *f, const ws_st_entry *e, ws_tensor *out);

/* "F32" -> WS_F32, ...; -1 for a dtype this host does not handle. */
int ws_st_dtype_parse(const char *name, ws_dtype *out);
const char *ws_st_dtype_name(ws_dtype t); /* "BF16" */
/* The one shape of a format error of these files, WS_ERR_FORMAT with
 * "<kind> 'FILE': [tensor 'NAME': ]what" (kind: "safetensors", "safetensors
 * index"); tensor may be NULL. */
__attribute__((format(printf, 4, 5))) ws_status ws_st_bad(const char *kind, const char *label,
                                                          const char *tensor, const char *fmt,
                                                          ...);

/* ---- index ------------------------------------------------------------------------ */

typedef struct ws_st_index ws_st_index;

/* Parses an index's JSON text; `label` names it in messages. The weight map
 * must be an object of tensor name -> plain file name (no directories). */
ws_status ws_st_index_parse(const char *text, size_t len, const char *label, ws_st_index **out);
void ws_st_index_free(ws_st_index *x); /* NULL is fine */

size_t ws_st_index_count(const ws_st_index *x); /* tensors, in weight_map order */
const char *ws_st_index_name(const ws_st_index *x, size_t i);
size_t ws_st_index_file_of(const ws_st_index *x, size_t i); /* index into the files */
/* 1 and the tensor's position in *i when the index lists `name`. */
int ws_st_index_find(const ws_st_index *x, const char *name, size_t *i);
/* Distinct shard files, in order of first mention. */
size_t ws_st_index_file_count(const ws_st_index *x);
const char *ws_st_index_file(const ws_st_index *x, size_t j);
/* "metadata": strings as they are, other values as compact JSON ("123"). */
size_t ws_st_index_metadata_count(const ws_st_index *x);
const char *ws_st_index_metadata_key(const ws_st_index *x, size_t i);
const char *ws_st_index_metadata_value(const ws_st_index *x, size_t i);

#endif
