"""Oracles for `reshard convert` (run with MindSpore 2.10's Python).

  convert_check.py load CKPT...            MindSpore's load_checkpoint of each file (describe_file)
  convert_check.py cast IN.f32 OUT         MindSpore's float32 -> bfloat16/float16 casts (OUT.bf16, OUT.f16)
  convert_check.py mindformers SRC JOBS.json
                                           for each job {fixture, hf, ckpt, concat}: the names and values
                                           mindformers' own conversion functions (extracted from its
                                           wheels, see ci/mindformers.sh) give for the HuggingFace
                                           tensors, against what MindSpore loads from the ckpt
"""
import ast
import contextlib
import json
import os
import struct
import sys
import types

from common import describe_file, die
from common import die as _die

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402


# --- HuggingFace safetensors, read without the safetensors package -----------------------------

_DT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[8 + n + a:8 + n + b], dtype=_DT[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = bf16_to_f32(arr).reshape(info["shape"])
        out[name] = arr
    return out


def read_hf(directory):
    tensors = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            tensors.update(read_safetensors(os.path.join(directory, f)))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    return tensors, config


def load_ms(ckpt):
    """name -> float32 array, in record order."""
    out = {}
    for k, v in ms.load_checkpoint(ckpt).items():
        a = v.asnumpy()
        out[k] = a.astype(np.float32) if a.dtype != np.float32 else a
    return out


# --- extracting mindformers functions without importing mindformers ----------------------------

def extract(path, wanted, env):
    """Executes the top-level functions/assignments named in `wanted` (and
    `Class.member` for class attributes and methods, bound as `Class_member`)
    of the source file `path` in `env`."""
    tree = ast.parse(open(path).read(), path)
    nodes = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            node.decorator_list = []
            nodes.append(node)
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in wanted for t in node.targets):
            nodes.append(node)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                name = getattr(sub, "name", None)
                if isinstance(sub, ast.Assign):
                    name = sub.targets[0].id if isinstance(sub.targets[0], ast.Name) else None
                if name and f"{node.name}.{name}" in wanted:
                    if isinstance(sub, ast.FunctionDef):
                        sub.decorator_list = []
                        sub.name = f"{node.name}_{name}"
                    else:
                        sub.targets = [ast.Name(id=f"{node.name}_{name}", ctx=ast.Store())]
                    nodes.append(sub)
    module = ast.Module(body=nodes, type_ignores=[])
    exec(compile(ast.fix_missing_locations(module), path, "exec"), env)
    missing = [w for w in wanted if w.replace(".", "_") not in env]
    if missing:
        die(f"{path}: cannot find {missing}")
    return env


class _Logger:
    def warning(self, *a, **k):
        pass

    info = warning


def env_base():
    return {"np": np, "ms": ms, "logger": _Logger(), "re": __import__("re")}


CURRENT = ""


def compare(expected, got, ordered=None):
    """expected: name -> array. Every name, shape and value must match."""
    die = lambda msg: _die(f"{CURRENT}: {msg}")  # noqa: E731
    if set(expected) != set(got):
        die(f"names differ:\n  only mindformers: {sorted(set(expected) - set(got))}\n"
            f"  only reshard: {sorted(set(got) - set(expected))}")
    for k, v in expected.items():
        v = np.asarray(v, dtype=np.float32)
        if tuple(v.shape) != tuple(got[k].shape):
            die(f"{k}: mindformers shape {v.shape}, reshard {got[k].shape}")
        if not np.array_equal(v, got[k]):
            die(f"{k}: values differ")
    if ordered is not None and list(ordered) != list(got):
        die(f"record order differs:\n  mindformers: {list(ordered)}\n  reshard:     {list(got)}")
    return len(expected)


# --- one check per family -----------------------------------------------------------------------

