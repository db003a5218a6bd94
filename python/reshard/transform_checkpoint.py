"""``python -m reshard.transform_checkpoint``: mindformers'
``mindformers/tools/ckpt_transform/transform_checkpoint.py`` with the same
flags, defaults and output layout, converting with reshard.

    python -m reshard.transform_checkpoint --src_checkpoint SRC --dst_checkpoint_dir DST \\
        [--src_strategy S] [--dst_strategy S] [--prefix checkpoint_] \\
        [--rank_id R --world_size W --transform_process_num K --transform_by_rank True]

As mindformers' ``TransformCkpt`` (offline mode): SRC is a ``.ckpt`` file,
a directory of ``.ckpt`` files (each transformed on its own), or a
``rank_x/`` tree; the result of each goes to ``DST/<name>/rank_<r>/
<prefix><r>.ckpt``, where ``<name>`` is the file's name without extension
(or the tree's folder name); a strategy may be a file or a directory of
per-rank files; ``None`` or an empty value means no strategy. With
``--transform_process_num K`` > 1 (or ``--transform_by_rank True``), the
process of rank ``R`` (one of ``0, W/K, 2W/K, ...``) converts the block of
destination ranks ``R .. R+W/K-1``, and writes ``transform_succeed_rank_R.txt``
(or ``transform_failed_rank_R.txt`` with the error) as mindformers does;
every process then waits for all K blocks.

Differences, on purpose: ``--transform_by_rank`` takes true/false (mindformers
declares it ``type=bool``, so its ``False`` means True); a strategy
directory is merged in memory instead of into ``merged_ckpt_strategy.ckpt``
inside it; with several processes the output folder is not emptied first
(a rank folder that already holds files is an error).
"""
import argparse
import glob
import os
import shutil
import tempfile
import time

from . import _native
from ._cli import none_if_empty, progress_bar, run, str2bool


def parser():
    p = argparse.ArgumentParser(prog="python -m reshard.transform_checkpoint")
    p.add_argument('--src_checkpoint', default="", type=str, help='path of src ckpt')
    p.add_argument('--dst_checkpoint_dir', default="", type=str, help='path where to save dst ckpt')
    p.add_argument('--src_strategy', default=None, help='path of src ckpt strategy')
    p.add_argument('--dst_strategy', default=None, help='path of dst ckpt strategy')
    p.add_argument('--prefix', default='checkpoint_', type=str, help='prefix of transformed checkpoint')
    p.add_argument('--rank_id', default=0, type=int, help='rank id')
    p.add_argument('--world_size', default=1, type=int, help='world size')
    p.add_argument('--transform_process_num', default=1, type=int, help='transform process num')
    p.add_argument('--transform_by_rank', default=False, type=str2bool,
                   help='convert a block of ranks per process (as mindspore.transform_checkpoint_by_rank)')
    return p


def _strategy(path):
    path = none_if_empty(path)
    if path is None:
        return None
    if not os.path.exists(path):
        raise ValueError(f'strategy_path: {path} not found!')
    return path


def _link_sources(checkpoint, link_dir):
    """mindformers' ``build_soft_link_of_checkpoint``: name → a ``rank_x/`` tree."""
    has_rank0 = os.path.isdir(os.path.join(checkpoint, "rank_0"))
    if os.path.isdir(checkpoint) and not has_rank0 and not glob.glob(os.path.join(checkpoint, "*.ckpt")):
        raise ValueError(f"No rank_0 folder or ckpt files are found under {checkpoint}.")
    if os.path.isfile(checkpoint) and not checkpoint.endswith('.ckpt'):
        raise ValueError(f"The value of load_checkpoint must be a folder or a file with suffix '.ckpt', "
                         f"but got {checkpoint}")

    def link(name, target):
        where = os.path.join(link_dir, name.split(".")[0], "rank_0")
        os.makedirs(where, exist_ok=True)
        os.symlink(os.path.realpath(target), os.path.join(where, os.path.basename(target)))

    if os.path.isdir(checkpoint):
        if has_rank0:
            os.symlink(os.path.realpath(checkpoint), os.path.join(link_dir, os.path.basename(checkpoint)))
        else:
            for f in glob.glob(os.path.join(checkpoint, "*.ckpt")):
                link(os.path.basename(f), f)
    else:
        link(os.path.basename(checkpoint), checkpoint)


