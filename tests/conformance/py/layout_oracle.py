"""MindSpore 2.10 as the oracle for `reshard::layout` (the data rule, spec 3.3,
and the needed source ranks, spec 3.5).

usage: layout_oracle.py CASES_JSON

CASES_JSON holds
  {"slice":  [{"layout": L, "shape": G}, ...],
   "pair":   [{"src": L, "dst": L, "shape": G}, ...],
   "needed": [{"src": L, "dst": L or null, "rank": r}, ...]}
where a layout L is {"dev": [...], "map": [...], "step": s, "size": z} and
"map" is a list of ints (flat) or of lists of ints (nested "Layout" form).

Everything goes through `_transform_parallel_checkpoint`, the function
`transform_checkpoints` calls per destination rank, with float32 `arange`
data (exact up to 2**24), and prints one JSON object:
  slice:  per case {"ranks": [slice, ...], "roundtrip": bool or null} where
          rank r's slice is what the transform from the full tensor
          (src strategy None) to L writes for destination rank r, as
          {"shape": [...], "values": [...]} or {"error": msg};
          roundtrip: transforming those slices back (src L, dst None) gives
          the arange again (null when a rank failed).
  pair:   per case {"ranks": [slice, ...]} for the transform src L -> dst L
          of the slices cut from the full tensor, or {"error": msg}.
  needed: per case {"list": [...]} from
          `_rank_list_for_transform_parallel_checkpoint` (the per-stage part
          of `rank_list_for_transform`), sorted descending, or {"error": msg}.
"""
import json
import os
import sys

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

from mindspore.parallel._parallel_serialization import (  # noqa: E402
    _rank_list_for_transform_parallel_checkpoint,
    _transform_parallel_checkpoint,
)

NAME = "p"


def as_list(layout):
    """The `_convert_to_list` list of a layout."""
    return [list(layout["dev"]), layout["map"], [], 0, layout["step"], layout["size"], [0]]


def device_num(layout):
    return int(np.prod(layout["dev"]))


def transform(rank, slices, src, dst):
    """One `_transform_parallel_checkpoint` call for one parameter; `slices`
    maps source rank -> numpy array."""
    total = {NAME: dict(slices)}
    attrs = {NAME: {r: (True, False) for r in slices}}
    types = {NAME: {r: "Float32" for r in slices}}
    src_list = None if src is None else {NAME: as_list(src)}
    dst_list = None if dst is None else {NAME: as_list(dst)}
    out = _transform_parallel_checkpoint(rank, total, attrs, src_list, dst_list, types)
    assert len(out) == 1 and out[0]["name"] == NAME
    return out[0]["data"].asnumpy()


def describe(arr):
    return {"shape": list(arr.shape), "values": arr.astype(np.int64).reshape(-1).tolist()}


def cut_all(layout, full):
    """Every destination rank's slice of `full` under `layout`; a slice is
    an array or an error message."""
    result = []
    for rank in range(device_num(layout)):
        try:
            result.append(transform(rank, {0: full}, None, layout))
        except Exception as e:  # noqa: BLE001 - reported to the Rust side
            result.append(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    return result


def show(slices):
    return [describe(s) if isinstance(s, np.ndarray) else {"error": s} for s in slices]


def slice_case(case):
    shape = case["shape"]
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    slices = cut_all(case["layout"], full)
    roundtrip = None
    if all(isinstance(s, np.ndarray) for s in slices):
        try:
            back = transform(0, dict(enumerate(slices)), case["layout"], None)
            roundtrip = bool(back.shape == full.shape and np.array_equal(back, full))
        except Exception:  # noqa: BLE001 - a failed round trip is a mismatch
            roundtrip = False
    return {"ranks": show(slices), "roundtrip": roundtrip}


def pair_case(case):
    shape = case["shape"]
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    src_slices = cut_all(case["src"], full)
    bad = [s for s in src_slices if not isinstance(s, np.ndarray)]
    if bad:
        return {"error": "source: " + bad[0]}
    result = []
    for rank in range(device_num(case["dst"])):
        try:
            result.append(transform(rank, dict(enumerate(src_slices)), case["src"], case["dst"]))
        except Exception as e:  # noqa: BLE001 - reported to the Rust side
            result.append(str(e).strip().splitlines()[0])
    return {"ranks": show(result)}


def needed_case(case):
    src = {NAME: as_list(case["src"])}
    dst = None if case["dst"] is None else {NAME: as_list(case["dst"])}
    try:
        ranks = _rank_list_for_transform_parallel_checkpoint(case["rank"], src, dst)
        return {"list": sorted((int(r) for r in ranks), reverse=True)}
    except Exception as e:  # noqa: BLE001 - reported to the Rust side
        return {"error": str(e).strip().splitlines()[0]}


def main():
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    out = {
        "slice": [slice_case(c) for c in cases.get("slice", [])],
        "pair": [pair_case(c) for c in cases.get("pair", [])],
        "needed": [needed_case(c) for c in cases.get("needed", [])],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
