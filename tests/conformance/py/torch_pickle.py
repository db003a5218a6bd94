"""What the two torch.save readers share (no torch needed): the storage
dtypes, the tensor rebuild global, and an unpickler that admits only those
torch globals."""
import collections
import pickle

import numpy as np

DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
          "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def rebuild(storage, offset, size, stride, *rest):
    return Tensor(storage, offset, size, stride)


class TorchUnpickler(pickle.Unpickler):
    """Refuses every global but OrderedDict, the tensor rebuild and the
    storage types; a storage type loads as its name."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild
        if module == "torch" and name in DTYPES:
            return name
        raise pickle.UnpicklingError(f"refused global {module}.{name}")
