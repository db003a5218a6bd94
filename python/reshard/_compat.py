"""MindSpore 2.10's checkpoint functions, with its signatures and semantics.

``mindspore.transform_checkpoints(...)`` → ``reshard.transform_checkpoints(...)``
and so on: the same arguments, defaults, output files and the same argument
checks (the same exception types as MindSpore for bad arguments), with
the conversion done by reshard's Rust engine (byte-identical output, the GIL
released while it runs). Errors from the engine are the classes of
:mod:`reshard.errors` (subclasses of ``ValueError``, ``FileNotFoundError``,
``RuntimeError``…) carrying reshard's message.

Deliberate differences are listed in each docstring.
"""
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from . import _native

__all__ = [
    "transform_checkpoints",
    "transform_checkpoint_by_rank",
    "rank_list_for_transform",
    "merge_pipeline_strategys",
    "ckpt_to_safetensors",
    "safetensors_to_ckpt",
    "unified_safetensors",
    "load_distributed_checkpoint",
]

_SAFETENSORS_ERA = (
    "reshard issue 13 (\"safetensors-era\": unified/deduplicated safetensors) is not merged yet; "
    "until it is, use mindspore.{name}"
)


def _strategy(path, what):
    """MindSpore's strategy argument checks; returns the path or None."""
    if path is None or path == "":
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"The {what} should be a str.")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent and not os.path.exists(parent):
        raise ValueError(f"The director of {what}: {path} is not exists.")
    return path


def _collect(src_dir, suffix):
    """rank → files ending in `suffix` under `src_dir/rank_<r>/` (MindSpore's
    `_collect_safetensor_files`, which only looks one level down)."""
    found = {}
    if not os.path.isdir(src_dir):
        return found
    for entry in os.listdir(src_dir):
        m = re.fullmatch(r"rank_(\d+)", entry)
        sub = os.path.join(src_dir, entry)
        if not m or not os.path.isdir(sub):
            continue
        files = [f for f in os.listdir(sub) if f.endswith(suffix)]
        if files:
            found[int(m.group(1))] = files
    return found


def transform_checkpoints(src_checkpoints_dir, dst_checkpoints_dir, ckpt_prefix, src_strategy_file=None,
                          dst_strategy_file=None, process_num=1, output_format="ckpt", *, progress=None):
    """Transform a distributed checkpoint from one sharding strategy to another.

    ``mindspore.transform_checkpoints``: ``src_checkpoints_dir/rank_<r>/`` (the
    lexicographically last file of each rank) → ``dst_checkpoints_dir/rank_<r>/
    {ckpt_prefix}<r>.{ckpt|safetensors}``, byte-identical with MindSpore's
    files. ``process_num`` is the number of worker threads. reshard's own
    keyword ``progress``: a callable given ``(bytes_written, bytes_total)``
    about every 100 ms while the conversion runs.

    Differences, on purpose: a strategy may also be a directory of per-rank
    strategy files (merged like ``merge_pipeline_strategys``); ckpt sources
    may be written as safetensors (MindSpore refuses); output files of an
    earlier run are overwritten as MindSpore does, but a ``rank_<r>/``
    destination folder holding any other file is refused (reshard never
    mixes its output with other files); the
    by-stage variant (a one-stage source strategy that is a strict subset of
    the destination's) is not implemented; string entries are carried over.
    """
    st = _collect(src_checkpoints_dir, ".safetensors")
    ck = _collect(src_checkpoints_dir, ".ckpt")
    if st and ck:
        raise ValueError("For 'transform_checkpoints', the 'src_checkpoints_dir' cannot contain "
                         "both ckpt file and safetensors file simultaneously")
    if not os.path.isdir(src_checkpoints_dir):
        raise NotADirectoryError("src_checkpoints_dir {} is not a directory.".format(src_checkpoints_dir))
    if not st and not ck:
        raise ValueError("For 'transform_checkpoints', the 'src_checkpoints_dir' can not be empty.")
    if not isinstance(ckpt_prefix, str):
        raise TypeError("The ckpt_prefix should be a str.")
    if output_format not in ("ckpt", "safetensors"):
        raise ValueError(f"For 'transform_checkpoints', 'output_format' must be 'ckpt' or 'safetensors', "
                         f"but got {output_format!r}.")
    if not isinstance(process_num, int) or process_num < 1:
        raise ValueError(f"For 'transform_checkpoints', 'process_num' must be a positive int, got {process_num!r}.")
    src = _strategy(src_strategy_file, "src_strategy_file")
    dst = _strategy(dst_strategy_file, "dst_strategy_file")
    os.makedirs(dst_checkpoints_dir, exist_ok=True)
    if os.path.exists(dst_checkpoints_dir) and not os.path.isdir(dst_checkpoints_dir):
        raise NotADirectoryError("dst_checkpoints_dir {} is not a directory.".format(dst_checkpoints_dir))
    args = (os.fspath(src_checkpoints_dir), os.fspath(dst_checkpoints_dir), src, dst)
    # MindSpore overwrites its output files: remove the ones this run writes
    # (found by planning, which reads indexes only); any other file in a
    # destination rank folder is still refused by the engine.
    planned = json.loads(_native.transform(*args, prefix=ckpt_prefix, output_format=output_format,
                                           manifest=False, dry_run=True))
    for f in planned["plan"]["files"]:
        if os.path.isfile(f["path"]):
            os.remove(f["path"])
    _native.transform(*args, prefix=ckpt_prefix, workers=process_num, output_format=output_format, manifest=False,
                      progress=progress)


