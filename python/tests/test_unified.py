"""The safetensors-era functions against MindSpore 2.10: unified_safetensors,
load_distributed_checkpoint (network=None) and transform_checkpoints of a
safetensors source.

Inputs come from tests/conformance/py/unify_gen.py (the generator of the Rust
unify conformance test: safetensors rank files as MindFormers leaves them,
MindSpore's unified directory and its split for a destination strategy);
every other answer is computed here by calling MindSpore with the same
arguments as reshard. Skipped without MindSpore unless
RESHARD_REQUIRE_MINDSPORE=1, where it fails.
"""
import json
import math
import os
import shutil
import struct
import types
import unittest

import reshard
from reshard import _native, errors

from test_conformance import REPO, Base, files_under, generate_cases, ms

GEN = os.path.join(REPO, "tests", "conformance", "py", "unify_gen.py")
CASE = {"name": "py_dp2mp2", "dtype": "bfloat16", "src": {"dev": [2, 2]}, "dst": {"dev": [4]},
        "runs": [{"out": "unified"}]}
PART_BYTES = 3000  # several parts from a small model
ROOT = None


def setUpModule():
    global ROOT
    ROOT = generate_cases("reshard-py-unified-", GEN, [CASE])


def tearDownModule():
    if ROOT:
        shutil.rmtree(ROOT, ignore_errors=True)


def d(*parts):
    return os.path.join(ROOT, CASE["name"], *parts)



