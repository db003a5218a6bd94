"""Shared helpers for the conformance scripts (run with MindSpore 2.10's Python)."""
import json
import os
import sys
import zlib

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402


def describe(value):
    """What MindSpore loaded for one entry, in a form the Rust side compares."""
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    if isinstance(value, list):  # a MapParameter: keys, values, status
        return {"kind": "map", "parts": [
            {"dtype": str(a.dtype), "shape": list(a.shape), "crc32": zlib.crc32(a.tobytes())} for a in value]}
    arr = value.asnumpy()
    raw = arr.tobytes()
    return {
        "kind": "tensor",
        "dtype": str(value.dtype),
        "shape": list(value.shape),
        "nbytes": len(raw),
        "crc32": zlib.crc32(raw),
    }


def describe_file(path, **load_kwargs):
    """load_checkpoint + describe every entry, in load order."""
    loaded = ms.load_checkpoint(path, **load_kwargs)
    return [dict(name=k, **describe(v)) for k, v in loaded.items()]


def dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def die(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)
