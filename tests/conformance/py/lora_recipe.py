"""mindformers' LoRA merge recipe (tools/transform_ckpt_lora.py), run in MindSpore.

usage: lora_recipe.py SRC OUT_FILE SCALE [SRC_STRATEGY]
SRC: a full .ckpt, or a rank_x directory (then SRC_STRATEGY: merged strategy
file or directory) which is first gathered with ms.transform_checkpoints,
exactly as the tool does. Writes the merged full checkpoint to OUT_FILE.

The merge itself is src/ops/bench/py/lora_merge.py, the very code
`reshard bench` times as MindSpore's LoRA step.
"""
import os
import sys
import tempfile

from common import ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "..", "src", "ops", "bench", "py"))
from lora_merge import merge  # noqa: E402

src, out, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
if os.path.isdir(src):
    strategy = sys.argv[4]
    if os.path.isdir(strategy):
        merged = os.path.join(tempfile.mkdtemp(), "merged.ckpt")
        ms.merge_pipeline_strategys(strategy, merged)
        strategy = merged
    gathered = tempfile.mkdtemp()
    ms.transform_checkpoints(src, gathered, "checkpoint_", strategy, None)
    src = os.path.join(gathered, "rank_0", "checkpoint_0.ckpt")

ms.save_checkpoint(merge(ms.load_checkpoint(src), scale), out)
print("ok")
