"""`mindspore.unified_safetensors` for `reshard bench`'s unify step, timed without the imports.

usage: unify.py SRC_DIR MERGED_STRATEGY DST_DIR
"""
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
import mindspore as ms  # noqa: E402

src, strategy, dst = sys.argv[1:4]
t = time.time()
ms.unified_safetensors(src, strategy, dst)
print(time.time() - t)
