"""A mindformers Checkpoint 2.0 balanced save for a destination strategy, planned by mindformers'
own helpers, as a graph-mode job would write it.

usage: checkpoint2_balanced.py MINDFORMERS_SRC FULL LAYOUTS_JSON OUT_DIR

FULL is the full model (.safetensors). LAYOUTS_JSON, written by the test from the strategy file:
  {"world": W, "stage_size": S,
   "params": {name: {"dev_matrix": [...], "tensor_map": [[...], ...], "opt_shard_size": k,
                     "stage": s}}}
A parameter missing from "params" is unsharded and held by every rank (layout None).

Each parameter's layout is what MindSpore 2.10's get_strategy_metadata gives mindformers in graph
mode: _NetStrategyInfo._layout_process of the strategy's device matrix, tensor map and
opt_weight_shard_size (which folds the optimizer shard into the tensor map), over the ranks of its
pipeline stage (a device matrix covers one stage). Then, per rank, mindformers 2.1.0's
get_sharded_tensor_from_strategy_metadata; the balanced plan (_compute_balanced_assignment_on_rank0)
and metadata.json (save_balanced_metadata). Each saving rank's file holds its shards, cut from the
full tensors by the rank's coordinates in the layout (nested tensor-map entries outermost first),
independently of mindformers' slice ids. Names, dtypes and shapes come from FULL.

OUT_DIR gets iteration_00000001/ and latest_checkpointed_iteration.txt.
"""
import json
import os
import sys
from types import SimpleNamespace

from checkpoint2_gen import load_mindformers
from common import ms, np
from mindspore.parallel.strategy import _NetStrategyInfo


def layout_of(p, ranks, dtype, shape):
    info = object.__new__(_NetStrategyInfo)
    stra = SimpleNamespace(opt_weight_shard_size=p["opt_shard_size"], dev_matrix=list(p["dev_matrix"]),
                           tensor_map=[list(d) for d in p["tensor_map"]], rank_list=list(ranks),
                           tensor_type=dtype, tensor_shape=list(shape))
    return info._layout_process(stra)[0]


def cut(arr, layout, position):
    """The slice of `arr` the rank at `position` of the layout's rank list holds."""
    d = layout.to_dict()
    dev, tmap = list(d["device_matrix"]), d["tensor_map"]
    n = len(dev)
    coord, rest = [0] * n, position
    for i in range(n - 1, -1, -1):
        coord[i], rest = rest % dev[i], rest // dev[i]
    idx = []
    for size, entry in zip(arr.shape, tmap):
        axes = [a for a in (entry if isinstance(entry, (list, tuple)) else [entry]) if a != -1]
        k, parts = 0, 1
        for a in axes:
            k = k * dev[n - 1 - a] + coord[n - 1 - a]
            parts *= dev[n - 1 - a]
        local = size // parts
        idx.append(slice(k * local, (k + 1) * local))
    return np.ascontiguousarray(arr[tuple(idx)])


def main():
    src, full_path, layouts_path, out = sys.argv[1:5]
    _, sharded, balanced, utils = load_mindformers(src)
    with open(layouts_path) as f:
        spec = json.load(f)
    world, stage_size, params = spec["world"], spec["stage_size"], spec["params"]
    full = ms.load_checkpoint(full_path, format="safetensors")
    layouts = {}
    for name, p in params.items():
        stage = p["stage"]
        ranks = range(stage * stage_size, (stage + 1) * stage_size)
        layouts[name] = (stage, layout_of(p, ranks, full[name].dtype, full[name].shape))
    metas = {}
    for r in range(world):
        infos = {}
        for name, t in full.items():
            if name not in layouts:
                infos[name] = [None, t.dtype, tuple(t.shape)]
            elif layouts[name][0] == r // stage_size:
                infos[name] = [layouts[name][1], t.dtype, tuple(t.shape)]
        metas[r] = sharded.get_sharded_tensor_from_strategy_metadata(infos, r)
    _, assignment = balanced._compute_balanced_assignment_on_rank0(metas, world)
    plan = balanced.BalancedShardPlan(full_assignment=assignment, total_files_num=len(assignment))
    it = os.path.join(out, "iteration_00000001")
    os.makedirs(it)
    for file_id, (rank, shards) in enumerate(assignment.items()):
        local = {}
        for shard_id in shards:
            name, _ = utils._reverse_sharded_tensor_shard_id(shard_id)
            arr = full[name].asnumpy()
            if name in layouts:
                arr = cut(arr, layouts[name][1], rank % stage_size)
            local[name] = ms.Tensor(arr)
        ms.save_checkpoint([{"name": n, "data": t} for n, t in local.items()],
                           os.path.join(it, f"model-{file_id:07d}-{len(assignment):07d}.safetensors"),
                           format="safetensors")
    balanced.save_balanced_metadata(out, 1, None, [(plan, utils.FileType.MODEL, None)], metas)
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    print("ok")


if __name__ == "__main__":
    main()