def llama(src, hf, cfg, got, concat):
    """1.3.2 models/llama/convert_weight.py::convert_pt_to_ms (name_replace and
    its fix-ups) over state_dict order; with concat, 2.1.0 llama.py
    LlamaForCausalLM.convert_weight_dict (_concat_qkv_weight /
    _concat_ffn_weight with utils/convert_utils.py::qkv_concat_hf2mg and
    ffn_concat_hf2mg); names also against 2.1.0 LlamaForCausalLM.convert_name."""
    e = extract(f"{src}/1.3.2/mindformers/models/llama/convert_weight.py", {"name_replace"}, env_base())
    e2 = extract(f"{src}/2.1.0/mindformers/models/llama/llama.py", {"LlamaForCausalLM.convert_name"}, env_base())
    u = extract(f"{src}/2.1.0/mindformers/utils/convert_utils.py",
                {"qkv_concat_hf2mg", "ffn_concat_hf2mg"}, env_base())
    expected = {}
    for name, value in hf.items():
        n = e["name_replace"](name)
        if n == 'norm.weight':
            n = 'norm_out.weight'
        if n[:7] == 'layers.':
            n = n[7:]
        if e2["LlamaForCausalLM_convert_name"](None, name) != n:
            die(f"1.3.2 name_replace and 2.1.0 convert_name disagree on {name}")
        expected[n] = value
    if concat:
        heads, kv, hidden = cfg["num_attention_heads"], cfg.get("num_key_value_heads"), cfg["hidden_size"]
        ffn = cfg["intermediate_size"]
        for l in range(cfg["num_hidden_layers"]):
            for kind in ("weight", "bias"):
                names = [f"model.layers.{l}.attention.{w}.{kind}" for w in ("wq", "wk", "wv")]
                if names[0] not in expected:
                    continue
                cat = np.concatenate([expected.pop(n) for n in names], 0)
                expected[f"model.layers.{l}.attention.w_qkv.{kind}"] = u["qkv_concat_hf2mg"](cat, heads, kv, hidden)
            names = [f"model.layers.{l}.feed_forward.{w}.weight" for w in ("w1", "w3")]
            cat = np.concatenate([expected.pop(n) for n in names], 0)
            expected[f"model.layers.{l}.feed_forward.w_gate_hidden.weight"] = u["ffn_concat_hf2mg"](cat, ffn)
        return compare(expected, got)
    return compare(expected, got, ordered=expected.keys())


def glm(src, hf, cfg, got, concat):
    """1.3.2 models/glm2/convert_weight.py::convert_pt_to_ms (only
    word_embeddings.weight -> embedding_weight); without concat, 2.1.0
    glm2.py::_split_qkv_weight / _split_ffn_weight."""
    expected = {k.replace("word_embeddings.weight", "embedding_weight"): v for k, v in hf.items()}
    if concat:
        return compare(expected, got, ordered=expected.keys())
    env = env_base()
    env.update({"check_safetensors_addition_param_support": lambda: False})
    e = extract(f"{src}/2.1.0/mindformers/models/glm2/glm2.py", {"_split_qkv_weight", "_split_ffn_weight"}, env)
    conf = types.SimpleNamespace(kv_channels=cfg["kv_channels"], num_attention_heads=cfg["num_attention_heads"],
                                 multi_query_group_num=cfg["multi_query_group_num"],
                                 ffn_hidden_size=cfg["ffn_hidden_size"])
    e["_split_qkv_weight"]([k for k in expected if "query_key_value" in k], conf, expected)
    e["_split_ffn_weight"]([k for k in expected if "dense_h_to_4h" in k], conf, expected)
    return compare(expected, got)


