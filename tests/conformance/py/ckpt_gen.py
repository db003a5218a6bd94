"""Writes MindSpore-made checkpoints and a manifest of what MindSpore loads back.

usage: ckpt_gen.py OUT_DIR [--big]   (--big writes only the two big files)

Files (all written by mindspore.save_checkpoint 2.10):
  dtypes.ckpt          every loadable dtype, scalars, append_dict int/float/bool/str
  crc.ckpt             the same with crc_check=True
  enc_<mode>_<bits>.ckpt   encrypted (AES-GCM 128/256, AES-CBC 128/192, SM4-CBC)
  dtypes.safetensors   save_checkpoint(format="safetensors")
  crc.safetensors      the same without bf16, crc_check=True
  converted/dtypes.safetensors   ms.ckpt_to_safetensors(tensors.ckpt)
  maptensor.ckpt       MapParameter records (two slices) as _write_mapparameter writes them, then a tensor
  tensors.ckpt         dtypes.ckpt without string entries (the safetensors path has no strings)
  big.ckpt             (--big) one float32 tensor of 512 MiB + 4000 B: two records
  big_async.ckpt       (--big) a [16777341, 8] float32 array, async_save: dim-0 split
manifest.json: {file: {"entries": [...], "options": {...}}}
"""
import os
import sys

from common import describe_file, dump, ms, np

KEYS = {
    "enc_gcm_128": (b"0123456789abcdef", "AES-GCM"),
    "enc_gcm_256": (b"0123456789abcdef0123456789abcdef", "AES-GCM"),
    "enc_cbc_128": (b"fedcba9876543210", "AES-CBC"),
    "enc_cbc_192": (b"fedcba9876543210fedcba98", "AES-CBC"),
    "enc_sm4_128": (b"sm4-key-16-bytes", "SM4-CBC"),
}


def tensors(rng):
    out = []
    float_dtypes = [("f16", ms.float16), ("f32", ms.float32), ("f64", ms.float64), ("bf16", ms.bfloat16)]
    for tag, dt in float_dtypes:
        data = rng.standard_normal((3, 5, 2)).astype(np.float32)
        out.append({"name": f"model.layers.0.{tag}.weight", "data": ms.Tensor(data).astype(dt)})
    int_dtypes = [("i8", np.int8), ("u8", np.uint8), ("i16", np.int16), ("u16", np.uint16),
                  ("i32", np.int32), ("u32", np.uint32), ("i64", np.int64), ("u64", np.uint64)]
    for tag, dt in int_dtypes:
        info = np.iinfo(dt)
        data = rng.integers(info.min, info.max, size=(4, 7), dtype=dt, endpoint=True)
        out.append({"name": f"ints.{tag}", "data": ms.Tensor(data)})
    out.append({"name": "mask.bool", "data": ms.Tensor(rng.integers(0, 2, size=(9,)).astype(np.bool_))})
    out.append({"name": "scalar.f32", "data": ms.Tensor(np.array(2.5, dtype=np.float32))})
    out.append({"name": "global_step", "data": ms.Parameter(ms.Tensor(np.array([42], dtype=np.int32)), name="global_step")})
    out.append({"name": "wide.f16", "data": ms.Tensor(rng.standard_normal((1, 257)).astype(np.float16))})
    return out


APPEND = {"epoch_num": 3, "loss_scale": 1024.0, "is_last": True,
          "note": "héllo wörld ✓", "empty": "", "step_num": 7}


