# reshard bench's LoRA step: runs after lora_merge.py (prepended), timed
# without the imports.
import sys
import time

src, out, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = time.time()
ms.save_checkpoint(merge(ms.load_checkpoint(src), scale), out)
print(time.time() - t)
