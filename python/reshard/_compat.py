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
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor

from . import _native, errors

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

def _path(value, func, what, optional=False):
    """A path argument as text; anything else (a number given where a path
    goes, arguments in the wrong order) is a TypeError naming the argument,
    raised before anything is written. (os.path functions would take an
    int as a file descriptor.)"""
    if value is None and optional:
        return None
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bool):
        raise TypeError(f"For '{func}', '{what}' must be a path (str or os.PathLike), "
                        f"but got {type(value).__name__}: {value!r}.")
    value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    return value


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
    mixes its output with other files); string entries are carried over.
    MindSpore's by-stage variant is followed too: a one-stage source
    strategy whose parameters are a strict subset of the destination's (one
    pipeline stage's file) transforms that stage alone into
    ``rank_<r>/{ckpt_prefix}<r>_part<stage>.ckpt``.
    """
    src_checkpoints_dir = _path(src_checkpoints_dir, "transform_checkpoints", "src_checkpoints_dir")
    dst_checkpoints_dir = _path(dst_checkpoints_dir, "transform_checkpoints", "dst_checkpoints_dir")
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
    if "/" in ckpt_prefix or os.sep in ckpt_prefix:
        raise ValueError(f"For 'transform_checkpoints', 'ckpt_prefix' must be the start of a file name, but got "
                         f"the path {ckpt_prefix!r} (arguments in the wrong order?).")
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
    src_strategy_dirs = _path(src_strategy_dirs, "merge_pipeline_strategys", "src_strategy_dirs")
    dst_strategy_file = _path(dst_strategy_file, "merge_pipeline_strategys", "dst_strategy_file")
    dst_strategy_file = os.path.abspath(os.path.normpath(dst_strategy_file))
    if not os.path.isdir(src_strategy_dirs):
        raise NotADirectoryError("src_strategy_dirs {} is not a directory.".format(src_strategy_dirs))
    os.makedirs(os.path.dirname(dst_strategy_file), exist_ok=True)
    _native.merge_pipeline_strategys(os.fspath(src_strategy_dirs), dst_strategy_file)


def _convert_files(func, file_path, save_path, name_map, file_name_regex, processes_num, src_suffix, dst_suffix):
    """MindSpore's `_convert_checkpoint_file`: the same tasks and file names."""
    file_path = _path(file_path, func, "file_path")
    save_path = _path(save_path, func, "save_path", optional=True)
    if file_name_regex is not None and not isinstance(file_name_regex, (str, re.Pattern)):
        raise TypeError(f"For '{func}', 'file_name_regex' must be a str or a compiled pattern, "
                        f"but got {type(file_name_regex).__name__}: {file_name_regex!r}.")
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


def _safetensors_keys(path):
    """The tensor names of a safetensors file (its JSON header only)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return []
        n = struct.unpack("<Q", head)[0]
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return []  # the engine reports the damaged file with its name
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def _glob_regex(pattern):
    """The engine's shell patterns (`*`, `?`) as a regular expression."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + r"\Z",
                      re.S)


def _evaluate_choice(choice_func, names):
    """``choice_func`` over ``names`` as MindSpore applies it: ``False``
    drops a parameter, a string renames it, ``True`` keeps it; anything
    else is MindSpore's ValueError. Returns (drop, rename) for the engine."""
    drop, rename = [], {}
    for name in names:
        out = choice_func(name)
        if isinstance(out, bool):
            if not out:
                drop.append(name)
        elif isinstance(out, str):
            if out != name:
                rename[name] = out
        else:
            raise ValueError(f"For 'unified_safetensors', the return value type of the function "
                             f"'choice_func' must be bool or str, but got {type(out)}.")
    # The engine reads `drop` as shell patterns: a dropped name holding `*`
    # or `?` must not match a parameter that is kept.
    kept = [n for n in names if n not in set(drop)]
    for d in drop:
        if "*" in d or "?" in d:
            rx = _glob_regex(d)
            clash = [k for k in kept if rx.match(k)]
            if clash:
                raise ValueError(f"For 'unified_safetensors', the parameter name {d!r} that 'choice_func' "
                                 f"drops contains '*' or '?' and would also drop {clash[0]!r}; reshard "
                                 f"cannot express this choice")
    return drop, rename


