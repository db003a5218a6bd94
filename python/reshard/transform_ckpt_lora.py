"""``python -m reshard.transform_ckpt_lora``: mindformers'
``mindformers/tools/transform_ckpt_lora.py`` with the same flags, merging
LoRA factors into their base weights with reshard.

    python -m reshard.transform_ckpt_lora --src_ckpt_path_or_dir SRC --dst_ckpt_dir DST \\
        [--src_ckpt_strategy S] [--dst_ckpt_strategy S] [--prefix checkpoint_] [--lora_scaling X]

As mindformers: SRC is a full ``.ckpt`` file, or a ``rank_x/`` tree with its
strategy (file or directory); every ``A`` factor (a name with ``lora_a``)
is merged as ``W + scaling · B·A`` and every ``lora_`` tensor dropped; the
result is ``DST/merged_lora.ckpt``. ``--lora_scaling`` also takes the
expression mindformers' help suggests, ``lora_alpha/lora_rank`` written as
two numbers (``16/8``).

Differences, on purpose: a sharded source is merged shard by shard without
writing the gathered, unmerged copy mindformers leaves in
``DST/rank_0/``; with ``--dst_ckpt_strategy`` the merged model is written
in that layout, ``DST/rank_<r>/<prefix><r>.ckpt`` for every rank
(mindformers merges rank 0's shard only); products are accumulated in f32
and rounded once (fp16/bf16 results may differ from mindspore's thrice-rounded
recipe by up to 2 ulp; fp32 is identical).
"""
import argparse
import json
import os
import shutil
import tempfile

from . import _native
from ._cli import none_if_empty, progress_bar, run


def scaling(text):
    """A number, or ``a/b`` of two numbers."""
    text = str(text).strip()
    if "/" in text:
        a, b = text.split("/", 1)
        try:
            a, b = float(a), float(b)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lora_scaling {text!r}: expected a number or a/b of two numbers")
        if b == 0:
            raise argparse.ArgumentTypeError(f"--lora_scaling {text!r}: division by zero")
        return a / b
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora_scaling {text!r}: expected a number or a/b of two numbers")


def parser():
    p = argparse.ArgumentParser(prog="python -m reshard.transform_ckpt_lora")
    p.add_argument('--src_ckpt_strategy', default="", help='path of src ckpt strategy')
    p.add_argument('--dst_ckpt_strategy', default="", help='path of dst ckpt strategy')
    p.add_argument('--src_ckpt_path_or_dir', default="", type=str, help='path of src ckpt')
    p.add_argument('--dst_ckpt_dir', default="", type=str, help='path where to save dst ckpt')
    p.add_argument('--prefix', default='checkpoint_', type=str, help='prefix of transformed checkpoint')
    p.add_argument('--lora_scaling', default=1, type=scaling,
                   help='scale of lora when merge model weight, default is lora_alpha/lora_rank')
    return p


def _strategy(path):
    path = none_if_empty(path)
    if path is not None and not os.path.exists(path):
        raise ValueError(f'{path} not found!')
    return path


def merge(src, dst_dir, src_strategy=None, dst_strategy=None, prefix="checkpoint_", lora_scaling=1.0):
    """What the script does; returns the written files."""
    src_strategy, dst_strategy = _strategy(src_strategy), _strategy(dst_strategy)
    if not src or not os.path.exists(src):
        raise ValueError(f"src_ckpt_path_or_dir={src!r} does not exist.")
    if not os.path.isdir(src):
        src_strategy = None  # "Only Need MergeLora": a full checkpoint
    os.makedirs(dst_dir, exist_ok=True)
    if dst_strategy is not None:
        report = json.loads(_native.merge_lora(src, dst_dir, src_strategy, dst_strategy, prefix=prefix,
                                               scale=float(lora_scaling), manifest=False,
                                               progress=progress_bar("Merging LoRA")))
        return [f["path"] for f in report["plan"]["files"]]
    with tempfile.TemporaryDirectory(dir=dst_dir, prefix=".reshard-lora-") as tmp:
        report = json.loads(_native.merge_lora(src, tmp, src_strategy, None, prefix=prefix,
                                               scale=float(lora_scaling), manifest=False,
                                               progress=progress_bar("Merging LoRA")))
        (written,) = [f["path"] for f in report["plan"]["files"]]
        out = os.path.join(dst_dir, "merged_lora.ckpt")
        shutil.move(written, out)
    return [out]


def main(argv=None):
    a = parser().parse_args(argv)
    merge(a.src_ckpt_path_or_dir, a.dst_ckpt_dir, a.src_ckpt_strategy, a.dst_ckpt_strategy, a.prefix,
          a.lora_scaling)
    print("......Merge succeed!.......")


if __name__ == "__main__":
    run(main)
