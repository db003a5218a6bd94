"""MindSpore's `transform_checkpoints`, timed without the imports (reshard bench)."""
import os, sys, time
os.environ.setdefault("GLOG_v", "3")
import mindspore as ms
src, dst, s, d = sys.argv[1:5]
t = time.time()
ms.transform_checkpoints(src, dst, "checkpoint_", None if s == "-" else s, None if d == "-" else d)
print(time.time() - t)