def transform_checkpoint_by_rank(rank_id, checkpoint_files_map, save_checkpoint_file_name,
                                 src_strategy_file=None, dst_strategy_file=None, *, progress=None):
    """Transform the checkpoint of one destination rank.

    ``mindspore.transform_checkpoint_by_rank``: ``checkpoint_files_map`` maps
    source rank → checkpoint file (at least the ranks
    ``rank_list_for_transform(rank_id, ...)`` lists); the result is written to
    ``save_checkpoint_file_name`` (replaced if it exists), byte-identical with
    MindSpore's. A needed rank missing from the map is an error naming it
    (MindSpore fails later with a KeyError). ``progress``: as for
    :func:`transform_checkpoints`.
    """
    if not isinstance(checkpoint_files_map, dict):
        raise TypeError("The checkpoint_files_map should be a dict.")
    if not isinstance(rank_id, int) or isinstance(rank_id, bool):
        raise TypeError("The rank_id should be a int.")
    if not isinstance(save_checkpoint_file_name, str):
        raise TypeError("The save_checkpoint_file_name should be a str.")
    if save_checkpoint_file_name[-5:] != ".ckpt":
        raise ValueError("The save_checkpoint_file_name {} should end with .ckpt".format(save_checkpoint_file_name))
    src = _strategy(src_strategy_file, "src_strategy_file")
    dst = _strategy(dst_strategy_file, "dst_strategy_file")
    files = {}
    for rank, local_file in checkpoint_files_map.items():
        if not os.path.exists(local_file):
            raise ValueError("Checkpoint file {} in rank {} not exits: ".format(local_file, rank))
        files[int(rank)] = os.fspath(local_file)
    if rank_id < 0:
        raise ValueError(f"The rank_id should be non-negative, but got {rank_id}.")
    _native.transform_by_rank(rank_id, files, save_checkpoint_file_name, src, dst, progress=progress)


def rank_list_for_transform(rank_id, src_strategy_file=None, dst_strategy_file=None):
    """The source ranks destination rank ``rank_id`` needs
    (``mindspore.rank_list_for_transform``)."""
    if not isinstance(rank_id, int) or isinstance(rank_id, bool):
        raise TypeError("The rank_id should be a int.")
    src = _strategy(src_strategy_file, "src_strategy_file")
    dst = _strategy(dst_strategy_file, "dst_strategy_file")
    return json.loads(_native.rank_list_for_transform(rank_id, src, dst))


def merge_pipeline_strategys(src_strategy_dirs, dst_strategy_file):
    """Merge the strategy files of every pipeline stage in ``src_strategy_dirs``
    into ``dst_strategy_file`` (``mindspore.merge_pipeline_strategys``)."""
    dst_strategy_file = os.path.abspath(os.path.normpath(dst_strategy_file))
    os.makedirs(os.path.dirname(dst_strategy_file), exist_ok=True)
    if not os.path.isdir(src_strategy_dirs):
        raise NotADirectoryError("src_strategy_dirs {} is not a directory.".format(src_strategy_dirs))
    _native.merge_pipeline_strategys(os.fspath(src_strategy_dirs), dst_strategy_file)


