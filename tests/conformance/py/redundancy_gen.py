"""Builds rank sets saved with redundancy removed, the way MindSpore 2.10 saves them.

usage: redundancy_gen.py OUT_DIR CASES_JSON

CASES_JSON: transform_gen.py cases (format "safetensors", src and dst sharded).
For each case OUT_DIR/<name>/ gets what transform_gen.py makes (src/, expect/, the
strategies), plus:
  src_dedup/rank_{r}/...     src/ saved again with remove_redundancy=True
  expect_dedup/rank_{r}/...  expect/ saved again with remove_redundancy=True
  kept.json                  {"src"|"dst": {rank: [names kept]}}
  unified_dedup/             ms.unified_safetensors(src_dedup, ..., merge_with_redundancy=False)
  loaded_dedup/rank_{r}/net.safetensors  ms.load_distributed_checkpoint(None, dst strategy, unified_dedup)

"Saved again" is what ModelCheckpoint(remove_redundancy=True) does on each rank
(train/callback/_checkpoint.py), with the strategy file standing for the net's
parameter_layout_dict (its documented other input): get_parameter_redundancy(strategy,
initial_rank=first rank of the stage), remove_param_redundancy, and
save_checkpoint(..., integrated_save=False, choice_func=<keep names not in the
layout or owned by this rank>, format="safetensors", remove_redundancy=True).
"""
import glob
import json
import os
import sys

from common import ms, np
from mindspore.train._utils import get_parameter_redundancy, remove_param_redundancy
from transform_gen import make_case


def dedup_tree(tree, strategy_dir, dev, out):
    per_stage = int(np.prod(dev))
    owned = {}
    for rank_dir in sorted(glob.glob(os.path.join(tree, "rank_*"))):
        rank = int(os.path.basename(rank_dir)[len("rank_"):])
        (src,) = glob.glob(os.path.join(rank_dir, "*.safetensors"))
        strategy = os.path.join(strategy_dir, f"ckpt_strategy_rank_{rank}.ckpt")
        redundancy = get_parameter_redundancy(strategy, initial_rank=rank // per_stage * per_stage)
        single = remove_param_redundancy(redundancy)
        keep, layout = single.get(rank), set(redundancy)

        def choice_func(name, keep=keep, layout=layout):
            return name not in layout or (keep is not None and name in keep)

        params = ms.load_checkpoint(src, format="safetensors")
        os.makedirs(os.path.join(out, os.path.basename(rank_dir)))
        dst = os.path.join(out, os.path.basename(rank_dir), os.path.basename(src))
        ms.save_checkpoint(params, dst, integrated_save=False, choice_func=choice_func,
                           format="safetensors", remove_redundancy=True)
        owned[rank] = sorted(n for n in params if choice_func(n))
    return owned


def main():
    root, cases = sys.argv[1], json.load(open(sys.argv[2]))
    for case in cases:
        make_case(root, case)
        d = os.path.join(root, case["name"])
        kept = {
            side: dedup_tree(os.path.join(d, tree), os.path.join(d, f"{side}_strategy"),
                             case[side]["dev"], os.path.join(d, tree + "_dedup"))
            for side, tree in (("src", "src"), ("dst", "expect"))
        }
        with open(os.path.join(d, "kept.json"), "w") as f:
            json.dump(kept, f)
        # MindSpore's offline merge of the de-duplicated set.
        ms.unified_safetensors(os.path.join(d, "src_dedup"), os.path.join(d, "src_strategy_merged.ckpt"),
                               os.path.join(d, "unified_dedup"), merge_with_redundancy=False,
                               max_process_num=1)
        # ... then split for the job's strategy: MindFormers' auto_trans_ckpt flow for
        # distributed safetensors weights (load_checkpoint_with_safetensors).
        ms.load_distributed_checkpoint(None, predict_strategy=os.path.join(d, "dst_strategy_merged.ckpt"),
                                       format="safetensors",
                                       unified_safetensors_dir=os.path.join(d, "unified_dedup"),
                                       dst_safetensors_dir=os.path.join(d, "loaded_dedup"), max_process_num=1)
    print("ok", len(cases))


if __name__ == "__main__":
    main()
