"""mindformers' LoRA merge recipe (tools/transform_ckpt_lora.py), run in MindSpore.

usage: lora_recipe.py SRC OUT_FILE SCALE [SRC_STRATEGY]
SRC: a full .ckpt, or a rank_x directory (then SRC_STRATEGY: merged strategy
file or directory) which is first gathered with ms.transform_checkpoints,
exactly as the tool does. Writes the merged full checkpoint to OUT_FILE.

MindSpore's CPU MatMul has no bfloat16 kernel; for bf16 weights the product
is computed as Ascend's MatMul does (fp32 accumulation, bf16 output) and
the scale and add run in bf16 where the CPU supports it.
"""
import os
import sys
import tempfile
from collections import OrderedDict

from common import ms

import mindspore.ops as P
from mindspore import Parameter, Tensor

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

param_dict = ms.load_checkpoint(src)
lora_keys = [k for k in param_dict if ('lora_a' in k or 'lora_A' in k)]
non_lora_keys = [k for k in param_dict if 'lora_' not in k]
merged_dict = OrderedDict()
for k in non_lora_keys:
    merged_dict[k] = param_dict[k].clone()
for k in lora_keys:
    if k.split('.')[0] in ['adam_m', 'adam_v']:
        continue
    original_key = (k.replace('tk_delta', 'mindpet_delta').replace('_lora_a', '')
                    .replace('mindpet_delta', 'weight').replace('.lora_A', ''))
    lora_b_key = k.replace('lora_a', 'lora_b').replace('.lora_A', '.lora_B')
    w, b, a = merged_dict[original_key], param_dict[lora_b_key], param_dict[k]
    if w.dtype == ms.bfloat16:
        product = P.mm(b.astype(ms.float32), a.astype(ms.float32)).astype(ms.bfloat16)
    else:
        product = P.mm(b, a)
    merged_dict[original_key] = Parameter(Tensor(P.add(w, product * scale), w.dtype), name=original_key)
ms.save_checkpoint(merged_dict, out)
print("ok")