def _convert_files(func, file_path, save_path, name_map, file_name_regex, processes_num, src_suffix, dst_suffix):
    """MindSpore's `_convert_checkpoint_file`: the same tasks and file names."""
    if not os.path.isdir(file_path) and not os.path.isfile(file_path):
        raise ValueError(f"For {func}, the input path must be a valid path or file, but got {file_path}")
    if save_path and os.path.splitext(save_path)[1]:
        raise ValueError(f"For {func}, the save_path must be a directory, but got '{save_path}'")
    if name_map is not None and not isinstance(name_map, dict):
        raise ValueError(f"For {func}, the type of 'name_map' must be a directory, but got '{type(name_map)}'")
    names = {str(k): str(v) for k, v in name_map.items()} if name_map else None
    tasks = []
    if os.path.isdir(file_path):
        rank_dirs = [d for d in os.listdir(file_path)
                     if d.startswith("rank") and os.path.isdir(os.path.join(file_path, d))]
        if not rank_dirs:
            raise ValueError(f"For '{func}', no directories starting with 'rank' found in {file_path}.")
        for rank_dir in rank_dirs:
            rank_dir_path = os.path.join(file_path, rank_dir)
            dst_root = os.path.join(save_path, rank_dir) if save_path is not None else rank_dir_path
            os.makedirs(dst_root, exist_ok=True)
            for file in os.listdir(rank_dir_path):
                if file.endswith(src_suffix) and (file_name_regex is None or re.search(file_name_regex, file)):
                    tasks.append((os.path.join(rank_dir_path, file),
                                  os.path.join(dst_root, file.replace(src_suffix, dst_suffix))))
    else:
        if not file_path.endswith(src_suffix):
            raise ValueError(f"For {func}, the input file must be a {src_suffix} file, but got {file_path}")
        if file_name_regex is not None and not re.findall(file_name_regex, file_path):
            raise ValueError(f"For {func}, the input file does not match the regular expression.")
        if save_path and not os.path.exists(save_path):
            os.makedirs(save_path, exist_ok=True)
        name = os.path.basename(file_path).replace(src_suffix, dst_suffix)
        tasks.append((file_path, os.path.join(save_path if save_path else os.path.dirname(file_path), name)))
    workers = max(1, int(processes_num or 1))
    # The engine releases the GIL: threads convert files in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda t: _native.rewrite(t[0], t[1], name_map=names), tasks):
            pass


def ckpt_to_safetensors(file_path, save_path=None, name_map=None, file_name_regex=None, processes_num=1):
    """Convert ``.ckpt`` files into ``.safetensors`` (``mindspore.ckpt_to_safetensors``):
    one file, or every ``rank*/`` folder of a directory. Output byte-identical
    with MindSpore's; ``name_map`` renames parameters as MindSpore's does (two
    parameters may not be given one name)."""
    _convert_files("ckpt_to_safetensors", file_path, save_path, name_map, file_name_regex, processes_num,
                   ".ckpt", ".safetensors")


def safetensors_to_ckpt(file_path, save_path=None, name_map=None, file_name_regex=None, processes_num=1):
    """Convert ``.safetensors`` files into ``.ckpt`` (``mindspore.safetensors_to_ckpt``).
    Output byte-identical with MindSpore's, ``name_map`` included."""
    _convert_files("safetensors_to_ckpt", file_path, save_path, name_map, file_name_regex, processes_num,
                   ".safetensors", ".ckpt")


def unified_safetensors(src_dir, src_strategy_file, dst_dir, merge_with_redundancy=True, file_suffix=None,
                        max_process_num=64, choice_func=None, split_dst_file=()):
    """``mindspore.unified_safetensors`` — not available yet (reshard issue 13)."""
    raise NotImplementedError(_SAFETENSORS_ERA.format(name="unified_safetensors"))


def load_distributed_checkpoint(network, checkpoint_filenames=None, predict_strategy=None,
                                train_strategy_filename=None, strict_load=False, dec_key=None, dec_mode='AES-GCM',
                                format='ckpt', unified_safetensors_dir=None, dst_safetensors_dir=None, rank_id=None,
                                output_format='safetensors', name_map=None, max_process_num=64,
                                return_param_dict=False):
    """``mindspore.load_distributed_checkpoint`` with ``network=None`` — not
    available yet (reshard issue 13); with a network, use MindSpore's."""
    if network is not None:
        raise ValueError("reshard.load_distributed_checkpoint only supports network=None "
                         "(writing the destination safetensors); load into a network with mindspore's")
    raise NotImplementedError(_SAFETENSORS_ERA.format(name="load_distributed_checkpoint"))
