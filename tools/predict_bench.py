"""``--phase predict`` on files: example folders from the embedded glyph pack, and the speed benchmark.

    python -m tools.predict_bench folders --out /tmp/glyph_folders     # support/ and query/ (mixed sizes and modes)
    python -m tools.predict_bench bench                                 # 1,000 queries, ResNet-12 at 84 px, median of 3

``folders`` writes classes of ``data/glyphs100.npz`` as PNG files of mixed sizes and Pillow modes (L, RGB, P, RGBA,
16-bit grey; square and not), ``<out>/support/<class>/<i>.png`` and ``<out>/query/<class>/<i>.png`` (``--flat``:
``<out>/query/<i>.png``), the input a user of ``--phase predict`` has. The tests make their folders with
:func:`write_glyph_folders` too.

``bench`` times the whole command (``main.cli`` in this process: decoding every file, the batched encoder, the head,
the three output files) on ``--queries`` images of ``--size`` px (random colour patterns, saved as PNG once) with a
``--backbone`` meta checkpoint of random weights (speed does not depend on them), ``--repeats`` times, and prints one
json line (``tools.format_bench.emit``): images/s of each run and their median, the encode-only rate, the machine and its
load average before and after (the machine is shared: compare runs only at a similar load).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

MODES = ("L", "RGB", "P", "RGBA", "I;16")
SIZES = ((32, 32), (24, 24), (40, 28), (50, 50), (21, 34))


def _save(img: np.ndarray, path: str, mode: str, size: tuple[int, int]) -> None:
    """A grey uint8 (h, w) glyph as a PNG of ``mode`` at ``size`` (w, h)."""
    im = Image.fromarray(img, mode="L").resize(size, Image.BILINEAR)
    if mode == "RGB":
        im = im.convert("RGB")
    elif mode == "P":
        im = im.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=64)
    elif mode == "RGBA":
        im = im.convert("RGBA")
    elif mode == "I;16":
        im = Image.fromarray(np.asarray(im, dtype=np.uint16) * 257)  # 16-bit grey, 255 -> 65535
    im.save(path)


def write_glyph_folders(out: str, classes: int | list[str] = 5, shot: int = 2, query: int = 3,
                        pack: str = "data/glyphs100.npz", split: str = "test", labelled: bool = True,
                        first: int = 0) -> dict:
    """Write support and query folders of glyph classes.

    Args:
        out: the folder that gets ``support/`` and ``query/``.
        classes: how many classes (the first of the split's, from ``first``), or their names.
        shot, query: images per class in the support and in the query folder (images 0..shot-1 and shot..).
        labelled: ``query/<class>/<i>.png``; otherwise ``query/<class>_<i>.png`` (one flat folder).
    Returns:
        ``{"support": dir, "query": dir, "classes": [names], "support_files": {class: [paths]}, "query_files":
        {class: [paths]}}``; image ``i`` of a class is saved in mode ``MODES[i % 5]`` at ``SIZES[i % 5]``.
    """
    with np.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pack)
                 if not os.path.isabs(pack) and not os.path.exists(pack) else pack) as z:
        images, labels, names = z[f"{split}_images"], z[f"{split}_labels"], [str(c) for c in z[f"{split}_classes"]]
    chosen = classes if isinstance(classes, list) else names[first:first + classes]
    sup, qry = os.path.join(out, "support"), os.path.join(out, "query")
    files = {"support": sup, "query": qry, "classes": chosen, "support_files": {}, "query_files": {}}
    for name in chosen:
        idx = np.flatnonzero(labels == names.index(name))
        if len(idx) < shot + query:
            raise ValueError(f"class {name} has {len(idx)} images, fewer than {shot} + {query}")
        os.makedirs(os.path.join(sup, name), exist_ok=True)
        qdir = os.path.join(qry, name) if labelled else qry
        os.makedirs(qdir, exist_ok=True)
        files["support_files"][name], files["query_files"][name] = [], []
        for i, j in enumerate(idx[:shot + query]):
            img = images[j] if images[j].ndim == 2 else images[j].mean(-1).astype(np.uint8)
            if i < shot:
                path = os.path.join(sup, name, f"{i:03d}.png")
                files["support_files"][name].append(path)
            else:
                path = os.path.join(qdir, f"{i - shot:03d}.png" if labelled else f"{name}_{i - shot:03d}.png")
                files["query_files"][name].append(path)
            _save(img, path, MODES[i % len(MODES)], SIZES[i % len(SIZES)])
    return files


# ----------------------------------------------------------------------------------------------------- the benchmark
def _random_meta_checkpoint(path: str, backbone: str, image_size: int, way: int = 5) -> None:
    """A meta checkpoint of ``backbone`` with random weights, written as the trainer writes one (with its spec)."""
    import torch

    from models.mtl import MetaLearner
    from utils.checkpoint import FORMAT
    from utils.misc import atomic_write
    torch.manual_seed(0)
    m = MetaLearner(backbone, way=way)
    spec = {**m.spec.to_dict(), "image_size": image_size, "preprocess": "paper"}
    ck = {"format": FORMAT, "kind": "meta", "encoder": m.encoder.state_dict(), "base_learner": m.base_learner.state_dict(),
          "spec": spec}
    atomic_write(path, lambda f: torch.save(ck, f), binary=True)


def bench(args: argparse.Namespace) -> dict:
    import torch

    import main
    from models.loading import load
    from models.predict import FewShotPredictor
    from tools.benchmark import machine_info
    from tools.format_bench import emit
    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="predict_bench_")
    ck = os.path.join(work, f"meta_{args.backbone}.pth")
    if not os.path.exists(ck):
        _random_meta_checkpoint(ck, args.backbone, args.size)
    rng = np.random.default_rng(0)
    sup, qry = os.path.join(work, "support"), os.path.join(work, "query")
    if not os.path.isdir(qry):
        for c in range(5):
            os.makedirs(os.path.join(sup, f"class{c}"), exist_ok=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(
                    os.path.join(sup, f"class{c}", f"{i}.png"))
        os.makedirs(qry, exist_ok=True)
        for i in range(args.queries):
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(
                os.path.join(qry, f"{i:05d}.png"))
    argv = ["--phase", "predict", "--eval_weights", ck, "--support", sup, "--query", qry, "--out",
            os.path.join(work, "out"), "--device", "cpu", "--seed", "1", "--quiet", "--log_root",
            os.path.join(work, "logs"), "--eval_batch_size", str(args.batch_size)]
    load_start = os.getloadavg()
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rc = main.cli(argv)
        runs.append(time.perf_counter() - t0)
        if rc != 0:
            raise SystemExit(f"predict exited {rc}")
    model = load(ck)  # the encoder alone on the same decoded images, for the share of the command it takes
    p = FewShotPredictor(model, batch_size=args.batch_size)
    paths = sorted(os.path.join(qry, f) for f in os.listdir(qry))
    from models.predict import decode_images
    decoded = decode_images(paths, p.stored_size)
    from data_generator.image_cache import ImageSet
    t0 = time.perf_counter()
    p.encode_set(ImageSet(decoded, np.zeros(len(decoded), np.int64), ["?"], qry))
    encode_s = time.perf_counter() - t0
    rates = [args.queries / s for s in runs]
    result = {"bench": "predict", "backbone": args.backbone, "image_px": args.size, "queries": args.queries,
              "support": "5 classes x 5", "batch_size": args.batch_size, "threads": args.threads,
              "images_per_s": [round(r, 2) for r in rates], "images_per_s_median": round(statistics.median(rates), 2),
              "seconds": [round(s, 2) for s in runs], "encode_only_images_per_s": round(args.queries / encode_s, 2),
              "command": "python -m tools.predict_bench bench " + " ".join(sys.argv[2:]),
              "machine": machine_info(torch.device("cpu")), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    return emit(result, args.json)


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folders", help="write glyph support/query folders")
    f.add_argument("--out", required=True)
    f.add_argument("--classes", type=int, default=5)
    f.add_argument("--shot", type=int, default=2)
    f.add_argument("--query", type=int, default=3)
    f.add_argument("--flat", action="store_true", help="one query folder without class folders")
    b = sub.add_parser("bench", help="time --phase predict")
    b.add_argument("--queries", type=int, default=1000)
    b.add_argument("--size", type=int, default=84)
    b.add_argument("--backbone", default="resnet12")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--batch_size", type=int, default=256)
    b.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    b.add_argument("--json", default=None, help="also write the json line to this file")
    b.add_argument("--work", default=None, help="keep the images and checkpoint here (default a new temporary folder)")
    a = ap.parse_args(argv)
    if a.cmd == "folders":
        out = write_glyph_folders(a.out, a.classes, a.shot, a.query, labelled=not a.flat)
        print(f"wrote {out['support']} and {out['query']}: {len(out['classes'])} classes, {a.shot} support and "
              f"{a.query} query images each")
    else:
        bench(a)


if __name__ == "__main__":
    cli()
