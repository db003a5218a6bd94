"""An independent reader of zip-format torch.save files (torch >= 1.6), without
torch: Python's zipfile, Python's own pickle with stub classes for the torch
globals, numpy for the storages. Prints {file: {name: {"shape", "dtype",
"values"}}} as JSON; tensors inside nested dicts (a Lightning checkpoint's
"state_dict") are named by their keys joined with ".".

    python torch_zip_oracle.py FILE...
"""
import json
import sys
import zipfile

import numpy as np

from torch_pickle import DTYPES, Tensor, TorchUnpickler


class Unpickler(TorchUnpickler):
    def __init__(self, f, archive, root):
        super().__init__(f, encoding="utf-8")
        self.archive, self.root = archive, root

    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid
        assert kind == "storage", pid
        raw = self.archive.read(f"{self.root}/data/{key}")
        return np.frombuffer(raw, np.dtype(DTYPES[storage_type]).newbyteorder("<"))


def tensors(obj, prefix, out):
    if isinstance(obj, Tensor):
        n = int(np.prod(obj.size)) if obj.size else 1
        flat = np.lib.stride_tricks.as_strided(obj.storage[obj.offset:], shape=obj.size,
                                               strides=[s * obj.storage.itemsize for s in obj.stride])
        assert flat.size == n
        out[prefix] = {"shape": list(obj.size), "dtype": str(obj.storage.dtype),
                       "values": flat.astype(float).ravel().tolist()}
    elif isinstance(obj, dict):
        for k, v in obj.items():
            tensors(v, f"{prefix}.{k}" if prefix else str(k), out)


def read(path):
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
        assert len(pkl) == 1, z.namelist()
        root = pkl[0][: -len("/data.pkl")]
        assert z.read(f"{root}/byteorder") == b"little"
        with z.open(pkl[0]) as f:
            obj = Unpickler(f, z, root).load()
    out = {}
    tensors(obj, "", out)
    return out


if __name__ == "__main__":
    print(json.dumps({p: read(p) for p in sys.argv[1:]}))
