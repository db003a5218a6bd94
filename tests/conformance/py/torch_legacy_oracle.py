"""An independent reader of legacy torch.save files, without torch: Python's
own pickle with stub classes for the torch globals, numpy for the storages.
Prints {name: {"shape": [...], "values": [...]}} as JSON for each file given.

    python torch_legacy_oracle.py FILE...
"""
import json
import pickle
import sys

import numpy as np

from torch_pickle import DTYPES, TorchUnpickler


class Unpickler(TorchUnpickler):
    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid[:5]
        return (storage_type, key)


def read(path):
    with open(path, "rb") as f:
        for _ in range(3):  # magic, protocol, sys info
            pickle.load(f, encoding="utf-8")
        obj = Unpickler(f, encoding="utf-8").load()
        keys = pickle.load(f, encoding="utf-8")
        kinds = {t.storage[1]: t.storage[0] for t in obj.values()}
        data = {}
        for k in keys:
            n = int(np.frombuffer(f.read(8), "<i8")[0])
            dt = DTYPES[kinds[k]]
            data[k] = np.frombuffer(f.read(n * np.dtype(dt).itemsize), dt)
    out = {}
    for name, t in obj.items():
        _, key = t.storage
        n = int(np.prod(t.size))
        out[name] = {"shape": list(t.size), "values": data[key][t.offset:t.offset + n].astype(float).tolist()}
    return out


if __name__ == "__main__":
    print(json.dumps({p: read(p) for p in sys.argv[1:]}))
