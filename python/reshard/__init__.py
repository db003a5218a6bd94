"""reshard: MindSpore-compatible checkpoint transforms, in Rust.

Replace ``mindspore.`` by ``reshard.`` in a call of one of the functions
below and the same files come out (byte-identical), faster and in bounded
memory; the Rust engine runs with the GIL released.

- :func:`transform_checkpoints`, :func:`transform_checkpoint_by_rank`,
  :func:`rank_list_for_transform`, :func:`merge_pipeline_strategys`,
  :func:`ckpt_to_safetensors`, :func:`safetensors_to_ckpt`,
  :func:`unified_safetensors`, :func:`load_distributed_checkpoint` (its
  save mode, ``network=None``): MindSpore 2.10's signatures and semantics;
- command-line modules with mindformers' flags: ``python -m
  reshard.transform_checkpoint``, ``python -m reshard.convert_weight``,
  ``python -m reshard.transform_ckpt_lora``;
- :func:`reshard.mindformers.install` makes a mindformers job's
  ``auto_trans_ckpt`` use reshard; :func:`auto_convert` runs ``reshard
  auto`` as one rank of a job (``exchange="hccl"`` included).

Errors are :mod:`reshard.errors` classes carrying reshard's message.
"""
from . import _compat, errors
from .auto import auto_convert
from ._compat import (
    ckpt_to_safetensors,
    load_distributed_checkpoint,
    merge_pipeline_strategys,
    rank_list_for_transform,
    safetensors_to_ckpt,
    transform_checkpoint_by_rank,
    transform_checkpoints,
    unified_safetensors,
)
from ._native import version as _version
from .errors import ReshardError

__version__ = _version()

# MindSpore's functions (as _compat lists them), then reshard's own.
__all__ = [*_compat.__all__, "auto_convert", "errors", "ReshardError"]
