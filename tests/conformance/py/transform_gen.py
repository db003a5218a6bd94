"""Builds transform cases and MindSpore's answer for each.

usage: transform_gen.py OUT_DIR CASES_JSON

CASES_JSON: [{"name", "dtype": "float32"|"float16"|"bfloat16",
              "src": SIDE|null, "dst": SIDE|null, "format": "ckpt"|"safetensors"}]
SIDE: {"dev": [..], "pp": 1, "opt": 0|2|-1, "nested": false, "vocab_mp": false}

For each case OUT_DIR/<name>/ gets:
  full/rank_0/full.ckpt              the full model (save_checkpoint)
  src_strategy/ckpt_strategy_rank_{r}.ckpt + merged.ckpt   (written with node_strategy_pb2)
  dst_strategy/...                   likewise
  src/rank_{r}/src_{r}.{fmt}         the source shards: ms.transform_checkpoints(full, ..., dst=src strategy)
  expect/rank_{r}/checkpoint_{r}.{fmt}   ms.transform_checkpoints(src, ..., src, dst)
For "safetensors" cases, src/ and expect/ are the ckpt results converted by
ms.ckpt_to_safetensors (see make_case for why).
A side of null means unsharded: the source is full/, the destination one full file.
"""
import json
import os
import shutil
import sys
import zlib

from common import ms, np
from mindspore.train import node_strategy_pb2 as pb

HIDDEN, FFN, VOCAB, LAYERS = 16, 32, 32, 2


