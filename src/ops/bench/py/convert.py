"""mindformers 1.3.2 `models/llama/convert_weight.py::convert_pt_to_ms` with
the HuggingFace safetensors read by numpy instead of torch (`name_replace`
copied verbatim); floats become the model's dtype. Timed without the
imports (reshard bench)."""
import json, os, sys, time
os.environ.setdefault("GLOG_v", "3")
import numpy as np
import mindspore as ms


def name_replace(name: str):
    """replace hf param name to ms."""
    name = name.replace('embed_tokens.weight', 'tok_embeddings.embedding_weight')
    name = name.replace('.self_attn.q_proj.', '.attention.wq.')
    name = name.replace('.self_attn.k_proj.', '.attention.wk.')
    name = name.replace('.self_attn.v_proj.', '.attention.wv.')
    name = name.replace('.self_attn.o_proj.', '.attention.wo.')
    name = name.replace('.mlp.gate_proj.', '.feed_forward.w1.')
    name = name.replace('.mlp.down_proj.', '.feed_forward.w2.')
    name = name.replace('.mlp.up_proj.', '.feed_forward.w3.')
    name = name.replace('.input_layernorm.', '.attention_norm.')
    name = name.replace('.post_attention_layernorm.', '.ffn_norm.')
    name = name.replace('.norm.', '.norm_out.')
    return name


src, out, dtype = sys.argv[1:4]
ms_dtype = {"bf16": ms.bfloat16, "fp16": ms.float16, "fp32": ms.float32}[dtype]
np_dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32,
            "I32": np.int32, "I64": np.int64}
t = time.time()
ckpt_list = []
for f in sorted(x for x in os.listdir(src) if x.endswith(".safetensors")):
    path = os.path.join(src, f)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        value = data[begin:end].view(np_dtype[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            value = (value.astype(np.uint32) << 16).view(np.float32)
        name = name_replace(name)
        if name == 'norm.weight':
            name = 'norm_out.weight'
        if name[:7] == 'layers.':
            name = name[7:]
        if info["dtype"] in ("BF16", "F16", "F32"):
            tensor = ms.Tensor(value, dtype=ms_dtype)
        else:
            tensor = ms.Tensor(np.array(value))
        ckpt_list.append({'name': name, 'data': tensor})
ms.save_checkpoint(ckpt_list, out)
print(time.time() - t)
