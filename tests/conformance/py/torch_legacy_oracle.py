"""An independent reader of legacy torch.save files, without torch: Python's
own pickle with stub classes for the torch globals, numpy for the storages.
Prints {name: {"shape": [...], "values": [...]}} as JSON for each file given.

    python torch_legacy_oracle.py FILE...
"""
import collections
import json
import pickle
import sys

import numpy as np

DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
          "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


class Storage:
    def __init__(self, kind):
        self.kind = kind


def rebuild(storage, offset, size, stride, *rest):
    return ("tensor", storage, offset, tuple(size), tuple(stride))


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild
        if module == "torch" and name in DTYPES:
            return Storage(name)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid[:5]
        return (storage_type.kind, key)


def read(path):
    with open(path, "rb") as f:
        for _ in range(3):  # magic, protocol, sys info
            pickle.load(f, encoding="utf-8")
        obj = Unpickler(f, encoding="utf-8").load()
        keys = pickle.load(f, encoding="utf-8")
        kinds = {t[1][1]: t[1][0] for t in obj.values()}
        data = {}
        for k in keys:
            n = int(np.frombuffer(f.read(8), "<i8")[0])
            dt = DTYPES[kinds[k]]
            data[k] = np.frombuffer(f.read(n * np.dtype(dt).itemsize), dt)
    out = {}
    for name, (_, (kind, key), offset, size, stride) in obj.items():
        n = int(np.prod(size))
        out[name] = {"shape": list(size), "values": data[key][offset:offset + n].astype(float).tolist()}
    return out


if __name__ == "__main__":
    print(json.dumps({p: read(p) for p in sys.argv[1:]}))
