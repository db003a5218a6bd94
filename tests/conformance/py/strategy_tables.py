"""Dump MindSpore's view of strategy files as JSON.

usage: strategy_tables.py RANKS PATH...

RANKS is a comma-separated list of rank ids ("" for none). For each PATH
prints, in one JSON object keyed by PATH:
  tables: {"none": table, "<rank>": table, ...} where table is a list of
          [name, [dev_matrix, tensor_map, param_split_shape, field,
                  opt_step, opt_size, stage_list]] in dict order
          (`_convert_to_list(strategy, rank_id)`),
  device_num: `_get_device_num_from_strategy(path)` (or {"error": ...}),
  stage_num: `_extract_pipeline_stage_num(path)` (or {"error": ...}),
  rank_lists: {"<rank>": sorted `ms.parallel.rank_list_for_transform(rank, path, None)`
              (or {"error": ...})} for each rank, when --rank-lists is the first argument.
"""
import json
import sys

import mindspore as ms

from mindspore.parallel._parallel_serialization import (
    _build_searched_strategy,
    _convert_to_list,
    _extract_pipeline_stage_num,
    _get_device_num_from_strategy,
)


def table(strategy, rank):
    return [[name, value] for name, value in _convert_to_list(strategy, rank).items()]


def guarded(fn, *args):
    try:
        return int(fn(*args))
    except Exception as e:  # noqa: BLE001 - reported to the Rust side
        return {"error": str(e)}


def rank_list(rank, path):
    try:
        return sorted(int(r) for r in ms.parallel.rank_list_for_transform(rank, path, None))
    except Exception as e:  # noqa: BLE001 - reported to the Rust side
        return {"error": str(e)}


def main():
    args = sys.argv[1:]
    with_rank_lists = args[0] == "--rank-lists"
    if with_rank_lists:
        args = args[1:]
    ranks = [int(r) for r in args[0].split(",") if r]
    out = {}
    for path in args[1:]:
        strategy = _build_searched_strategy(path)
        tables = {"none": table(strategy, None)}
        for rank in ranks:
            tables[str(rank)] = table(strategy, rank)
        out[path] = {
            "tables": tables,
            "device_num": guarded(_get_device_num_from_strategy, path),
            "stage_num": guarded(_extract_pipeline_stage_num, path),
        }
        if with_rank_lists:
            out[path]["rank_lists"] = {str(r): rank_list(r, path) for r in ranks}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
