"""``python -m reshard.convert_weight``: mindformers' ``convert_weight.py``
(HuggingFace ⇄ MindSpore weights) with the same flags, converting with
reshard (every family of ``reshard convert``; see docs/convert.md).

    python -m reshard.convert_weight --model llama --input_path HF_DIR --output_path OUT.ckpt [--dtype bf16]
    python -m reshard.convert_weight --model llama --reversed --input_path OUT.ckpt --output_path HF_DIR \\
        --config HF_DIR/config.json

As mindformers, unknown ``--key value`` pairs are parsed with
``parse_known_args``: reshard's own settings (``--qkv_concat``/
``--use_qkv_concat``, ``--modal``, ``--config``, ``--dst_strategy``,
``--prefix``, ``--process_num``) are taken here; every other pair goes to the
conversion as mindformers hands it to the family converter, where those
that change it do (CogVLM2's ``--sft lora``; glm-n's ``--torch_ckpt_path``
and qwen's ``--torch_ckpt_dir``/``--mindspore_ckpt_path``; the toolkit
converters' ``--num_layers``, ``--num_attention_heads``, ``--max_worker``;
see reshard's README) and the rest are warned about and ignored. glm-n's
``--config`` may be mindformers' model YAML (its ``qkv_concat``/
``mlp_concat`` switches).
"""
import argparse
import sys

from . import _native
from ._cli import progress_bar, run, str2bool

_EXTRA = {
    "qkv_concat": ("qkv_concat", str2bool),
    "use_qkv_concat": ("qkv_concat", str2bool),
    "modal": ("modal", str),
    "config": ("config", str),
    "dst_strategy": ("dst_strategy", str),
    "prefix": ("prefix", str),
    "process_num": ("workers", int),
}


def parser():
    p = argparse.ArgumentParser(prog="python -m reshard.convert_weight")
    p.add_argument('--model', default=None, required=True, help='model name')
    p.add_argument('--reversed', action='store_true', help="convert ms to hf")
    p.add_argument('--input_path', default=None, required=True, help="path to hf or ms model")
    p.add_argument('--output_path', default=None, required=True, help="path to save converted model")
    p.add_argument('--dtype', default=None, type=str, choices=['fp16', 'fp32', 'bf16'],
                   help="dtype of output model")
    p.add_argument('--n_head', default=None, type=int, help="overrides num_attention_heads")
    p.add_argument('--hidden_size', default=None, type=int, help="overrides hidden_size")
    p.add_argument('--layers', default=None, type=int, help="overrides num_hidden_layers")
    p.add_argument('--is_pretrain', default=False, type=str2bool, help="only for swin (accepted, unused)")
    p.add_argument('--telechat_type', default="telechat_12b", type=str, help="only for telechat (accepted, unused)")
    return p


def extra_options(extra):
    """``--key value`` / ``--key=value`` pairs → reshard options, and the
    pairs left for the conversion (``extra``)."""
    tokens = [t for item in extra for t in (item.split("=", 1) if item.startswith("--") else [item])]
    out, rest, i = {}, [], 0
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--"):
            print(f"warning: ignoring stray argument {key!r}", file=sys.stderr)
            i += 1
            continue
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value, i = tokens[i + 1], i + 2
        else:
            value, i = "true", i + 1
        name = key[2:].replace("-", "_")
        if name in _EXTRA:
            field, parse = _EXTRA[name]
            out[field] = parse(value)
        else:
            rest.append((name, value))
    if rest:
        out["extra"] = rest
    return out


def main(argv=None):
    args, extra = parser().parse_known_args(argv)
    opts = extra_options(extra)
    _native.convert(args.model, args.input_path, args.output_path, reversed=args.reversed, dtype=args.dtype,
                    n_head=args.n_head, hidden_size=args.hidden_size, layers=args.layers,
                    progress=progress_bar("Converting"), **opts)
    print(f"Convert finished, the output is saved to {args.output_path}")


if __name__ == "__main__":
    run(main)
