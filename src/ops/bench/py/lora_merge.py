"""mindformers' LoRA merge recipe (tools/transform_ckpt_lora.py) for a full
checkpoint's parameter dict. Shared by `reshard bench` (prepended to
lora.py) and the conformance oracle (tests/conformance/py/lora_recipe.py).

MindSpore's CPU MatMul has no bfloat16 kernel; for bf16 weights the product
is computed as Ascend's MatMul does (fp32 accumulation, bf16 output) and
the scale and add run in bf16 where the CPU supports it.
"""
from collections import OrderedDict

import mindspore as ms
import mindspore.ops as P
from mindspore import Parameter, Tensor


def merge(param_dict, scale):
    """W + scale * B @ A for every LoRA pair; the factors are dropped."""
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
    return merged_dict