def qwen3(src, hf, cfg, got, moe):
    """2.1.0 models/qwen3(_moe)/utils.py weight_mapping through
    ModelMixin.convert_name; TrainModelMixin.concat_qkv_interleaved and
    concat_linear_fc1_interleaved (qwen3) / concat_linear_fc1_contiguous
    (qwen3_moe dense layers); experts through
    checkpoint/converter/convert_op.py::ExpertsConvertOp._hf_to_mf."""
    cls = "Qwen3MoePreTrainedModel" if moe else "Qwen3PreTrainedModel"
    pkg = "qwen3_moe" if moe else "qwen3"
    e = extract(f"{src}/2.1.0/mindformers/models/{pkg}/utils.py", {f"{cls}.weight_mapping"}, env_base())
    mapping = e[f"{cls}_weight_mapping"]
    m = extract(f"{src}/2.1.0/mindformers/parallel_core/utils/model_mixin.py",
                {"TrainModelMixin.concat_qkv_interleaved", "TrainModelMixin.concat_linear_fc1_interleaved",
                 "TrainModelMixin.concat_linear_fc1_contiguous"}, env_base())
    env = env_base()
    import typing
    env.update({"dataclass": __import__("dataclasses").dataclass, "ABC": object,
                "abstractmethod": lambda f: f, "Dict": typing.Dict, "List": typing.List,
                "Tuple": typing.Tuple, "Optional": typing.Optional, "Union": typing.Union,
                "TransformerConfig": object, "get_auto_parallel_context": lambda *_: 1})
    src_op = f"{src}/2.1.0/mindformers/checkpoint/converter/convert_op.py"
    tree = ast.parse(open(src_op).read())
    body = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("ConvertOp", "ExpertsConvertOp")]
    exec(compile(ast.fix_missing_locations(ast.Module(body=body, type_ignores=[])), src_op, "exec"), env)

    def convert_name(n):
        for a, b in mapping:
            if a in n:
                n = n.replace(a, b)
        return n

    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    ffn = cfg["intermediate_size"]
    expected = {}
    for name, value in hf.items():
        expected[convert_name(name)] = value
    experts = cfg.get("num_experts", 0)
    for l in range(cfg["num_hidden_layers"]):
        p = f"decoder.layers.{l}."
        q = f"{p}self_attention.linear_q.weight"
        vals = [expected.pop(q.replace("linear_q", w)) for w in ("linear_q", "linear_k", "linear_v")]
        expected.update(m["TrainModelMixin_concat_qkv_interleaved"](None, *vals, q, hd, kv, heads))
        g = f"{p}mlp.gating.weight"
        if g in expected:
            gate, up = expected.pop(g), expected.pop(g.replace("gating", "hidden"))
            if moe:
                expected.update(m["TrainModelMixin_concat_linear_fc1_contiguous"](None, gate, up, g))
            else:
                expected.update(m["TrainModelMixin_concat_linear_fc1_interleaved"](None, gate, up, g, ffn))
        if moe and f"{p}mlp.experts.0.gating.weight" in expected:
            op1 = env["ExpertsConvertOp"](hf_names=["a", "b"], mf_names=["c"], num_moe_experts=experts,
                                          hidden_size=cfg["hidden_size"], expert_parallel_size=1,
                                          optimizer_parallel_size=1, moe_ffn_hidden_size=cfg["moe_intermediate_size"])
            gate = np.stack([expected.pop(f"{p}mlp.experts.{x}.gating.weight") for x in range(experts)])
            up = np.stack([expected.pop(f"{p}mlp.experts.{x}.hidden.weight") for x in range(experts)])
            expected[f"{p}mlp.experts.weight1"] = op1._hf_to_mf([gate, up])[0]
            op2 = env["ExpertsConvertOp"](hf_names=["a"], mf_names=["c"], num_moe_experts=experts,
                                          hidden_size=cfg["hidden_size"], expert_parallel_size=1,
                                          optimizer_parallel_size=1, moe_ffn_hidden_size=cfg["moe_intermediate_size"])
            down = np.stack([expected.pop(f"{p}mlp.experts.{x}.linear_fc2.weight") for x in range(experts)])
            expected[f"{p}mlp.experts.weight2"] = op2._hf_to_mf([down])[0]
    return compare(expected, got)


def gpt(src, hf, cfg, got, _):
    """1.3.2 models/gpt2/convert_weight.py: generate_params_dict over its
    ms_name/torch_name tables (record order), split_torch_attention
    (np.split(.., 3, -1) of c_attn) and the transpose of c_attn weights."""
    e = extract(f"{src}/1.3.2/mindformers/models/gpt2/convert_weight.py",
                {"ms_name", "torch_name", "addition_mindspore", "addition_torch", "generate_params_dict"},
                env_base())
    weights = dict(hf)
    for name in list(weights):
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            q, k, v = np.split(weights.pop(name), 3, -1)
            weights[name + ".q"], weights[name + ".k"], weights[name + ".v"] = q, k, v
    expected = {}
    for ms_n, pt_n in e["generate_params_dict"](cfg["n_layer"], e["ms_name"], e["torch_name"],
                                                e["addition_mindspore"], e["addition_torch"]):
        if pt_n in weights:
            value = weights[pt_n]
            if "c_attn.weight" in pt_n:
                value = value.transpose([1, 0])
            expected[ms_n] = value
    return compare(expected, got, ordered=expected.keys())


