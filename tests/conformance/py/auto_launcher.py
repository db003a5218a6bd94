"""A Python launcher calling reshard in-process through its C ABI (ctypes),
as a training script would: one process per rank, with RANK_ID, RANK_SIZE
and DEVICE_NUM_PER_NODE set, each calling reshard_auto_convert; then
MindSpore loads every rank's file (ms.load_checkpoint).

usage: auto_launcher.py LIBRESHARD JOB_DIR WORLD NPU_PER_NODE SETTINGS_JSON
prints JSON: {"ranks": [{"rank", "rc", "path", "action", "error", "params"}]}

The rank processes import only ctypes (fast); MindSpore is imported once,
in this process, after they finish.
"""
import ctypes
import json
import os
import subprocess
import sys


def convert(lib_path, job_dir, settings):
    """One rank: reshard_auto_convert in this process. Returns a dict."""
    lib = ctypes.CDLL(lib_path)
    out = ctypes.POINTER(ctypes.c_void_p)
    lib.reshard_auto_convert.argtypes = [ctypes.c_char_p, ctypes.c_char_p, out, out, out]
    lib.reshard_auto_convert.restype = ctypes.c_int
    lib.reshard_string_free.argtypes = [ctypes.c_void_p]
    lib.reshard_version.restype = ctypes.c_char_p
    path, report, error = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    os.chdir(job_dir)
    rc = lib.reshard_auto_convert(b"run.yaml", settings.encode(), ctypes.byref(path),
                                  ctypes.byref(report), ctypes.byref(error))

    def take(p):
        if not p.value:
            return None
        s = ctypes.string_at(p.value).decode()
        lib.reshard_string_free(p)
        return s

    path, report, error = take(path), take(report), take(error)
    return {
        "rank": int(os.environ["RANK_ID"]),
        "rc": rc,
        "path": path,
        "action": json.loads(report)["action"] if report else None,
        "error": error,
        "version": lib.reshard_version().decode(),
    }


def main():
    if sys.argv[1] == "--rank":
        print(json.dumps(convert(sys.argv[2], sys.argv[3], sys.argv[4])))
        return
    lib, job, world, npn, settings = sys.argv[1:6]
    procs = []
    for r in range(int(world)):
        env = dict(os.environ, RANK_ID=str(r), RANK_SIZE=world, DEVICE_NUM_PER_NODE=npn)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--rank", lib, job, settings],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    ranks = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise SystemExit(f"rank process failed: {err.decode()}")
        ranks.append(json.loads(out))
    from common import ms  # noqa: E402  (after the ranks: they need no MindSpore)
    for r in ranks:
        if r["rc"] == 0 and r["path"]:
            r["params"] = len(ms.load_checkpoint(r["path"]))
    print(json.dumps({"ranks": ranks}))


if __name__ == "__main__":
    main()
