"""Write the per-rank strategy files of a pipeline-parallel job, with
MindSpore's own node_strategy_pb2 (or as the JSON variant).

usage: strategy_make_pipeline.py OUT_DIR PP FORMAT
  FORMAT: "ckpt" (protobuf) or "json".

Each stage has 4 devices (dev_matrix [2, 2]), so ranks are 0 .. 4*PP-1 and
files are OUT_DIR/ckpt_strategy_rank_{rank}.{ckpt,json}. Files of one stage
hold the same records; current_stage (a meaningless C++ counter) alternates
with the rank, so some files of a stage are byte-identical and some are not.

Each stage holds:
  - model.layers.{s}.attention.wq.weight   plain map [1, -1]
  - adam_m.model.layers.{s}.attention.wq.weight  opt shard step 1, size 2
  - model.layers.{s}.feed_forward.w2.weight      map [-1, 0], opt shard step 2, size -1
  - model.layers.{s}.feed_forward.w1.weight      nested map [[1, 0], [-1]] (protobuf only)
  - model.layers.{s}.ffn_norm.weight             1-D nested [[1, 0]] + empty record (protobuf only)
  - stage 0: model.tok_embeddings.embedding_weight, map [-1, -1], field 2,
             param_split_shape [4, 12], indices_offset [0, 4]
  - last stage: the same embedding again (shared), map [0, -1]; lm_head.weight
  - stages >= 1 when PP > 2: shared.middle with map [s % 2, -1] (a parameter in
    several non-zero stages, whose rank-dependent layout depends on order)
"""
import json
import os
import sys

from mindspore.train import node_strategy_pb2 as pb

DEV = [2, 2]


def layouts(stage, pp):
    """(name, tensor_map records, shape, field, step, size, split, offset)."""
    out = [
        (f"model.layers.{stage}.attention.wq.weight", [[1, -1]], [8, 8], 0, 0, 0, [], []),
        (f"adam_m.model.layers.{stage}.attention.wq.weight", [[1, -1]], [8, 8], 0, 1, 2, [], []),
        (f"model.layers.{stage}.feed_forward.w2.weight", [[-1, 0]], [16, 8], 0, 2, -1, [], []),
        (f"model.layers.{stage}.feed_forward.w1.weight", [[1, 0], [-1]], [8, 16], 0, 0, 0, [], []),
        (f"model.layers.{stage}.ffn_norm.weight", [[1, 0], []], [8], 0, 0, 0, [], []),
    ]
    if stage == 0:
        out.append(("model.tok_embeddings.embedding_weight", [[-1, -1]], [16, 8], 2, 0, 0,
                    [4, 12], [0, 4]))
    if pp > 2 and stage >= 1:
        out.append(("shared.middle", [[stage % 2, -1]], [4, 4], 0, 0, 0, [], []))
    if stage == pp - 1:
        out.append(("model.tok_embeddings.embedding_weight", [[0, -1]], [16, 8], 0, 0, 0, [], []))
        out.append(("lm_head.weight", [[1, -1]], [16, 8], 0, 0, 0, [], []))
    return out


def strategies(stage):
    return [
        (f"MatMul_model.layers.{stage}.attention.wq.weight", [[2, 1], [2, 1]]),
        (f"Gather_stage{stage}", [[1, 1], [2, 1]]),
    ]


def protobuf(stage, pp, current_stage):
    m = pb.ParallelStrategyMap()
    m.current_stage = current_stage
    for node, dims in strategies(stage):
        item = m.parallel_strategy_item.add()
        item.node_name = node
        item.parallel_strategys.stage = stage
        for d in dims:
            item.parallel_strategys.parallel_strategy.add().dim.extend(d)
    for name, maps, _shape, field, step, size, split, offset in layouts(stage, pp):
        item = m.parallel_layout_item.add()
        item.param_name = name
        lay = item.parallel_layouts
        lay.dev_matrix.add().dim.extend(DEV)
        for tm in maps:
            lay.tensor_map.add().dim.extend(tm)
        lay.param_split_shape.add().dim.extend(split)
        lay.indices_offset.add().dim.extend(offset)
        lay.field = field
        lay.opt_weight_shard_step = step
        lay.opt_weight_shard_size = size
    return m.SerializeToString()


def as_json(stage, pp, current_stage):
    items = {node: {"stage": stage, "parallel_strategy": dims} for node, dims in strategies(stage)}
    lays = {}
    for name, maps, shape, field, step, size, split, offset in layouts(stage, pp):
        if len(maps) > 1:
            continue  # the JSON variant has no nested tensor maps
        lay = {"dev_matrix": DEV, "tensor_map": maps[0], "tensor_shape": shape, "field": field,
               "opt_weight_shard_step": step, "opt_weight_shard_size": size}
        if split:
            lay["param_split_shape"] = split
            lay["indices_offset"] = offset
        lays[name] = lay
    doc = {"current_stage": current_stage, "parallel_strategy_item": items,
           "parallel_layout_item": lays}
    return json.dumps(doc).encode()


def main():
    out_dir, pp, fmt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(out_dir, exist_ok=True)
    for rank in range(4 * pp):
        stage = rank // 4
        data = (protobuf if fmt == "ckpt" else as_json)(stage, pp, rank % 2)
        with open(os.path.join(out_dir, f"ckpt_strategy_rank_{rank}.{fmt}"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
