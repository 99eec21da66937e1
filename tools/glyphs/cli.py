"""The command line of the glyph dataset builder: ``python -m tools.glyphs {embedded,benchmark,baseline} ...``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import tools.glyphs
from tools.glyphs.baseline import EVAL_SEED, print_baseline
from tools.glyphs.fonts import DEFAULT_FONT_DIRS
from tools.glyphs.pack import benchmark_paths, build_benchmark, build_embedded, ensure_benchmark
from utils.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.glyphs {embedded,benchmark,baseline} ...``"""
    parser = argparse.ArgumentParser(prog="python -m tools.glyphs",
                                     description=tools.glyphs.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("embedded", "the small pack split by class (committed as data/glyphs100.npz)"),
                            ("benchmark", "the ~1,000-class pack split by script (<out>.npz + <out>.manifest.json)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="output path")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=int, default=32, help="image side in pixels")
        p.add_argument("--per-class", type=int, default=60 if name == "embedded" else 20,
                       help="images per class")
        p.add_argument("--font-dir", action="append", default=None,
                       help=f"font directory (repeatable; default {DEFAULT_FONT_DIRS[0]})")
        p.add_argument("--min-faces", type=int, default=16, help="skip scripts with fewer distinct faces")
        p.add_argument("--workers", type=int, default=None,
                       help="rendering processes (default: usable CPUs, at most 8); output does not depend on it")
        p.add_argument("--baseline", action="store_true", help="print the raw-pixel test baselines")
        p.add_argument("--eval_seed", "--eval-seed", dest="eval_seed", type=int, default=EVAL_SEED,
                       help="seed of the baseline's fixed test episodes (main.py --eval_seed; default 1)")
        if name == "embedded":
            p.add_argument("--classes", type=int, nargs=3, default=(64, 16, 20), metavar=("TRAIN", "VAL", "TEST"))
        else:
            p.add_argument("--ensure", action="store_true", help="only rebuild if missing or not matching")
    p = sub.add_parser("baseline", help="raw-pixel cosine nearest-centroid accuracy of a pack")
    p.add_argument("path")
    p.add_argument("--split", default="test")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--eval_seed", "--eval-seed", dest="eval_seed", type=int, default=EVAL_SEED,
                   help="seed of the fixed episodes, as main.py --eval_seed (default 1: the models' test episodes)")
    args = parser.parse_args(argv)

    if args.command == "baseline":
        print_baseline(args.path, args.split, args.episodes, args.eval_seed)
        return 0
    font_dirs = tuple(args.font_dir) if args.font_dir else DEFAULT_FONT_DIRS
    if args.command == "embedded":
        build_embedded(args.out, seed=args.seed, n_classes=sum(args.classes), split_sizes=args.classes,
                       per_class=args.per_class, size=args.size, font_dirs=font_dirs, min_faces=args.min_faces,
                       workers=args.workers)
        path = args.out
    else:
        if args.ensure:
            path = ensure_benchmark(args.out, seed=args.seed, per_class=args.per_class, size=args.size,
                                    font_dirs=font_dirs, min_faces=args.min_faces, workers=args.workers)
        else:
            build_benchmark(args.out, seed=args.seed, per_class=args.per_class, size=args.size,
                            font_dirs=font_dirs, min_faces=args.min_faces, workers=args.workers)
            path = benchmark_paths(args.out)[0]
    if args.baseline:
        print_baseline(path, "test", 600, args.eval_seed)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with one-line errors (exit code 2) instead of tracebacks for expected failures."""
    try:
        return main(argv)
    except (RuntimeError, ValueError, OSError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

