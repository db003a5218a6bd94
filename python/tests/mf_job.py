"""One mindformers TransformCkpt run (offline, one process), with MindSpore
or with reshard installed by reshard.mindformers.install().

usage: mf_job.py MINDFORMERS_DIR ms|reshard BY_RANK(0|1) SRC DST SRC_STRATEGY DST_STRATEGY WORLD_SIZE
MINDFORMERS_DIR holds the package (stand-ins + mindformers' own ckpt_transform).
With "reshard", MindSpore's four transform functions are replaced by ones
that fail, so the run succeeds only if none of them is called.
"""
import os
import sys

mf_dir, mode, by_rank, src, dst, src_s, dst_s, world = sys.argv[1:]
sys.path.insert(0, mf_dir)
os.environ.setdefault("GLOG_v", "3")
import mindspore  # noqa: E402
from mindformers.tools.ckpt_transform import TransformCkpt  # noqa: E402
import mindformers.tools.ckpt_transform.transform_checkpoint as tc  # noqa: E402

if mode == "reshard":
    import reshard.mindformers

    def forbidden(*args, **kwargs):
        raise AssertionError("MindSpore's transform was called although reshard is installed")

    patched = reshard.mindformers.install()
    assert "mindformers.tools.ckpt_transform.transform_checkpoint" in patched, patched
    for name in reshard.mindformers.PATCHED:
        setattr(mindspore, name, forbidden)
    assert tc.ms.transform_checkpoints.__module__ == "reshard._compat"

TransformCkpt(rank_id=0, world_size=int(world), transform_process_num=1,
              transform_by_rank=by_rank == "1")(src_checkpoint=src, dst_checkpoint_dir=dst,
                                                src_strategy=src_s, dst_strategy=dst_s)
print("ok")
