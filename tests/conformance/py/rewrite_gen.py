"""Whole-directory ckpt <-> safetensors conversion by MindSpore, for `reshard rewrite` on a tree.

usage: rewrite_gen.py OUT_DIR

OUT_DIR gets (transform_gen.make_case, an mp2 f16 split):
  rw/src/rank_{0,1}/src_{r}.ckpt, plus rank_0/other_0.ckpt (a copy, excluded by the regex)
  rw/name_map.json                  {"lm_head.weight": "output.weight"}
  rw/st/rank_{r}/src_{r}.safetensors   ms.ckpt_to_safetensors(src, st, name_map, file_name_regex="^src_")
  rw/ck/rank_{r}/src_{r}.ckpt          ms.safetensors_to_ckpt(st, ck)
"""
import json
import os
import shutil
import sys

from common import ms
from transform_gen import make_case


def main():
    root = sys.argv[1]
    make_case(root, {"name": "rw", "dtype": "float16", "src": {"dev": [2]}, "dst": None, "format": "ckpt"})
    d = os.path.join(root, "rw")
    shutil.copy(os.path.join(d, "src", "rank_0", "src_0.ckpt"), os.path.join(d, "src", "rank_0", "other_0.ckpt"))
    name_map = {"lm_head.weight": "output.weight"}
    with open(os.path.join(d, "name_map.json"), "w") as f:
        json.dump(name_map, f)
    ms.ckpt_to_safetensors(os.path.join(d, "src"), save_path=os.path.join(d, "st"), name_map=name_map,
                           file_name_regex="^src_")
    ms.safetensors_to_ckpt(os.path.join(d, "st"), save_path=os.path.join(d, "ck"))
    print("ok")


if __name__ == "__main__":
    main()