def _check_source(src_dir, src_strategy):
    """mindformers' ``check_src_checkpoint_and_strategy``; returns the strategy to use."""
    ranks = sorted(int(d.split("_")[-1]) for d in glob.glob(os.path.join(src_dir, "rank_*")))
    if not ranks:
        raise ValueError("The load_checkpoint must be a dir and ckpt should be stored in the format of "
                         f"load_checkpoint/rank_x/xxx.ckpt,but get {src_dir}.")
    for i, r in enumerate(ranks):
        if r != i:
            raise FileNotFoundError(f"The rank_{i} folder was not found under src_checkpoint folder.")
    if len(ranks) == 1:
        return None  # a full checkpoint needs no strategy
    if src_strategy is None:
        raise ValueError("`src_strategy` should not be None when `src_checkpoint` is sliced.")
    return src_strategy


def _wait(ckpt_dir, count):
    while True:
        failed = glob.glob(os.path.join(ckpt_dir, 'transform_failed_rank_*.txt'))
        if failed:
            raise ValueError(f"Transform failed, find {failed}.")
        if len(glob.glob(os.path.join(ckpt_dir, 'transform_succeed_rank_*.txt'))) >= count:
            return
        time.sleep(1)


def transform(src_checkpoint, dst_checkpoint_dir="", src_strategy=None, dst_strategy=None, prefix="checkpoint_",
              rank_id=0, world_size=1, transform_process_num=1, transform_by_rank=False):
    """What the script does; returns the destination directory."""
    if not src_checkpoint or not os.path.exists(src_checkpoint):
        raise ValueError(f"src_checkpoint={src_checkpoint!r} does not exist.")
    if transform_process_num < 1:
        raise ValueError(f"transform_process_num should not smaller than 1,but got {transform_process_num}.")
    transform_process_num = min(transform_process_num, world_size)
    if world_size % transform_process_num != 0:
        raise ValueError(f"transform_process_num: {transform_process_num} "
                         f"should be divided by world_size: {world_size}.")
    block = world_size // transform_process_num
    workers_ranks = list(range(0, world_size, block))
    by_rank = transform_by_rank or transform_process_num > 1
    if world_size == 1 and transform_process_num == 1:
        by_rank = False
    src_checkpoint = os.path.realpath(src_checkpoint).rstrip("/")
    if not dst_checkpoint_dir:
        dst_checkpoint_dir = os.path.join(os.getcwd(), "transformed_checkpoint")
    dst_checkpoint_dir = os.path.realpath(dst_checkpoint_dir)
    src_strategy, dst_strategy = _strategy(src_strategy), _strategy(dst_strategy)
    with tempfile.TemporaryDirectory() as link_dir:
        _link_sources(src_checkpoint, link_dir)
        for name in sorted(os.listdir(link_dir)):
            src_dir = os.path.join(link_dir, name)
            dst_dir = os.path.join(dst_checkpoint_dir, name)
            if transform_process_num == 1:
                shutil.rmtree(dst_dir, ignore_errors=True)  # mindformers' remake_folder
            os.makedirs(dst_dir, mode=0o750, exist_ok=True)
            strategy = _check_source(src_dir, src_strategy)
            if strategy is None and dst_strategy is None:
                raise ValueError("`src_strategy` and `dst_strategy` cannot both be None!")
            if rank_id in workers_ranks:
                ranks = list(range(rank_id, rank_id + block)) if by_rank else None
                try:
                    _native.transform(src_dir, dst_dir, strategy, dst_strategy, prefix=prefix, ranks=ranks,
                                      manifest=False, progress=progress_bar("Transforming checkpoint"))
                except BaseException as e:
                    with open(os.path.join(dst_dir, f'transform_failed_rank_{rank_id}.txt'), "w") as f:
                        f.write(str(e))
                    raise
                open(os.path.join(dst_dir, f'transform_succeed_rank_{rank_id}.txt'), "w").close()
            _wait(dst_dir, len(workers_ranks))
    return dst_checkpoint_dir


def main(argv=None):
    args = parser().parse_args(argv)
    transform(args.src_checkpoint, args.dst_checkpoint_dir, args.src_strategy, args.dst_strategy, args.prefix,
              args.rank_id, args.world_size, args.transform_process_num, args.transform_by_rank)
    print("......Transform finished!......")


if __name__ == "__main__":
    run(main)