def split_st(path):
    """(header without __metadata__, metadata, data) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return header, header.pop("__metadata__", {}) or {}, raw[8 + n:]


def _safetensors_names(path):
    return [k for k in split_st(path)[0]]


def ms_unified(out, part_bytes=None, **kw):
    """mindspore.unified_safetensors, with its 3 GiB part size replaced."""
    import mindspore.parallel.transform_safetensors as T
    real = math
    if part_bytes:
        T.math = types.SimpleNamespace(ceil=lambda x: real.ceil(round(x * 3 * 1024 ** 3) / part_bytes),
                                       prod=real.prod)
    try:
        ms.unified_safetensors(d("src"), d("src_strategy_merged.ckpt"), out, max_process_num=1, **kw)
    finally:
        T.math = real


class Unified(Base):
    def assertSameUnified(self, ours, theirs):
        """Parts: the same tensors and bytes; metadata the same but MindSpore's
        stale crc_num (reshard leaves it out, on purpose); other files byte-identical."""
        self.assertEqual(files_under(ours), files_under(theirs))
        for rel in files_under(theirs):
            a, b = os.path.join(ours, rel), os.path.join(theirs, rel)
            if not rel.startswith("part"):
                self.assertSameFile(a, b)
                continue
            (ha, ma, da), (hb, mb, db) = split_st(a), split_st(b)
            self.assertEqual(ha, hb, f"{rel}: tensor headers differ")
            self.assertTrue(da == db, f"{rel}: tensor bytes differ")
            self.assertIsNotNone(mb.pop("crc_num", None), f"{rel}: MindSpore copied no crc_num")
            self.assertEqual(ma, mb, f"{rel}: metadata differs")

    def test_default_is_mindsporess_unified_dir(self):
        out = os.path.join(self.tmp, "u")
        reshard.unified_safetensors(d("src"), d("src_strategy_merged.ckpt"), out)
        self.assertSameUnified(out, d("unified"))
        # Run again into the same folder: MindSpore overwrites, so does reshard.
        reshard.unified_safetensors(d("src"), d("src_strategy_merged.ckpt"), out, max_process_num=2)
        self.assertSameUnified(out, d("unified"))

    def test_choice_func_and_parts_as_mindspore(self):
        calls = []

        def choice(name):
            calls.append(name)
            if name.startswith("model.layers.1."):
                return False
            return {"lm_head.weight": "output.weight"}.get(name, True)

        ms_out, rs_out = os.path.join(self.tmp, "ms"), os.path.join(self.tmp, "rs")
        ms_unified(ms_out, PART_BYTES, choice_func=choice)
        calls.clear()
        reshard.unified_safetensors(d("src"), d("src_strategy_merged.ckpt"), rs_out, choice_func=choice,
                                    part_bytes=PART_BYTES, max_process_num=2)
        self.assertIn("lm_head.weight", calls)
        parts = [f for f in files_under(rs_out) if f.startswith("part")]
        self.assertGreater(len(parts), 2)
        self.assertSameUnified(rs_out, ms_out)
        with open(os.path.join(rs_out, "param_name_map.json")) as f:
            weight_map = json.load(f)["weight_map"]
        self.assertIn("output.weight", weight_map)
        self.assertFalse(any(k.startswith("model.layers.1.") for k in weight_map))

    def test_split_dst_file_as_mindspore(self):
        for k in (1, 2, 3):
            with self.subTest(task=k):
                ms_out, rs_out = os.path.join(self.tmp, f"ms{k}"), os.path.join(self.tmp, f"rs{k}")
                ms_unified(ms_out, PART_BYTES, split_dst_file=(k, 3))
                reshard.unified_safetensors(d("src"), d("src_strategy_merged.ckpt"), rs_out,
                                            split_dst_file=(k, 3), part_bytes=PART_BYTES)
                self.assertSameUnified(rs_out, ms_out)
                self.assertEqual(os.path.exists(os.path.join(rs_out, "param_name_map.json")), k == 1)

    def test_bad_arguments(self):
        strat = d("src_strategy_merged.ckpt")
        out = os.path.join(self.tmp, "out")
        some_file = os.path.join(d("src"), "rank_0", os.listdir(d("src", "rank_0"))[0])
        with self.assertRaisesRegex(ValueError, "can not be a file"):
            reshard.unified_safetensors(some_file, strat, out)
        with self.assertRaisesRegex(ValueError, "is not exists"):
            reshard.unified_safetensors(d("src"), "/no/such/dir/s.ckpt", out)
        with self.assertRaisesRegex(ValueError, "must be bool or str"):
            reshard.unified_safetensors(d("src"), strat, out, choice_func=lambda n: 1)
        with self.assertRaisesRegex(ValueError, "split_dst_file"):
            reshard.unified_safetensors(d("src"), strat, out, split_dst_file=(4, 3))
        # Positional arguments in the wrong order: the strategy where the source goes.
        with self.assertRaises(ValueError):
            reshard.unified_safetensors(strat, d("src"), out)
        self.assertEqual(files_under(out) if os.path.isdir(out) else [], [])
        # A missing rank file: an error naming it, nothing written.
        src = os.path.join(self.tmp, "src")
        shutil.copytree(d("src"), src)
        shutil.rmtree(os.path.join(src, "rank_3"))
        with self.assertRaises(errors.ReshardError) as cm:
            reshard.unified_safetensors(src, strat, out)
        self.assertIn("3", str(cm.exception))
        self.assertEqual(files_under(out), [])

    def test_load_distributed_checkpoint_every_rank(self):
        out = os.path.join(self.tmp, "loaded")
        self.assertTrue(reshard.load_distributed_checkpoint(
            None, predict_strategy=d("dst_strategy_merged.ckpt"), format="safetensors",
            unified_safetensors_dir=d("unified"), dst_safetensors_dir=out))
        self.assertSameTree(out, d("loaded"))

    def test_load_distributed_checkpoint_rank_id_output_format_multi_part(self):
        # A unified dir of several parts, renamed by choice_func, made by MindSpore.
        unified = os.path.join(self.tmp, "parts")
        ms_unified(unified, PART_BYTES, choice_func=lambda n: "output.weight" if n == "lm_head.weight" else True)
        dst_s = d("dst_strategy_merged.ckpt")
        for rank_id, fmt, strat in ((3, "ckpt", dst_s), (1, "safetensors", dst_s)):
            with self.subTest(rank_id=rank_id, output_format=fmt, strategy=strat):
                ms_out = os.path.join(self.tmp, f"ms-{rank_id}")
                rs_out = os.path.join(self.tmp, f"rs-{rank_id}")
                ms.load_distributed_checkpoint(None, predict_strategy=strat, format="safetensors",
                                               unified_safetensors_dir=unified, dst_safetensors_dir=ms_out,
                                               rank_id=rank_id, output_format=fmt)
                reshard.load_distributed_checkpoint(None, predict_strategy=strat, format="safetensors",
                                                    unified_safetensors_dir=unified, dst_safetensors_dir=rs_out,
                                                    rank_id=rank_id, output_format=fmt)
                self.assertEqual(files_under(rs_out), [f"rank_{rank_id}/net.{fmt}"])
                self.assertSameTree(rs_out, ms_out)

    def renamed_unified(self, name_map):
        """d("unified") with entries renamed by name_map (network name ->
        entry name), as MindSpore's name_map reads them: the several-file
        directory (param_name_map.json keeps the network names) and its part
        alone (MindSpore then maps the entries back by name_map)."""
        multi = os.path.join(self.tmp, "renamed")
        os.makedirs(multi)
        for f in os.listdir(d("unified")):
            if f.startswith("part"):
                _native.rewrite(d("unified", f), os.path.join(multi, f), name_map=name_map, verify_crc=False)
            else:
                shutil.copy(d("unified", f), os.path.join(multi, f))
        single = os.path.join(self.tmp, "renamed-single")
        os.makedirs(single)
        shutil.copy(os.path.join(multi, "part0.safetensors"), single)
        return multi, single

    def test_load_distributed_checkpoint_name_map_and_no_strategy_as_mindspore(self):
        name_map = {"lm_head.weight": "output.weight", "model.layers.0.feed_forward.w1.weight": "l0.w1"}
        multi, single = self.renamed_unified(name_map)
        dst_s = d("dst_strategy_merged.ckpt")
        cases = [(d("unified"), None, None, None, "ckpt"), (d("unified"), None, None, 2, "safetensors")]
        for unified in (multi, single):
            cases += [(unified, name_map, dst_s, None, "safetensors"), (unified, name_map, dst_s, 2, "ckpt"),
                      (unified, name_map, None, None, "ckpt"), (unified, name_map, None, 1, "safetensors")]
        # Without the map, the single file's renamed entries are not the
        # strategy's: MindSpore leaves them out, so does reshard.
        cases.append((single, None, dst_s, 0, "ckpt"))
        for i, (unified, nm, strat, rank_id, fmt) in enumerate(cases):
            with self.subTest(unified=unified, name_map=nm, strategy=strat, rank_id=rank_id, output_format=fmt):
                kw = dict(predict_strategy=strat, format="safetensors", unified_safetensors_dir=unified,
                          rank_id=rank_id, output_format=fmt, name_map=nm)
                ms_out, rs_out = os.path.join(self.tmp, f"ms-{i}"), os.path.join(self.tmp, f"rs-{i}")
                ms.load_distributed_checkpoint(None, dst_safetensors_dir=ms_out, **kw)
                self.assertTrue(reshard.load_distributed_checkpoint(None, dst_safetensors_dir=rs_out, **kw))
                if strat is None:
                    self.assertEqual(files_under(rs_out), [f"rank_{rank_id or 0}/net.{fmt}"])
                self.assertSameTree(rs_out, ms_out)
        # An error after the renamed copy is made (the strategy is a folder):
        # the destination keeps nothing, the scratch folder included.
        out = os.path.join(self.tmp, "failed")
        with self.assertRaises(errors.ReshardError) as cm:
            reshard.load_distributed_checkpoint(None, predict_strategy=d("unified"), format="safetensors",
                                                unified_safetensors_dir=single, dst_safetensors_dir=out,
                                                name_map=name_map)
        self.assertNotIn(".reshard-load-", str(cm.exception))
        self.assertEqual(os.listdir(out), [])
        # A damaged entry found while reading the scratch copy: the message
        # and the error's path name the user's folder.
        broken = os.path.join(self.tmp, "broken")
        shutil.copytree(single, broken)
        part = os.path.join(broken, "part0.safetensors")
        with open(part, "r+b") as f:
            f.truncate(os.path.getsize(part) - 64)
        with self.assertRaises(errors.ReshardError) as cm:
            reshard.load_distributed_checkpoint(None, predict_strategy=d("dst_strategy_merged.ckpt"),
                                                format="safetensors", unified_safetensors_dir=broken,
                                                dst_safetensors_dir=os.path.join(self.tmp, "b"),
                                                name_map={"lm_head.weight": "model.norm_out.weight"})
        self.assertNotIn(".reshard-load-", str(cm.exception))

    def test_load_distributed_checkpoint_name_map_corner_cases_as_mindspore(self):
        """MindSpore 2.10's reading of name_map, case by case: a parameter is
        the entry name_map[p] (else p) of the file p is located in (a single
        file: its entries, renamed back by the flipped map; several:
        param_name_map.json); a missing entry is skipped; an entry may be read
        under several names; an entry whose name the map gives to another
        is shadowed."""
        multi, _ = self.renamed_unified({"lm_head.weight": "output.weight"})
        single = os.path.join(self.tmp, "single")
        os.makedirs(single)
        # The part alone, without its stale crc_num (MindSpore reads no CRC).
        _native.rewrite(d("unified", "part0.safetensors"), os.path.join(single, "part0.safetensors"),
                        verify_crc=False)
        emb, w1 = "model.tok_embeddings.embedding_weight", "model.layers.0.feed_forward.w1.weight"
        maps = {
            "missing_entry": {"lm_head.weight": "no.such.entry"},
            "shadowed": {"lm_head.weight": emb},
            "read_twice": {"lm_head.weight": w1, emb: w1},
            "identity_and_empty": {"lm_head.weight": "lm_head.weight"},
            # A key no file entry or param_name_map.json names: nothing reads it.
            "key_not_located": {"net.head": "lm_head.weight"},
        }
        scenarios = [(name, unified, nm) for name, nm in maps.items() for unified in (single, d("unified"))]
        # One part beside a param_name_map.json naming other entries:
        # MindSpore reads the part's own names and ignores the JSON.
        stale_json = os.path.join(self.tmp, "single-stale-json")
        shutil.copytree(single, stale_json)
        with open(os.path.join(stale_json, "param_name_map.json"), "w") as f:
            json.dump({"weight_map": {"lm_head.weight": "part0.safetensors", "no.such": "part0.safetensors"}}, f)
        scenarios += [("empty_map", single, {}), ("json_names_missing_entries", multi, None),
                      ("single_file_ignores_json", stale_json, None)]
        dst_s = d("dst_strategy_merged.ckpt")
        for i, (name, unified, nm) in enumerate(scenarios):
            for j, (strat, rank_id, fmt) in enumerate(((dst_s, None, "safetensors"), (dst_s, 2, "ckpt"),
                                                       (None, None, "safetensors"))):
                with self.subTest(case=name, unified=os.path.basename(unified), strategy=strat, rank_id=rank_id):
                    kw = dict(predict_strategy=strat, format="safetensors", unified_safetensors_dir=unified,
                              rank_id=rank_id, output_format=fmt, name_map=nm)
                    ms_out, rs_out = os.path.join(self.tmp, f"ms-{i}-{j}"), os.path.join(self.tmp, f"rs-{i}-{j}")
                    ms.load_distributed_checkpoint(None, dst_safetensors_dir=ms_out, **kw)
                    self.assertTrue(reshard.load_distributed_checkpoint(None, dst_safetensors_dir=rs_out, **kw))
                    self.assertSameTree(rs_out, ms_out)
        # What the cases did (a check on the oracle, not on reshard): the
        # missing entry's parameter is left out, the shadowed entry is gone,
        # the entry read twice is in the output under both of its readers.
        def names(tree):
            return set(_safetensors_names(os.path.join(tree, "rank_0", "net.safetensors")))
        i = [n for n, _, _ in scenarios].index("missing_entry")
        self.assertNotIn("lm_head.weight", names(os.path.join(self.tmp, f"rs-{i}-2")))
        i = [n for n, _, _ in scenarios].index("shadowed")
        self.assertNotIn(emb, names(os.path.join(self.tmp, f"rs-{i}-2")))
        self.assertIn("lm_head.weight", names(os.path.join(self.tmp, f"rs-{i}-2")))
        i = scenarios.index(("read_twice", d("unified"), maps["read_twice"]))
        header, _, data = split_st(os.path.join(self.tmp, f"rs-{i}-2", "rank_0", "net.safetensors"))
        twice = [data[slice(*header[n]["data_offsets"])] for n in ("lm_head.weight", emb, w1)]
        self.assertEqual(twice[0], twice[2])
        self.assertEqual(twice[1], twice[2])

    def test_load_distributed_checkpoint_bad_arguments(self):
        out = os.path.join(self.tmp, "o")
        kw = dict(predict_strategy=d("dst_strategy_merged.ckpt"), format="safetensors",
                  unified_safetensors_dir=d("unified"), dst_safetensors_dir=out)
        with self.assertRaisesRegex(TypeError, "network=None"):
            reshard.load_distributed_checkpoint(object(), **kw)
        with self.assertRaisesRegex(TypeError, "network=None"):
            reshard.load_distributed_checkpoint(None, **dict(kw, format="ckpt"))
        with self.assertRaisesRegex(ValueError, "must be 'ckpt' or 'safetensors'"):
            reshard.load_distributed_checkpoint(None, **dict(kw, output_format="npz"))
        with self.assertRaisesRegex(ValueError, "dst_safetensors_dir"):
            reshard.load_distributed_checkpoint(None, **dict(kw, dst_safetensors_dir=None))
        with self.assertRaisesRegex(ValueError, "strict_load"):
            reshard.load_distributed_checkpoint(None, strict_load=True, **kw)
        with self.assertRaisesRegex(TypeError, "name_map"):
            reshard.load_distributed_checkpoint(None, name_map=[("a", "b")], **kw)
        with self.assertRaises(TypeError):
            reshard.load_distributed_checkpoint(None, rank_id="0", **kw)
        # Arguments swapped: the strategy file given as the unified dir, and the other way round.
        with self.assertRaisesRegex(NotADirectoryError, "dst_strategy_merged.ckpt"):
            reshard.load_distributed_checkpoint(None, **dict(kw, unified_safetensors_dir=d("dst_strategy_merged.ckpt"),
                                                             predict_strategy=d("unified")))
        with self.assertRaises(errors.ReshardError) as cm:
            reshard.load_distributed_checkpoint(None, **dict(kw, predict_strategy=d("unified")))
        self.assertIn("unified", str(cm.exception))
        self.assertEqual(files_under(out) if os.path.isdir(out) else [], [])


class WrongArguments(Base):
    """The issue's bad input for the Python side: positional arguments in the
    wrong order, a number where a path goes. Each is a clear exception naming
    the argument, raised before anything is written."""

    def test_a_number_where_a_path_goes(self):
        src, strat = d("src"), d("src_strategy_merged.ckpt")
        out = os.path.join(self.tmp, "out")
        calls = {
            "src_checkpoints_dir": lambda: reshard.transform_checkpoints(8, out, "p"),
            "dst_checkpoints_dir": lambda: reshard.transform_checkpoints(src, 8, "p", strat),
            "ckpt_prefix": lambda: reshard.transform_checkpoints(src, out, 8, strat),
            "src_strategy_file": lambda: reshard.transform_checkpoints(src, out, "p", 4, 8),
            "checkpoint_files_map": lambda: reshard.transform_checkpoint_by_rank({0: "a.ckpt"}, 0, out + ".ckpt"),
            "save_checkpoint_file_name": lambda: reshard.transform_checkpoint_by_rank(0, {}, 5),
            "rank_id": lambda: reshard.rank_list_for_transform(strat, 0),
            "src_strategy_dirs": lambda: reshard.merge_pipeline_strategys(3, os.path.join(out, "m.ckpt")),
            "save_path": lambda: reshard.ckpt_to_safetensors(src, 2),
            "file_path": lambda: reshard.safetensors_to_ckpt(2, out),
            "file_name_regex": lambda: reshard.safetensors_to_ckpt(src, out, None, 5),
            "src_dir": lambda: reshard.unified_safetensors(3, strat, out),
            "dst_dir": lambda: reshard.unified_safetensors(src, strat, 4),
            "'src_strategy_file'": lambda: reshard.unified_safetensors(src, 7, out),
            "unified_safetensors_dir": lambda: reshard.load_distributed_checkpoint(
                None, predict_strategy=strat, format="safetensors", unified_safetensors_dir=3,
                dst_safetensors_dir=out),
        }
        for what, call in calls.items():
            with self.subTest(argument=what):
                with self.assertRaises(TypeError) as cm:
                    call()
                self.assertIn(what.split("_")[0].strip("'"), str(cm.exception))
        self.assertFalse(os.path.exists(out))

    def test_arguments_swapped(self):
        src, strat = d("src"), d("src_strategy_merged.ckpt")
        out = os.path.join(self.tmp, "out")
        # The strategy where the destination goes, the destination where the strategy goes.
        with self.assertRaisesRegex(NotADirectoryError, "dst_dir.*src_strategy_merged.ckpt"):
            reshard.unified_safetensors(src, out, strat)
        # The merged strategy file given as the folder of per-stage files.
        with self.assertRaises(NotADirectoryError):
            reshard.merge_pipeline_strategys(strat, os.path.join(out, "merged.ckpt"))
        # Source and destination swapped: the destination does not exist.
        with self.assertRaises(NotADirectoryError):
            reshard.transform_checkpoints(out, src, "checkpoint_", strat)
        self.assertFalse(os.path.exists(out))
        # The strategy given where the prefix goes.
        with self.assertRaisesRegex(ValueError, "ckpt_prefix"):
            reshard.transform_checkpoints(src, out, strat)
        self.assertFalse(os.path.exists(out))


class SafetensorsTransform(Base):
    def test_safetensors_source_to_ckpt_as_mindspore(self):
        """transform_checkpoints of a safetensors tree with output_format='ckpt' (MindSpore's default)."""
        ms_out, rs_out = os.path.join(self.tmp, "ms"), os.path.join(self.tmp, "rs")
        for dst in (d("dst_strategy_merged.ckpt"), None):
            with self.subTest(dst=dst):
                shutil.rmtree(ms_out, ignore_errors=True)
                shutil.rmtree(rs_out, ignore_errors=True)
                ms.transform_checkpoints(d("src"), ms_out, "checkpoint_", d("src_strategy_merged.ckpt"), dst)
                reshard.transform_checkpoints(d("src"), rs_out, "checkpoint_", d("src_strategy_merged.ckpt"), dst,
                                              process_num=2)
                self.assertTrue(all(f.endswith(".ckpt") for f in files_under(rs_out)))
                self.assertSameTree(rs_out, ms_out)


if __name__ == "__main__":
    unittest.main()
