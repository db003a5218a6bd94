"""``reshard auto`` from Python: what mindformers' ``auto_trans_ckpt`` does
when a job starts, for one rank of the job (see the README's "Auto
conversion in a training job")."""
import json
import os

from . import _native

__all__ = ["auto_convert"]


def auto_convert(config=None, **settings):
    """Runs ``reshard auto`` as this process's rank of the job and returns
    its report (a dict: ``action``, ``path`` this rank loads, ``notes``, …).

    ``config`` is the mindformers YAML (its ``base_config`` files are read
    too); ``settings`` override its keys and take reshard's own, as the C ABI
    and ``reshard auto --set`` do: e.g. ``load_checkpoint=…``,
    ``src_strategy_path_or_dir=…``, ``rank_id=0``, ``world_size=8``,
    ``exchange="hccl"``, ``rendezvous="host:port"``. The rank and world
    come from ``RANK_ID``/``RANK_SIZE`` (or msrun's variables) unless given.
    Errors are :mod:`reshard.errors` classes; the GIL is released while it
    runs."""
    text = json.dumps(settings) if settings else None
    path = os.fspath(config) if config is not None else None
    return json.loads(_native.auto(path, text))