def unified_safetensors(src_dir, src_strategy_file, dst_dir, merge_with_redundancy=True, file_suffix=None,
                        max_process_num=64, choice_func=None, split_dst_file=(), *, part_bytes=None,
                        progress=None):
    """Merge a distributed safetensors checkpoint into MindSpore's unified
    layout (``mindspore.unified_safetensors``): ``dst_dir/part{i}.safetensors``
    (parts of about 3 GiB, MindSpore's assignment), ``param_name_map.json`` and
    ``hyper_param.safetensors``, byte-identical with MindSpore's but for the
    parts' metadata (reshard leaves out the sources' stale ``crc_num`` and
    writes the keys sorted).

    ``choice_func`` is called in Python on every parameter name of the
    source files (``False``: leave it out, a string: write it under that
    name, ``True``: keep it), as MindSpore calls it; the resulting choice is
    handed to the engine. ``split_dst_file=(k, n)``: this is task ``k`` of
    ``n`` and writes only its share of the parts. ``max_process_num`` bounds
    the worker threads. reshard's own keywords: ``part_bytes`` (the part size
    the part count is computed from, default 3 GiB), ``progress`` (as for
    :func:`transform_checkpoints`). Output files of an earlier run are
    overwritten, as MindSpore does.
    """
    src_dir = _path(src_dir, "unified_safetensors", "src_dir")
    src_strategy_file = _path(src_strategy_file, "unified_safetensors", "src_strategy_file")
    dst_dir = _path(dst_dir, "unified_safetensors", "dst_dir")
    if os.path.exists(dst_dir) and not os.path.isdir(dst_dir):
        raise NotADirectoryError(f"For 'unified_safetensors', 'dst_dir' {dst_dir} is not a directory.")
    _check_strategy_dir(src_strategy_file, "src_strategy_file")
    if not os.path.isfile(src_strategy_file) and not os.path.isdir(src_strategy_file):
        raise ValueError(f"For 'unified_safetensors', the 'src_strategy_file' {src_strategy_file} does not exist.")
    if os.path.isfile(src_dir):
        raise ValueError("For 'unified_safetensors', the 'src_dir' can not be a file.")
    st = _collect(src_dir, ".safetensors")
    ck = _collect(src_dir, ".ckpt")
    if st and ck:
        raise ValueError("For 'unified_safetensors', the 'src_dir' cannot contain "
                         "both ckpt file and safetensors file simultaneously")
    if split_dst_file:
        if (not isinstance(split_dst_file, (tuple, list)) or len(split_dst_file) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in split_dst_file)
                or not 1 <= split_dst_file[0] <= split_dst_file[1]):
            raise ValueError(f"For 'unified_safetensors', 'split_dst_file' must be a tuple (k, n) of two ints "
                             f"with 1 <= k <= n, but got {split_dst_file!r}.")
        split = (int(split_dst_file[0]), int(split_dst_file[1]))
    else:
        split = None
    if choice_func is not None and not callable(choice_func):
        raise TypeError(f"For 'unified_safetensors', 'choice_func' must be callable, but got {type(choice_func)}.")
    drop, rename = None, None
    if choice_func is not None:
        names, seen = [], set()
        for rank in sorted(st):
            for f in sorted(st[rank]):
                for k in _safetensors_keys(os.path.join(src_dir, f"rank_{rank}", f)):
                    if k not in seen and not k.startswith("accu_grads"):
                        seen.add(k)
                        names.append(k)
        drop, rename = _evaluate_choice(choice_func, names)
    if dst_dir is None or dst_dir == "":
        raise ValueError("For 'unified_safetensors', the 'dst_dir' can not be empty.")
    os.makedirs(dst_dir, exist_ok=True)
    workers = max(1, min(int(max_process_num or 1), os.cpu_count() or 1))
    kw = dict(has_redundancy=bool(merge_with_redundancy), file_suffix=file_suffix, drop=drop, rename=rename,
              split_dst_file=split, part_bytes=part_bytes, manifest=False)
    args = (os.fspath(src_dir), os.fspath(src_strategy_file), os.fspath(dst_dir))
    planned = json.loads(_native.unify(*args, dry_run=True, **kw))
    stale = [f["path"] for f in planned["plan"]["files"]]
    if planned.get("name_map"):
        stale.append(planned["name_map"])
    for f in stale:
        if os.path.isfile(f):
            os.remove(f)
    _native.unify(*args, workers=workers, progress=progress, **kw)