def cogvlm2(src, hf, cfg, got, image):
    """1.3.2 models/cogvlm2/convert_weight.py: name_replace_visual,
    name_replace_adapter, name_replace_llama3(_for_image) and the inv_freq
    rule of convert_pt_to_ms, over safe_open's sorted keys. Its q/k/v split
    hard-codes Llama-3-8B rows (4096/5120); the tiny fixture's split is
    checked by name only, values by the Rust tests."""
    torch = types.SimpleNamespace(unsqueeze=lambda v, d: np.expand_dims(v, d))
    env = env_base()
    env["torch"] = torch
    e = extract(f"{src}/1.3.2/mindformers/models/cogvlm2/convert_weight.py",
                {"name_replace_visual", "name_replace_adapter", "name_replace_llama3",
                 "name_replace_llama3_for_image"}, env)
    expected, split_names = {}, set()
    saved = False
    for k in sorted(hf):
        v = hf[k]
        if k.endswith('self_attn.rotary_emb.inv_freq'):
            if saved:
                continue
            k, saved = 'llm_model.model.freqs_mgr.freqs', True
        elif k.startswith('model.vision.patch_embedding') or k.startswith('model.vision.transformer'):
            k, v = e["name_replace_visual"](k, v)
        elif k.startswith('model.vision'):
            k, v = e["name_replace_adapter"](k, v)
        elif image:
            k, v = e["name_replace_llama3_for_image"](k, v)
        else:
            k, v = e["name_replace_llama3"](k, v)
        if isinstance(k, list):
            split_names.update(k)
            for n in k:
                expected[n] = None
        else:
            expected[k] = v
    for n in split_names:
        expected[n] = got.get(n)
    return compare(expected, got)


def whisper(src, hf, cfg, got, _):
    """1.3.2 models/whisper/convert_weight.py::convert_pt_to_ms, run with
    torch.load / ms.Tensor / ms.save_checkpoint stubbed to capture what it saves."""
    saved = []
    fake_torch = types.SimpleNamespace(load=lambda _p: {k: types.SimpleNamespace(numpy=(lambda v=v: v))
                                                       for k, v in hf.items()})
    fake_ms = types.SimpleNamespace(Tensor=lambda a, dtype=None: a, float32=None,
                                    save_checkpoint=lambda lst, _p: saved.extend(lst))
    env = env_base()
    env.update({"torch": fake_torch, "ms": fake_ms})
    e = extract(f"{src}/1.3.2/mindformers/models/whisper/convert_weight.py", {"convert_pt_to_ms"}, env)
    e["convert_pt_to_ms"]("unused", "unused", dtype=None)
    expected = {d["name"]: d["data"] for d in saved}
    return compare(expected, got, ordered=expected.keys())


FAMILIES = {
    "llama": lambda *a: llama(*a), "qwen2": lambda *a: llama(*a), "yi": lambda *a: llama(*a),
    "deepseek": lambda *a: llama(*a), "internlm": lambda *a: llama(*a),
    "glm": glm, "qwen3": lambda s, h, c, g, _: qwen3(s, h, c, g, False),
    "qwen3_moe": lambda s, h, c, g, _: qwen3(s, h, c, g, True), "gpt": gpt,
    "cogvlm2": lambda s, h, c, g, _: cogvlm2(s, h, c, g, False),
    "cogvlm2_image": lambda s, h, c, g, _: cogvlm2(s, h, c, g, True), "whisper": whisper,
}


def main():
    cmd = sys.argv[1]
    if cmd == "load":
        print(json.dumps({p: describe_file(p) for p in sys.argv[2:]}))
    elif cmd == "cast":
        src, out = sys.argv[2], sys.argv[3]
        a = np.fromfile(src, dtype=np.float32)
        ms.Tensor(a, dtype=ms.bfloat16).asnumpy().tofile(out + ".bf16")
        ms.Tensor(a, dtype=ms.float16).asnumpy().tofile(out + ".f16")
        print(json.dumps({"n": int(a.size)}))
    elif cmd == "mindformers":
        src = sys.argv[2]
        with open(sys.argv[3]) as f:
            jobs = json.load(f)
        results = []
        for job in jobs:
            hf, cfg = read_hf(job["hf"])
            # The model's state_dict() order (what from_pretrained gives mindformers).
            hf = {k: hf[k] for k in job["order"]}
            got = load_ms(job["ckpt"])
            global CURRENT
            CURRENT = job["fixture"] + (" (concat)" if job["concat"] else "")
            with contextlib.redirect_stdout(sys.stderr):  # the converters print progress
                n = FAMILIES[job["fixture"]](src, hf, cfg, got, job["concat"])
            results.append({"fixture": job["fixture"], "concat": job["concat"], "checked": n})
        print(json.dumps(results))
    else:
        die(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
