"""Merge strategy files with MindSpore.

usage: strategy_merge.py dir SRC_DIR DST          -> ms.parallel.merge_pipeline_strategys
       strategy_merge.py files DST SRC...         -> _merge_protobuf_strategy / _merge_json_strategy
                                                     with the files in the order given
       strategy_merge.py reserialize SRC          -> prints "same" if parsing SRC with
                                                     node_strategy_pb2 and serialising gives SRC
"""
import os
import sys

import mindspore as ms
from mindspore.parallel._parallel_serialization import (
    _merge_json_strategy,
    _merge_protobuf_strategy,
)
from mindspore.train import node_strategy_pb2


def main():
    mode = sys.argv[1]
    if mode == "dir":
        ms.parallel.merge_pipeline_strategys(sys.argv[2], sys.argv[3])
    elif mode == "files":
        dst, srcs = sys.argv[2], sys.argv[3:]
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        if all(s.endswith(".json") for s in srcs):
            _merge_json_strategy(srcs, dst)
        else:
            _merge_protobuf_strategy(srcs, dst)
    elif mode == "reserialize":
        with open(sys.argv[2], "rb") as f:
            data = f.read()
        m = node_strategy_pb2.ParallelStrategyMap()
        m.ParseFromString(data)
        print("same" if m.SerializeToString() == data else "different")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
