/* safetensors_index.c: the index of a sharded checkpoint
 * (model.safetensors.index.json), parsed and checked whole.
 *
 * Shard names come from a file that may have been downloaded from anywhere,
 * so they must be plain names inside the checkpoint's directory: no '/',
 * no "." or "..". Like the file parser, this one serves a fuzz target. */
#include "safetensors.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "fault.h"
#include "strmap.h"

struct ws_st_index {
    char *label;
    size_t n;
    char *names;        /* the tensors' names, back to back */
    const char **name;  /* n pointers into names */
    size_t *file_of;    /* n indices into files */
    char **files;
    size_t n_files;
    char **meta;        /* key, value, key, value, ... */
    size_t n_meta;
    ws_strmap by_name;
};

size_t ws_st_index_count(const ws_st_index *x) { return x->n; }

const char *ws_st_index_name(const ws_st_index *x, size_t i) { return i < x->n ? x->name[i] : NULL; }

size_t ws_st_index_file_of(const ws_st_index *x, size_t i) { return x->file_of[i]; }

int ws_st_index_find(const ws_st_index *x, const char *name, size_t *i)
{
    return ws_strmap_get(&x->by_name, name, i);
}

size_t ws_st_index_file_count(const ws_st_index *x) { return x->n_files; }

const char *ws_st_index_file(const ws_st_index *x, size_t j)
{
    return j < x->n_files ? x->files[j] : NULL;
}

size_t ws_st_index_metadata_count(const ws_st_index *x) { return x->n_meta; }

const char *ws_st_index_metadata_key(const ws_st_index *x, size_t i)
{
    return i < x->n_meta ? x->meta[2 * i] : NULL;
}

const char *ws_st_index_metadata_value(const ws_st_index *x, size_t i)
{
    return i < x->n_meta ? x->meta[2 * i + 1] : NULL;
}

void ws_st_index_free(ws_st_index *x)
{
    if (!x) return;
    for (size_t i = 0; i < x->n_files; i++) free(x->files[i]);
    for (size_t i = 0; i < 2 * x->n_meta; i++) free(x->meta[i]);
    free(x->files);
    free(x->meta);
    ws_strmap_free(&x->by_name);
    free(x->file_of);
    free(x->name);
    free(x->names);
    free(x->label);
    free(x);
}

#define bad(label, tensor, ...) ws_st_bad("safetensors index", (label), (tensor), __VA_ARGS__)

static ws_status nomem(const ws_st_index *x)
{
    return WS_ERR(WS_ERR_NOMEM, "safetensors index '%s': out of memory", x->label);
}

static int plain_file_name(const char *s)
{
    return *s && !strchr(s, '/') && !strchr(s, '\\') && strcmp(s, ".") != 0 &&
           strcmp(s, "..") != 0;
}

static ws_status parse_metadata(ws_st_index *x, const cJSON *v)
{
    if (!cJSON_IsObject(v))
        return bad(x->label, NULL, "\"metadata\" must be an object");
    size_t n = (size_t)cJSON_GetArraySize(v);
    if (!n) return WS_OK;
    if (!(x->meta = ws_calloc(2 * n, sizeof *x->meta))) return nomem(x);
    const cJSON *kv;
    cJSON_ArrayForEach(kv, v) {
        char **slot = &x->meta[2 * x->n_meta];
        slot[0] = ws_strdup(kv->string);
        if (cJSON_IsString(kv)) {
            slot[1] = ws_strdup(kv->valuestring);
        } else {
            /* total_size and the like: their JSON text, in memory of our own. */
            char *json = cJSON_PrintUnformatted(kv);
            slot[1] = json ? ws_strdup(json) : NULL;
            cJSON_free(json);
        }
        x->n_meta++; /* counted now, so the free frees what was copied */
        if (!slot[0] || !slot[1]) return nomem(x);
    }
    return WS_OK;
}

