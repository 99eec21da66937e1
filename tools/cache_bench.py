"""The cost of the decoded-image cache's checksums (issue 20): write an entry, open it (verify every image), and
the hash candidates' throughput.

    python -m tools.cache_bench [--images 38400] [--size 84] [--repeat 3] [--dir DIR] [--out FILE]

Defaults: a miniImageNet-sized train split, 38,400 x 84 x 84 x 3 uint8 (813 MB) of random pixels. Each repeat
goes through ``data_generator.image_cache`` exactly as a run does:

* ``write``: :func:`write_cache` (reserve the file, fill it, flush, compute the 38,400 digests, move into place,
  write the record). ``fill_s`` is the time inside the fill callback (here: drawing random pixels; in a run:
  decoding images), ``write_overhead_s`` = ``write_s - fill_s`` is what the cache itself costs;
* ``verify_warm``: :func:`lookup_cache` right after writing (the file in the page cache: the usual case, a run
  opens the entry its previous phase wrote): parse and check the record, then recompute every digest;
* ``verify_cold``: the same after the file's pages were dropped from the page cache (``fsync`` +
  ``posix_fadvise(DONTNEED)`` on that file only): the first open after a reboot, bounded by the disk.

Reported: the median of ``--repeat`` runs of each, the machine (``lscpu`` model name, usable CPUs), the load average
before and after, and (``hashes``) the single-thread throughput of the hashlib candidates on 2,000 images, the
measurement behind the choice of sha1. The folder (``--dir``, default a temporary one) is removed afterwards.
Prints one json line, also written to ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

from tools.format_bench import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {"cpu": model, "usable_cpus": cpus, "python": platform.python_version(), "numpy": np.__version__}


def _drop_from_page_cache(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def hash_throughput(size: int, n: int = 2000) -> dict:
    """MB/s of each candidate over n random images of size x size x 3 (one thread, the per-image loop of a run)."""
    imgs = np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    cands = {"sha1": lambda b: hashlib.sha1(b).digest(), "blake2b-8": lambda b: hashlib.blake2b(b, digest_size=8),
             "sha256": lambda b: hashlib.sha256(b).digest(), "md5": lambda b: hashlib.md5(b).digest(),
             "crc32 (32 bits: too short for duplicate finding)": zlib.crc32}
    out = {}
    for name, f in cands.items():
        t0 = time.perf_counter()
        for i in range(n):
            f(imgs[i])
        out[name] = round(imgs.nbytes / (time.perf_counter() - t0) / 1e6)
    return out


def run(images: int, size: int, repeat: int, folder: str) -> dict:
    sys.path.insert(0, ROOT)
    from data_generator.image_cache import cache_paths, lookup_cache, write_cache
    key = "0" * 40
    npy, _ = cache_paths(folder, key)
    rows = {"write_s": [], "fill_s": [], "write_overhead_s": [], "verify_warm_s": [], "verify_cold_s": []}
    cold_ok = True
    for r in range(repeat):
        fill_time = [0.0]

        def fill(out: np.ndarray, seed: int = r) -> None:
            t = time.perf_counter()
            rng = np.random.default_rng(seed)
            for s in range(0, len(out), 1024):
                out[s:s + 1024] = rng.integers(0, 256, out[s:s + 1024].shape, dtype=np.uint8)
            fill_time[0] = time.perf_counter() - t

        t0 = time.perf_counter()
        entry = write_cache(folder, key, images, size, fill, {"class_names": ["c"], "labels": [0] * images,
                                                              "files": ["bench"]})
        rows["write_s"].append(time.perf_counter() - t0)
        rows["fill_s"].append(fill_time[0])
        rows["write_overhead_s"].append(rows["write_s"][-1] - fill_time[0])
        del entry
        for name in ("verify_warm_s", "verify_cold_s"):
            if name == "verify_cold_s":
                cold_ok &= _drop_from_page_cache(npy)
            t0 = time.perf_counter()
            hit = lookup_cache(folder, key, size, ["bench"], images)
            rows[name].append(time.perf_counter() - t0)
            assert hit is not None, "the entry just written did not verify"
            del hit
    res = {k: round(statistics.median(v), 4) for k, v in rows.items()}
    res["all_runs"] = {k: [round(x, 4) for x in v] for k, v in rows.items()}
    res["cold_page_cache_dropped"] = cold_ok
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=38_400)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the entry is written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the json here")
    a = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="cache_bench_", dir=a.dir)
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        res = {"images": a.images, "stored_size": a.size, "entry_mb": round(a.images * a.size * a.size * 3 / 1e6, 1),
               "repeat": a.repeat, **run(a.images, a.size, a.repeat, folder),
               "hashes_mb_per_s": hash_throughput(a.size),
               "machine": machine(), "load_avg_1_5_15_before": load_before,
               "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return emit(res, a.out)


if __name__ == "__main__":
    main()