def _check_strategy_dir(path, what):
    if path and os.path.dirname(path) and not os.path.exists(os.path.dirname(path)):
        raise ValueError("The director of {}: {} is not exists.".format(what, os.path.dirname(path)))


def load_distributed_checkpoint(network, checkpoint_filenames=None, predict_strategy=None,
                                train_strategy_filename=None, strict_load=False, dec_key=None, dec_mode='AES-GCM',
                                format='ckpt', unified_safetensors_dir=None, dst_safetensors_dir=None, rank_id=None,
                                output_format='safetensors', name_map=None, max_process_num=64,
                                return_param_dict=False, *, progress=None):
    """``mindspore.load_distributed_checkpoint``'s save mode (``network=None``,
    ``format='safetensors'``): splits the complete checkpoint in
    ``unified_safetensors_dir`` (``unified_safetensors``' output, or one
    ``.safetensors`` file) for ``predict_strategy`` into
    ``dst_safetensors_dir/rank_{r}/net.{output_format}`` — every rank of the
    strategy, or only ``rank_id`` — byte-identical with MindSpore's files.
    Returns ``True`` as MindSpore does.

    ``predict_strategy=None`` copies the whole checkpoint into
    ``rank_{rank_id}/net.*`` (``rank_0`` without ``rank_id``), as MindSpore
    does. ``name_map`` (``{network name: name in the unified files}``) is
    read as MindSpore 2.10 reads it: parameter ``p`` is the entry
    ``name_map.get(p, p)`` of the file ``p`` is located in. With several
    files, ``param_name_map.json`` locates ``p`` (its keys are the names
    written); with one ``.safetensors`` file, its entries renamed back by
    the flipped map do (the last key wins a shared value; a
    ``param_name_map.json`` beside it is ignored). Hence an entry
    may be written under several names, an entry whose own name the map
    gives to another is left out, and a parameter whose entry is missing is
    skipped without an error — all as MindSpore does.

    Differences, on purpose: loading into a network (``network`` not
    ``None``) is MindSpore's job (a ``TypeError`` says so);
    ``max_process_num`` bounds the worker threads; a lone ``.safetensors``
    file whose ``crc_num`` does not match its content (a unified part copied
    out of its folder) is refused as damaged, where MindSpore reads no CRC.
    """
    if format not in ['safetensors', 'ckpt'] or output_format not in ['safetensors', 'ckpt']:
        raise ValueError(
            "For 'load_distributed_checkpoint', 'format' and 'output_format' "
            f"must be 'ckpt' or 'safetensors', but got {format}.")
    if network is not None or format != 'safetensors':
        raise TypeError("reshard.load_distributed_checkpoint only writes files: it needs network=None and "
                        "format='safetensors' (MindSpore's save mode); to load weights into a network, use "
                        "mindspore.load_distributed_checkpoint")
    if unified_safetensors_dir is None:
        raise ValueError("For 'load_distributed_checkpoint', 'unified_safetensors_dir' can not be None "
                         "when format is 'safetensors'.")
    for param in [checkpoint_filenames, train_strategy_filename, dec_key]:
        if param is not None:
            raise ValueError(f"For 'load_distributed_checkpoint', {param} must be None "
                             "when format is 'safetensors'.")
    if strict_load or dec_mode != 'AES-GCM':
        raise ValueError("For 'load_distributed_checkpoint', strict_load and dec_mode must be default "
                         "when format is 'safetensors'.")
    if dst_safetensors_dir is None:
        raise ValueError("For 'load_distributed_checkpoint', 'dst_safetensors_dir' can not be None "
                         "when network is None.")
    if name_map is not None and not isinstance(name_map, dict):
        raise TypeError(f"For 'load_distributed_checkpoint', 'name_map' must be a dict, "
                        f"but got {type(name_map).__name__}.")
    unified_safetensors_dir = _path(unified_safetensors_dir, "load_distributed_checkpoint", "unified_safetensors_dir")
    dst_safetensors_dir = _path(dst_safetensors_dir, "load_distributed_checkpoint", "dst_safetensors_dir")
    if not os.path.isdir(unified_safetensors_dir):
        raise NotADirectoryError(f"unified_safetensors_dir {unified_safetensors_dir} is not a directory.")
    if rank_id is not None and (not isinstance(rank_id, int) or isinstance(rank_id, bool) or rank_id < 0):
        raise TypeError(f"For 'load_distributed_checkpoint', 'rank_id' must be a non-negative int, "
                        f"but got {rank_id!r}.")
    if predict_strategy is not None and not isinstance(predict_strategy, (str, os.PathLike)):
        raise TypeError("reshard.load_distributed_checkpoint takes 'predict_strategy' as a strategy file "
                        f"path, not {type(predict_strategy).__name__}")
    dst = _strategy(predict_strategy, "predict_strategy")
    os.makedirs(dst_safetensors_dir, exist_ok=True)
    workers = max(1, min(int(max_process_num or 1), os.cpu_count() or 1))
    # Everything the engine writes first goes to a scratch folder inside the
    # destination, moved into place once complete and removed on error.
    scratch = tempfile.mkdtemp(prefix=".reshard-load-", dir=dst_safetensors_dir)
    try:
        unified = os.fspath(unified_safetensors_dir)
        names = {str(k): str(v) for k, v in name_map.items()} if name_map is not None else None
        plan = _LoadPlan(unified, names)
        src = unified if plan.is_direct() else plan.write_dir(os.path.join(scratch, "unified"))
        kw = dict(output_format=output_format, manifest=False, file_name="net")
        if dst is None:
            # MindSpore's predict_strategy=None: every parameter, unsplit, into one rank.
            dst = os.path.join(scratch, "whole.json")
            plan.write_whole_strategy(dst)
            kw["ranks"] = [0]
        elif rank_id is not None:
            kw["ranks"] = [rank_id]
        out = os.path.join(scratch, "out")
        try:
            _native.transform(src, out, None, dst, workers=workers, progress=progress, **kw)
        except errors.ReshardError as e:
            if src != unified:  # name the user's folder, not the scratch copy
                e.args = tuple(a.replace(src, unified) if isinstance(a, str) else a for a in e.args)
                if isinstance(e.path, str):
                    e.path = e.path.replace(src, unified)
            raise
        if predict_strategy is None:
            r = rank_id or 0
            if r:
                os.rename(os.path.join(out, "rank_0"), os.path.join(out, f"rank_{r}"))
        for rank_dir in sorted(os.listdir(out)):
            os.makedirs(os.path.join(dst_safetensors_dir, rank_dir), exist_ok=True)
            for f in os.listdir(os.path.join(out, rank_dir)):
                os.replace(os.path.join(out, rank_dir, f), os.path.join(dst_safetensors_dir, rank_dir, f))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return True


