#!/usr/bin/env python3
"""make_corpus.py: writes the seed corpus of the safetensors fuzz targets.

  tests/fuzz/make_corpus.py [OUTDIR]     (default: corpus/ beside this script)

corpus/safetensors/ holds whole files for fuzz_safetensors, corpus/index/
index texts for fuzz_safetensors_index: a few valid ones that reach every
branch of a successful parse, and one per rule a malformed input breaks. Each
is at most a few hundred bytes, so the fuzzer mutates them quickly. The output
is deterministic; OUTDIR's two subdirectories are emptied first.
"""

import json
import os
import shutil
import struct
import sys

SIZES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "U8": 1, "I32": 4, "I64": 8}


def st_file(entries, metadata=None, pad=True):
    """A valid image: entries (name, dtype, shape) laid out back to back."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    at = 0
    for name, dtype, shape in entries:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(i % 251 for i in range(at))


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def with_header(header, data_len, length=None):
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + bytes(data_len)


SAFETENSORS = {
    # Valid.
    "ok_two_tensors": st_file([("model.norm.weight", "BF16", [6]),
                               ("lm_head.weight", "F32", [3, 2])], metadata={"format": "pt"}),
    "ok_every_dtype": st_file([(d.lower(), d, [2]) for d in SIZES]),
    "ok_empty_and_scalar": st_file([("empty", "F32", [0, 3]), ("scalar", "I64", [])]),
    "ok_no_tensors": st_file([]),
    "ok_unpadded": st_file([("a", "U8", [3])], pad=False),
    "ok_gap": with_header({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 8, 10)}, 10),
    "ok_eight_dims": st_file([("x", "U8", [1, 2, 1, 1, 1, 1, 1, 2])]),
    # Invalid: one broken rule each.
    "bad_short": b"\x10\x00\x00",
    "bad_length_past_end": with_header({"a": entry("U8", [1], 0, 1)}, 1, length=4096),
    "bad_length_huge": struct.pack("<Q", 1 << 40) + b"{}      ",
    "bad_not_json": with_header({}, 0)[:8] + b"{\"a\":   ",
    "bad_not_object": struct.pack("<Q", 8) + b"[1,2,3] ",
    "bad_trailing": struct.pack("<Q", 8) + b"{} x    ",
    "bad_overlap": with_header({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12),
    "bad_duplicate": struct.pack("<Q", 96) + (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}').ljust(96) + b"\0\0",
    "bad_offsets_vs_shape": with_header({"a": entry("F32", [3], 0, 8)}, 8),
    "bad_offsets_reversed": with_header({"a": entry("U8", [0], 4, 2)}, 4),
    "bad_offsets_past_data": with_header({"a": entry("U8", [4], 0, 4)}, 2),
    "bad_dtype": with_header({"a": entry("Q4_K", [2], 0, 2)}, 2),
    "bad_nine_dims": with_header({"a": entry("U8", [1] * 9, 0, 1)}, 1),
    "bad_shape_overflow": with_header({"a": entry("I64", [2**40, 2**40], 0, 8)}, 8),
    "bad_shape_negative": with_header({"a": entry("U8", [-1], 0, 1)}, 1),
    "bad_shape_float": with_header({"a": entry("U8", [1.5], 0, 1)}, 1),
    "bad_missing_key": with_header({"a": {"dtype": "U8", "shape": [1]}}, 1),
    "bad_metadata": with_header({"__metadata__": {"format": 1}}, 0),
    "bad_metadata_twice": struct.pack("<Q", 48) +
        b'{"__metadata__":{},"__metadata__":{"a":"b"}}'.ljust(48),
}

INDEX_OK = {"metadata": {"total_size": 40},
            "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                           "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                           "model.norm.weight": "model-00002-of-00002.safetensors"}}

INDEX = {
    "ok_two_shards": (json.dumps(INDEX_OK, indent=2, sort_keys=True) + "\n").encode(),
    "ok_compact": b'{"weight_map":{"a":"m.safetensors"}}',
    "ok_empty_map": b'{"metadata":{},"weight_map":{}}',
    "ok_metadata_kinds": b'{"metadata":{"s":"x","n":1.5,"l":[1,{"k":null}],"b":true},'
                         b'"weight_map":{"a":"f"}}',
    "bad_not_json": b'{"weight_map":{"a":',
    "bad_not_object": b'["weight_map"]',
    "bad_no_weight_map": b'{"metadata":{"total_size":1}}',
    "bad_weight_map_list": b'{"weight_map":["a","b"]}',
    "bad_value_number": b'{"weight_map":{"a":1}}',
    "bad_dotdot": b'{"weight_map":{"a":".."}}',
    "bad_directory": b'{"weight_map":{"a":"../model.safetensors"}}',
    "bad_backslash": b'{"weight_map":{"a":"sub\\\\m.safetensors"}}',
    "bad_empty_file": b'{"weight_map":{"a":""}}',
    "bad_duplicate": b'{"weight_map":{"a":"f","a":"g"}}',
    "bad_metadata_list": b'{"metadata":[1],"weight_map":{}}',
    "bad_trailing": b'{"weight_map":{}} }',
}


def main(argv):
    out = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "corpus")
    for sub, files in (("safetensors", SAFETENSORS), ("index", INDEX)):
        d = os.path.join(out, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, blob in sorted(files.items()):
            assert len(blob) <= 512, f"{name}: {len(blob)} bytes"
            with open(os.path.join(d, name), "wb") as f:
                f.write(blob)
    print(f"make_corpus: {len(SAFETENSORS)} files in {out}/safetensors, "
          f"{len(INDEX)} in {out}/index")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