def main():
    out = sys.argv[1]
    big = "--big" in sys.argv
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20261127)
    params = tensors(rng)
    manifest = {}

    def record(name, options, **load_kwargs):
        manifest[name] = {"entries": describe_file(os.path.join(out, name), **load_kwargs), "options": options}

    if big:
        write_big(out, params, record)
        dump(manifest, os.path.join(out, "manifest.json"))
        print("ok")
        return

    ms.save_checkpoint(params, os.path.join(out, "dtypes.ckpt"), append_dict=dict(APPEND))
    record("dtypes.ckpt", {})
    ms.save_checkpoint(params, os.path.join(out, "crc.ckpt"), append_dict=dict(APPEND), crc_check=True)
    record("crc.ckpt", {"crc": True}, crc_check=True)
    write_map_tensor(os.path.join(out, "maptensor.ckpt"), params)
    record("maptensor.ckpt", {})
    ms.save_checkpoint(params, os.path.join(out, "tensors.ckpt"),
                       append_dict={"epoch_num": 3, "loss_scale": 1024.0})
    record("tensors.ckpt", {})
    for stem, (key, mode) in KEYS.items():
        ms.save_checkpoint(params, os.path.join(out, f"{stem}.ckpt"), append_dict=dict(APPEND),
                           enc_key=key, enc_mode=mode)
        record(f"{stem}.ckpt", {"key_hex": key.hex(), "mode": mode}, dec_key=key, dec_mode=mode)

    ms.save_checkpoint(params, os.path.join(out, "dtypes.safetensors"), format="safetensors",
                       append_dict={"epoch_num": 3, "loss_scale": 1024.0})
    record("dtypes.safetensors", {}, format="safetensors")
    # MindSpore's safetensors CRC calls bytes() on each array, which numpy
    # refuses for bfloat16: the CRC file leaves bf16 out.
    no_bf16 = [p for p in params if p["data"].dtype != ms.bfloat16]
    ms.save_checkpoint(no_bf16, os.path.join(out, "crc.safetensors"), format="safetensors",
                       append_dict={"epoch_num": 3, "loss_scale": 1024.0, "is_last": False}, crc_check=True)
    record("crc.safetensors", {"crc": True}, format="safetensors", crc_check=True)
    ms.ckpt_to_safetensors(os.path.join(out, "tensors.ckpt"), save_path=os.path.join(out, "converted"))
    record("converted/tensors.safetensors", {}, format="safetensors")
    ms.safetensors_to_ckpt(os.path.join(out, "converted", "tensors.safetensors"),
                           save_path=os.path.join(out, "back"))
    record("back/tensors.ckpt", {})

    dump(manifest, os.path.join(out, "manifest.json"))
    print("ok")


def write_map_tensor(path, params):
    """MapParameter needs a device build to construct, so its records are
    written with MindSpore's own protobuf classes, field for field as
    serialization._write_mapparameter does (one record per exported slice)."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    def slice_record(name, arrays):
        ckpt = Checkpoint()
        value = ckpt.value.add()
        value.tag = name
        for arr in arrays:
            t = value.maptensor.tensor.add()
            t.dims.extend(arr.shape)
            t.tensor_type = str(arr.dtype)
            t.tensor_content = arr.reshape(-1).tobytes()
        return ckpt.SerializeToString()

    tail = path + ".tail.ckpt"
    ms.save_checkpoint(params[:2], tail)
    with open(path, "wb") as f:
        f.write(slice_record("embedding.map", [np.array([1, 5], np.int32), np.ones((2, 3), np.float32),
                                               np.zeros(2, np.int32)]))
        f.write(slice_record("embedding.map", [np.array([7], np.int32), np.full((1, 3), 2, np.float32),
                                               np.zeros(1, np.int32)]))
        with open(tail, "rb") as t:
            f.write(t.read())
    os.chmod(tail, 0o600)
    os.remove(tail)


def write_big(out, params, record):
    """Tensors above MindSpore's 512 MiB record limit, through both writer paths."""
    n = (512 * 1024 * 1024 + 4000) // 4
    big_t = ms.Tensor(np.arange(n, dtype=np.float32))
    ms.save_checkpoint([{"name": "big.weight", "data": big_t}, {"name": "small", "data": params[0]["data"]}],
                       os.path.join(out, "big.ckpt"), crc_check=True)
    del big_t
    record("big.ckpt", {"crc": True}, crc_check=True)
    arr = np.arange(16777341 * 8, dtype=np.float32).reshape(16777341, 8)
    ms.save_checkpoint([{"name": "big.rows", "data": ms.Tensor(arr)}],
                       os.path.join(out, "big_async.ckpt"), async_save=True)
    del arr
    from mindspore.train.serialization import _wait_async_thread_save_ckpt
    _wait_async_thread_save_ckpt()
    record("big_async.ckpt", {"split": "rows"})


if __name__ == "__main__":
    main()