/* Adds (or finds) shard `file` and returns its position in *j. */
static ws_status add_file(ws_st_index *x, ws_strmap *files, const char *file, size_t *j)
{
    if (ws_strmap_get(files, file, j)) return WS_OK;
    char *copy = ws_strdup(file);
    if (!copy) return nomem(x);
    *j = x->n_files;
    x->files[x->n_files++] = copy;
    ws_strmap_put(files, copy, *j, NULL);
    return WS_OK;
}

static ws_status parse_weight_map(ws_st_index *x, const cJSON *map)
{
    size_t count = 0, names_len = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, map) {
        count++;
        names_len += strlen(v->string) + 1;
    }
    size_t slots = count ? count : 1;
    x->names = ws_malloc(names_len ? names_len : 1);
    x->name = ws_calloc(slots, sizeof *x->name);
    x->file_of = ws_calloc(slots, sizeof *x->file_of);
    x->files = ws_calloc(slots, sizeof *x->files);
    if (!x->names || !x->name || !x->file_of || !x->files) return nomem(x);
    WS_TRY(ws_strmap_init(&x->by_name, count));
    ws_strmap files;
    WS_TRY(ws_strmap_init(&files, count));
    ws_status rc = WS_OK;
    char *next = x->names;
    cJSON_ArrayForEach(v, map) {
        size_t len = strlen(v->string) + 1;
        memcpy(next, v->string, len);
        const char *name = next;
        next += len;
        if (!cJSON_IsString(v)) {
            rc = bad(x->label, name, "\"weight_map\" must map tensor names to file names; "
                     "this one maps to something else");
            break;
        }
        if (!plain_file_name(v->valuestring)) {
            rc = bad(x->label, name, "file name '%s' must be a plain name of a file beside the "
                     "index (no '/', '.' or '..')", v->valuestring);
            break;
        }
        if (!ws_strmap_put(&x->by_name, name, x->n, NULL)) {
            rc = bad(x->label, name, "the name appears twice in \"weight_map\"");
            break;
        }
        x->name[x->n] = name;
        rc = add_file(x, &files, v->valuestring, &x->file_of[x->n]);
        if (rc != WS_OK) break;
        x->n++;
    }
    ws_strmap_free(&files);
    return rc;
}

ws_status ws_st_index_parse(const char *text, size_t len, const char *label, ws_st_index **out)
{
    *out = NULL;
    if (!label) label = "(memory)";
    if (!text && len) return WS_ERR(WS_ERR_ARG, "safetensors index '%s': no text", label);
    const char *end = NULL;
    cJSON *root = text ? cJSON_ParseWithLengthOpts(text, len, &end, 0) : NULL;
    if (!root) return bad(label, NULL, "not valid JSON");
    for (const char *q = end; q < text + len; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            cJSON_Delete(root);
            return bad(label, NULL, "bytes after the JSON value (at byte %zu)",
                       (size_t)(q - text));
        }
    }
    ws_st_index *x = ws_calloc(1, sizeof *x);
    char *copy = ws_strdup(label);
    if (!x || !copy) {
        free(x);
        free(copy);
        cJSON_Delete(root);
        return WS_ERR(WS_ERR_NOMEM, "safetensors index '%s': out of memory", label);
    }
    x->label = copy;
    ws_status rc = WS_OK;
    int is_object = cJSON_IsObject(root);
    const cJSON *map = is_object ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    const cJSON *meta = is_object ? cJSON_GetObjectItemCaseSensitive(root, "metadata") : NULL;
    if (!is_object)
        rc = bad(label, NULL, "must be a JSON object with a \"weight_map\"");
    else if (!cJSON_IsObject(map))
        rc = bad(label, NULL, "\"weight_map\" must be an object of tensor name -> file name");
    if (rc == WS_OK && meta) rc = parse_metadata(x, meta);
    if (rc == WS_OK) rc = parse_weight_map(x, map);
    cJSON_Delete(root);
    if (rc != WS_OK) {
        ws_st_index_free(x);
        return rc;
    }
    *out = x;
    return WS_OK;
}
