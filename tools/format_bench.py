"""Streaming conversion benchmark of the tieredImageNet readers (issue 11): images/s and peak memory.

    python -m tools.format_bench [--images 100000] [--variant png|npz] [--size 84] [--classes 100] [--keep DIR]

Generates a tieredImageNet-format source of ``--images`` images in a temporary folder (``train_labels.pkl`` plus
``train_images_png.pkl``, a Python-2-style pickled list of PNG-encoded 84 x 84 images, or ``train_images.npz``),
then converts it into the decoded-image cache in a fresh subprocess through ``load_split`` (the path a run takes)
while a thread samples that process's memory every 10 ms from ``/proc/self/status``:

* ``RssAnon``: the process's anonymous memory (heap, arrays, pickle state); the output array is a file-backed
  memmap in the cache and is not part of it. ``peak_anon_beyond_start_mb`` = its peak minus its value just before
  the conversion: the memory the conversion needs beyond the output array (the issue's bound: < 2 GB);
* ``VmHWM``: the peak resident set, output pages included; ``peak_rss_minus_output_mb`` subtracts the output
  array's size.

Source images are 1,000 distinct 8 x 8 random colour blocks scaled up (nearest) to 84 x 84, repeated, so each
PNG is small and the source stays small on disk (real tieredImageNet PNGs are larger photos, so images/s here is
an upper bound for the decoding part). The temporary folder (source and cache) is deleted afterwards unless ``--keep``. Prints one json
line and writes it to ``--out`` when given.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 11, axis=0), 11, axis=1)[:84, :84]


def generate(root: str, n: int, classes: int, variant: str) -> None:
    """A tieredImageNet ``train`` split of ``n`` images (``classes`` classes, class of image i = i % classes)."""
    from PIL import Image

    sys.path.insert(0, ROOT)
    from tests.helpers import py2_pickle_dumps
    os.makedirs(root, exist_ok=True)
    labels = np.arange(n, dtype=np.int64) % classes
    with open(os.path.join(root, "train_labels.pkl"), "wb") as f:
        f.write(py2_pickle_dumps({"label_specific": labels,
                                  "label_specific_str": [f"n{c:08d}" for c in range(classes)]}))
    if variant == "png":  # 1,000 distinct PNGs, repeated as separate arrays (each its own object, as in the file)
        pngs = []
        for i in range(min(n, 1000)):
            buf = io.BytesIO()
            Image.fromarray(_image(i)).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        items = [np.frombuffer(pngs[i % len(pngs)], dtype=np.uint8).copy() for i in range(n)]
        with open(os.path.join(root, "train_images_png.pkl"), "wb") as f:
            f.write(py2_pickle_dumps(items))
    else:  # streamed into a deflated npz, never the whole array in memory
        with zipfile.ZipFile(os.path.join(root, "train_images.npz"), "w", zipfile.ZIP_DEFLATED) as z:
            with z.open("images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": (n, 84, 84, 3)})
                block = np.stack([_image(i) for i in range(1000)])
                for s in range(0, n, 1000):
                    f.write(block[: min(1000, n - s)].tobytes())


def convert(root: str, cache: str, size: int) -> dict:
    """Runs in the measured subprocess: one ``load_split`` of the train split into ``cache``."""
    sys.path.insert(0, ROOT)
    from data_generator.dataset_loader import load_split, split_spec
    peak = {"anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            time.sleep(0.01)

    spec = split_spec(root, "train", "tieredImageNet")
    start_anon = _status_kb("RssAnon")
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    s = load_split(spec, size, cache)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
    out_mb = s.images.nbytes / 2 ** 20
    hwm = _status_kb("VmHWM") / 1024
    return {"images": len(s), "classes": s.num_classes, "stored_size": size, "seconds": round(wall, 2),
            "images_per_s": round(len(s) / wall, 1), "output_array_mb": round(out_mb, 1),
            "start_anon_mb": round(start_anon / 1024, 1), "peak_anon_mb": round(peak["anon"] / 1024, 1),
            "peak_anon_beyond_start_mb": round((peak["anon"] - start_anon) / 1024, 1),
            "peak_rss_mb": round(hwm, 1), "peak_rss_minus_output_mb": round(hwm - out_mb, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--variant", choices=["png", "npz"], default="png")
    p.add_argument("--size", type=int, default=84, help="stored size (84: paper/TF; 92: pytorch, resized)")
    p.add_argument("--keep", default=None, help="keep the source and cache in this folder")
    p.add_argument("--out", default=None, help="also write the json here")
    p.add_argument("--_convert", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._convert:
        res = convert(a._convert[0], a._convert[1], a.size)
        print(json.dumps(res))
        return res
    work = a.keep or tempfile.mkdtemp(prefix="format_bench_")
    try:
        src = os.path.join(work, "tiered")
        t0 = time.perf_counter()
        generate(src, a.images, a.classes, a.variant)
        gen_s = time.perf_counter() - t0
        src_mb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 2 ** 20
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cp = subprocess.run([sys.executable, "-m", "tools.format_bench", "--size", str(a.size), "--_convert", src,
                             os.path.join(work, "cache")], cwd=ROOT, env=env, capture_output=True, text=True)
        if cp.returncode != 0:
            sys.stderr.write(cp.stderr)
            raise SystemExit(cp.returncode)
        res = json.loads(cp.stdout.strip().splitlines()[-1])
        res.update({"variant": a.variant, "source_mb_on_disk": round(src_mb, 1), "generate_s": round(gen_s, 1)})
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return emit(res, a.out)


def emit(res: dict, out: str | None) -> dict:
    """Print ``res`` as one JSON line and, with ``out``, write that line to the file; returns ``res``."""
    line = json.dumps(res)
    print(line)
    if out:
        with open(out, "w") as fh:
            fh.write(line + "\n")
    return res


if __name__ == "__main__":
    main()
