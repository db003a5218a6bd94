"""Builds mindformers Checkpoint 2.0 iteration directories with mindformers' own helpers.

usage: checkpoint2_gen.py MINDFORMERS_SRC OUT_DIR

MINDFORMERS_SRC is ci/mindformers.sh's directory; its 2.1.0/mindformers/checkpoint/ modules
are loaded from there (mindformers itself is not installed: the few mindformers.tools names
they import are stubbed, since they only log, set file modes or ask the rank).

On a dp2·mp2 MindSpore Layout, for each rank the ShardedTensors come from
get_sharded_tensor_from_strategy_metadata (offsets from _get_global_offset_and_replica_id_from_layout),
the file mapping from get_total_params_file_mapping_info, metadata.json from save_metadata
(2.1 schema) and, for the 1.7/1.8 schema, the same JSON without rank_group, indent=4. Each
rank's model-{r:07d}-0000004.safetensors holds its local slices (MindSpore save_checkpoint).

The balanced save for a destination strategy is checkpoint2_balanced.py.

OUT_DIR gets:
  full.safetensors                       the full model
  v21/iteration_00000001/...             metadata.json (2.1) + files, latest_checkpointed_iteration.txt
  v17/iteration_00000001/...             metadata.json (1.7/1.8 schema) + the same files
  default_common.json                    CommonInfo.save_common with global_step 0 and ckpt_status 0
                                         (a model holding no counter)
  counters.safetensors                   the full model plus the counters CheckpointMonitor appends
  counters_common.json                   CommonInfo.save_common of those counters, typed as
                                         mindformers' callback sets them (int, float)

CommonInfo is taken from 2.1.0's mindformers/checkpoint/checkpoint.py by its source (that module
imports half of mindformers), and run as it is.
"""
import ast
import dataclasses
import json
import logging
import tempfile
import os
import shutil
import sys
import types

from common import ms, np
from mindspore.parallel import Layout


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load_mindformers(src):
    stub("mindformers", __path__=[])
    stub("mindformers.tools", __path__=[], get_output_root_path=lambda: "/nonexistent")
    stub("mindformers.tools.logger", logger=logging.getLogger("mindformers"))
    stub("mindformers.tools.utils", set_safe_mode_for_file_or_dir=lambda *a: None,
         get_real_rank=lambda: 0, get_real_group_size=lambda: 1)
    stub("mindformers.core", __path__=[])
    stub("mindformers.core.context", __path__=[])
    stub("mindformers.core.context.build_context", get_context=lambda *a, **k: None)
    stub("mindformers.checkpoint", __path__=[os.path.join(src, "2.1.0", "mindformers", "checkpoint")])
    import mindformers.checkpoint.metadata as metadata
    import mindformers.checkpoint.sharded_tensor as sharded
    import mindformers.checkpoint.fully_parallel as balanced
    import mindformers.checkpoint.utils as utils
    return metadata, sharded, balanced, utils


def common_info_class(src):
    """mindformers 2.1.0's CommonInfo dataclass, executed from its source."""
    path = os.path.join(src, "2.1.0", "mindformers", "checkpoint", "checkpoint.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CommonInfo")
    scope = {"dataclass": dataclasses.dataclass, "json": json, "os": os, "tempfile": tempfile,
             "logger": logging.getLogger("mindformers"),
             "set_safe_mode_for_file_or_dir": lambda *a: None}
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), scope)
    return scope["CommonInfo"]


WORLD = 4
PARAMS = [  # name, shape, tensor map on (dp, mp), dtype
    ("model.embed", [16, 8], None, ms.float32),
    ("layers.0.w_row", [8, 4], ("mp", "None"), ms.bfloat16),
    ("layers.0.w_col", [4, 8], ("None", "mp"), ms.bfloat16),
    ("layers.0.w_both", [8, 8], ("mp", "dp"), ms.float16),
    ("layers.0.norm", [8], ("None",), ms.float32),
    ("head", [16, 8], ("dp", "mp"), ms.float32),
]


def save(tensors, path):
    ms.save_checkpoint([{"name": n, "data": t} for n, t in tensors.items()], path, format="safetensors")


def main():
    src, out = sys.argv[1], sys.argv[2]
    metadata, sharded, _, _ = load_mindformers(src)
    metadata.get_group_size = lambda: WORLD
    rng = np.random.default_rng(7)
    full = {n: ms.Tensor(rng.standard_normal(s).astype(np.float32)).astype(d) for n, s, _, d in PARAMS}
    save(full, os.path.join(out, "full.safetensors"))
    base = Layout((2, 2), ("dp", "mp"))
    infos = {n: [base(*m) if m else None, d, tuple(s)] for n, s, m, d in PARAMS}
    metas = {r: sharded.get_sharded_tensor_from_strategy_metadata(infos, r) for r in range(WORLD)}
    mappings = metadata.get_total_params_file_mapping_info(metas, None, set(full))
    it = os.path.join(out, "v21", "iteration_00000001")
    os.makedirs(it)
    # Each rank's file: its local slice of every parameter, cut from the
    # rank's device coordinates (dp = r // 2, mp = r % 2) and the tensor
    # map, independently of mindformers' slice ids.
    maps = {n: m for n, _, m, _ in PARAMS}
    for r in range(WORLD):
        coord = {"dp": r // 2, "mp": r % 2, "None": 0}
        local = {}
        for name in metas[r]:
            arr = full[name]
            if maps[name]:
                idx = tuple(slice(coord[a] * (d // (2 if a != "None" else 1)),
                                  (coord[a] + 1) * (d // (2 if a != "None" else 1)))
                            for a, d in zip(maps[name], arr.shape))
                arr = ms.Tensor(np.ascontiguousarray(arr.asnumpy()[idx]))
            local[name] = arr
        save(local, os.path.join(it, f"model-{r:07d}-{WORLD:07d}.safetensors"))
    metadata.save_metadata(metas, mappings, os.path.join(it, "metadata.json"))
    with open(os.path.join(it, "common.json"), "w") as f:
        json.dump({"epoch_num": 1, "step_num": 1, "global_step": 1, "loss_scale": 1.0,
                   "global_batch_size": 8, "consumed_samples": 8, "ckpt_status": 0}, f, indent=4)
    with open(os.path.join(out, "v21", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    # The 1.7/1.8 schema: no rank_group, indent=4.
    old = os.path.join(out, "v17", "iteration_00000001")
    shutil.copytree(it, old)
    with open(os.path.join(it, "metadata.json")) as f:
        m = json.load(f)
    for entries in m["storage_data"].values():
        for e in entries:
            del e["rank_group"]
    with open(os.path.join(old, "metadata.json"), "w") as f:
        json.dump(m, f, ensure_ascii=False, indent=4)
    common_info = common_info_class(src)
    info = common_info()
    info.global_step = 0
    info.ckpt_status = 0
    info.save_common(os.path.join(out, "default_common.json"))
    counters = {"epoch_num": ms.Tensor([2], ms.int32), "step_num": ms.Tensor([40], ms.int32),
                "global_step": ms.Tensor([7], ms.int32), "loss_scale": ms.Tensor([1024.0], ms.float32),
                "global_batch_size": ms.Tensor([64], ms.int32)}
    save({**full, **counters}, os.path.join(out, "counters.safetensors"))
    info = common_info()
    info.step_num = 40
    info.epoch_num = 2
    info.global_step = 7
    info.loss_scale = float(1024.0)
    info.global_batch_size = 64
    info.ckpt_status = 0
    info.save_common(os.path.join(out, "counters_common.json"))
    print("ok")


if __name__ == "__main__":
    main()