def params(pp):
    """(name, shape, kind, stage): kind picks the tensor map."""
    out = []
    stage_of_layer = lambda layer: min(layer * pp // LAYERS, pp - 1)  # noqa: E731
    out.append(("model.tok_embeddings.embedding_weight", [VOCAB, HIDDEN], "embed", 0))
    for layer in range(LAYERS):
        p, s = f"model.layers.{layer}", stage_of_layer(layer)
        for w in ("wq", "wk", "wv"):
            out.append((f"{p}.attention.{w}.weight", [HIDDEN, HIDDEN], "col", s))
        out.append((f"{p}.attention.wo.weight", [HIDDEN, HIDDEN], "row", s))
        out.append((f"{p}.feed_forward.w1.weight", [FFN, HIDDEN], "col", s))
        out.append((f"{p}.feed_forward.w2.weight", [HIDDEN, FFN], "row", s))
        out.append((f"{p}.attention_norm.weight", [HIDDEN], "norm", s))
    out.append(("model.norm_out.weight", [HIDDEN], "norm", pp - 1))
    out.append(("lm_head.weight", [VOCAB, HIDDEN], "col", pp - 1))
    states = [(f"{k}.{n}", shape, kind, s) for k in ("adam_m", "adam_v") for n, shape, kind, s in out]
    return out + states


def tensor_map(kind, side, ndim):
    """Tensor map for dev matrix side["dev"]; axis 0 (rightmost) is model parallel."""
    ndev = len(side["dev"])
    if kind == "col":
        if side.get("nested") and ndev >= 3:
            return [[2, 0], [-1]]  # dim 0 split by the outer and inner axes
        return [0, -1]
    if kind == "row":
        return [-1, 0]
    if kind == "embed":
        return [0, -1] if side.get("vocab_mp") else [-1, -1]
    return [-1] * ndim


def opt_shard(dev, tmap, opt):
    """(step, size) MindSpore accepts for this layout, or (0, 0)."""
    if not opt:
        return 0, 0
    flat = [a for t in tmap for a in (t if isinstance(t, list) else [t])]
    used = {len(dev) - 1 - a for a in flat if a >= 0}
    repeated = [i for i in range(len(dev)) if i not in used and dev[i] > 1]
    if len(repeated) != 1:
        return 0, 0
    i = repeated[0]
    size = dev[i] if opt == -1 else opt
    return int(np.prod(dev[i + 1:])), (-1 if opt == -1 else size)


def write_strategies(side, out_dir, names_shapes):
    os.makedirs(out_dir)
    pp, dev = side.get("pp", 1), side["dev"]
    per_stage = int(np.prod(dev))
    for stage in range(pp):
        m = pb.ParallelStrategyMap()
        m.current_stage = stage
        item = m.parallel_strategy_item.add()
        item.node_name = f"MatMul-stage{stage}"
        item.parallel_strategys.stage = stage
        item.parallel_strategys.parallel_strategy.add().dim.extend([1, 1])
        for name, shape, kind, s in names_shapes:
            if s != stage:
                continue
            tmap = tensor_map(kind, side, len(shape))
            step, size = opt_shard(dev, tmap, side.get("opt", 0) if kind != "norm" else 0)
            li = m.parallel_layout_item.add()
            li.param_name = name
            lay = li.parallel_layouts
            lay.dev_matrix.add().dim.extend(dev)
            if any(isinstance(t, list) for t in tmap):
                for t in tmap:
                    lay.tensor_map.add().dim.extend(t if isinstance(t, list) else [t])
            else:
                lay.tensor_map.add().dim.extend(tmap)
            lay.param_split_shape.add()
            lay.indices_offset.add()
            lay.field = 0
            lay.opt_weight_shard_step = step
            lay.opt_weight_shard_size = size
        data = m.SerializeToString()
        for local in range(per_stage):
            with open(os.path.join(out_dir, f"ckpt_strategy_rank_{stage * per_stage + local}.ckpt"), "wb") as f:
                f.write(data)
    merged = os.path.join(out_dir, "..", os.path.basename(out_dir) + "_merged.ckpt")
    if pp > 1:
        ms.merge_pipeline_strategys(out_dir, merged)
    else:
        shutil.copy(os.path.join(out_dir, "ckpt_strategy_rank_0.ckpt"), merged)
    return os.path.abspath(merged)


def make_case(root, case):
    d = os.path.join(root, case["name"])
    fmt = case.get("format", "ckpt")
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    dtype = getattr(ms, case["dtype"])
    pp = max((case.get(k) or {}).get("pp", 1) for k in ("src", "dst"))
    specs = params(1)
    full = [{"name": n, "data": ms.Tensor(rng.standard_normal(shape).astype(np.float32)).astype(dtype)}
            for n, shape, _, _ in specs]
    full.append({"name": "global_step", "data": ms.Tensor(np.array([1234], np.int32))})
    os.makedirs(os.path.join(d, "full", "rank_0"))
    ms.save_checkpoint(full, os.path.join(d, "full", "rank_0", "full.ckpt"),
                       append_dict={"epoch_num": 3, "loss_scale": 1024.0})
    strategies = {}
    for side in ("src", "dst"):
        if case.get(side):
            strategies[side] = write_strategies(case[side], os.path.join(d, f"{side}_strategy"),
                                                params(case[side].get("pp", 1)))
    if "src" in strategies:
        ms.transform_checkpoints(os.path.join(d, "full"), os.path.join(d, "src"), "src_", None, strategies["src"])
    else:
        shutil.copytree(os.path.join(d, "full"), os.path.join(d, "src"))
    if case.get("by_stage"):
        # The source strategy is one stage's per-rank file: MindSpore then
        # transforms that stage alone into {prefix}{r}_part{stage}.ckpt.
        per_stage = int(np.prod(case["src"]["dev"]))
        for stage in range(case["src"]["pp"]):
            one = os.path.join(d, "src_strategy", f"ckpt_strategy_rank_{stage * per_stage}.ckpt")
            ms.transform_checkpoints(os.path.join(d, "src"), os.path.join(d, "expect"), "checkpoint_",
                                     one, strategies.get("dst"))
    else:
        ms.transform_checkpoints(os.path.join(d, "src"), os.path.join(d, "expect"), "checkpoint_",
                                 strategies.get("src"), strategies.get("dst"))
    if fmt == "safetensors":
        # MindSpore 2.10's own safetensors transform (_transform_safetensors)
        # writes a column slice's strided numpy view as if it were contiguous
        # (rank 0 of w[16,16] split by columns gets w[:8].reshape(16, 8)), so
        # it cannot be the oracle. Its ckpt path is right: the expected
        # safetensors files are that result, converted by ckpt_to_safetensors.
        for tree in ("src", "expect"):
            ms.ckpt_to_safetensors(os.path.join(d, tree), save_path=os.path.join(d, tree + "_st"))
            shutil.rmtree(os.path.join(d, tree))
            os.rename(os.path.join(d, tree + "_st"), os.path.join(d, tree))
    del pp


def main():
    root, cases = sys.argv[1], json.load(open(sys.argv[2]))
    for case in cases:
        make_case(root, case)
    print("ok", len(cases))


if __name__ == "__main__":
    main()