def _st_names(path):
    """The entries of a safetensors file (name → dtype, shape), in its
    header's order; a file that is no safetensors file is reshard's
    CheckpointFormatError naming it."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            header = json.loads(f.read(n)) if n else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise _located(errors.CheckpointFormatError, "bad_input",
                       "not a safetensors file (no valid JSON header)", path)
    header.pop("__metadata__", None)
    return header


def _located(cls, kind, message, path, tensor=None):
    """A reshard error raised on the Python side, with the engine's message
    form (``file: ("tensor"): cause``) and attributes."""
    where = f"{path}: " + (f"({tensor!r}): " if tensor else "")
    e = cls(where + message)
    e.path, e.tensor, e.kind = path, tensor, kind
    return e


class _LoadPlan:
    """What MindSpore's `_load_parallel_checkpoint` reads, before the
    strategy is applied: ``params`` maps each parameter it writes to
    ``(file, entry)`` — the entry of that file read under the parameter's
    name — in the order it writes them; ``headers`` holds each file's
    entries (name → dtype, shape)."""

    def __init__(self, unified, name_map):
        self.unified = unified
        self.headers = {}
        self.ignored_json = False
        files = [f for f in os.listdir(unified) if f.endswith(".safetensors")]
        if len(files) == 1:
            # `_get_param_name_map_by_file`: the file's entries, renamed
            # back by the flipped name_map (its last key wins a value).
            keys = list(self.header(files[0]))
            if name_map:
                flipped = {v: k for k, v in name_map.items()}
                keys = [flipped.get(k, k) for k in keys]
            located = dict.fromkeys(keys, files[0])
            # MindSpore ignores a param_name_map.json beside a single file;
            # the engine would read it.
            self.ignored_json = os.path.isfile(os.path.join(unified, "param_name_map.json"))
        else:
            path = os.path.join(unified, "param_name_map.json")
            if not os.path.isfile(path):
                raise ValueError("For 'load_parallel_checkpoint', there must be a JSON file named "
                                 f"'param_name_map.json' in the 'total_safetensors_dir' ({unified}).")
            with open(path) as f:
                located = json.load(f)
            located = located.get("weight_map", located)
        # The reading loop: parameter p is entry name_map[p] (else p) of the
        # file p is located in; a missing entry is skipped, not an error.
        self.params = {}
        for name, file in located.items():
            entry = name_map[name] if name_map is not None and name in name_map else name
            if not os.path.isfile(os.path.join(unified, file)):
                raise _located(errors.CheckpointNotFoundError, "missing",
                               f"param_name_map.json maps it to {file}, which is not there",
                               os.path.join(unified, file), name)
            if entry in self.header(file):
                self.params[name] = (file, entry)

    def header(self, file):
        if file not in self.headers:
            self.headers[file] = _st_names(os.path.join(self.unified, file))
        return self.headers[file]

    def is_direct(self):
        """Whether the engine reads ``unified`` itself as MindSpore does:
        every parameter is the entry of its own name and every entry of a
        file read is one such parameter."""
        if self.ignored_json:
            return False
        used = {}
        for name, (file, entry) in self.params.items():
            if name != entry:
                return False
            used.setdefault(file, set()).add(name)
        return all(set(self.header(f)) == names for f, names in used.items())

    def write_dir(self, out):
        """A unified directory in ``out`` that the engine reads as
        MindSpore reads ``unified`` with the name map: ``param_name_map.json``
        lists exactly ``params``, each file holds each parameter under its
        own name. A file whose entries need other names is rewritten (an
        entry read under two names is in two copies); its entries that no
        parameter reads get names nothing asks for."""
        os.makedirs(out)
        layers = {}  # file → [{entry: parameter}], one per copy
        for name, (file, entry) in self.params.items():
            copies = layers.setdefault(file, [])
            free = next((c for c in copies if entry not in c), None)
            if free is None:
                free = {}
                copies.append(free)
            free[entry] = name
        weight_map, taken = {}, set(self.params)
        for file, copies in layers.items():
            stem = file[:-len(".safetensors")]
            for k, chosen in enumerate(copies):
                target = file if k == 0 else f"{stem}.copy{k}.safetensors"
                src = os.path.join(self.unified, file)
                renames = {}
                for entry in self.header(file):
                    new = chosen.get(entry)
                    if new is None:
                        new = f"reshard-unread.{k}.{entry}"
                        while new in taken:
                            new = "_" + new
                        taken.add(new)
                    if new != entry:
                        renames[entry] = new
                if renames:
                    _native.rewrite(src, os.path.join(out, target), name_map=renames, verify_crc=False)
                else:
                    os.symlink(os.path.abspath(src), os.path.join(out, target))
                for name in chosen.values():
                    weight_map[name] = target
        hyper = os.path.join(self.unified, "hyper_param.safetensors")
        if os.path.isfile(hyper) and "hyper_param.safetensors" not in layers:
            os.symlink(os.path.abspath(hyper), os.path.join(out, "hyper_param.safetensors"))
        with open(os.path.join(out, "param_name_map.json"), "w") as f:
            json.dump({"weight_map": {name: weight_map[name] for name in self.params}}, f)
        return out

    def write_whole_strategy(self, path):
        """A one-device strategy (JSON) holding every parameter, in order:
        MindSpore's predict_strategy=None copies them unsplit, and the
        engine then writes exactly its ``rank_*/net.*``."""
        items = {}
        for name, (file, entry) in self.params.items():
            items[name] = {"dev_matrix": [1], "tensor_map": [-1] * len(self.header(file)[entry]["shape"]),
                           "field": 0, "opt_weight_shard_size": 0, "opt_weight_shard_step": 0}
        with open(path, "w") as f:
            json.dump({"parallel_layout_item": items}, f)
