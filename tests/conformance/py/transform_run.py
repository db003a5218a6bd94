"""Runs mindspore.transform_checkpoints on given inputs (the oracle).

usage: transform_run.py SRC_DIR DST_DIR SRC_STRATEGY DST_STRATEGY [PREFIX]
A strategy of "-" is None. A strategy directory is merged first with
ms.merge_pipeline_strategys (into DST_DIR/../<name>_merged.ckpt), as
MindFormers does before calling the transform.
"""
import os
import sys

from common import ms


def strategy(arg, tag):
    if arg == "-":
        return None
    if os.path.isdir(arg):
        merged = os.path.join(os.path.dirname(os.path.abspath(sys.argv[2])), f"{tag}_merged_by_ms.ckpt")
        ms.merge_pipeline_strategys(arg, merged)
        return merged
    return arg


src, dst = sys.argv[1], sys.argv[2]
prefix = sys.argv[5] if len(sys.argv) > 5 else "checkpoint_"
ms.transform_checkpoints(src, dst, prefix, strategy(sys.argv[3], "src"), strategy(sys.argv[4], "dst"))
print("ok")
