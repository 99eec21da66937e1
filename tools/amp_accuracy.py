"""The accuracy cost of ``--amp``, measured (issue #16): one checkpoint meta-tested in float32 and in bfloat16 on
the same fixed episodes, compared episode by episode.

    python -m tools.amp_accuracy --out logs/amp/demo_1shot.json -- <main.py meta_eval flags>

The ``main.py`` flags after ``--`` are the ones of the meta-test (``--phase meta_eval`` is implied; ``--eval_weights``
or the run folder picks the checkpoint, ``--meta_test_dir`` / ``--dataset_dir`` the test split,
``--num_test_episodes`` the episodes). The split is encoded twice, with ``--amp`` off and with
``--amp --amp_dtype bfloat16`` (bfloat16 forced, so on a CPU without native bfloat16 it is emulated: the numbers
are the same as with native support, only slower); both passes then run the same evaluation
on the same episodes (the feature bank, ``--eval_mode bank``: each image encoded once, :func:`models.evaluate.encode_split`
and :func:`models.evaluate.evaluate_bank`, as ``main.py --phase meta_eval``). Printed and written to ``--out``: each precision's mean
± 95% interval, the paired per-episode difference (bf16 - fp32, points) with its 95% interval
(``1.96 * std / sqrt(E)`` of the differences), how many episodes scored the same, the features' largest relative
difference ``max |f_bf16 - f_fp32| / max |f_fp32|``, and each pass's encode and evaluate seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

from config.options import parse_args
from config.settings import Settings, model_flags_from_checkpoint
from data_generator.dataset_loader import check_episode_fit
from data_generator.meta_data_generator import fixed_episodes
from models.evaluate import encode_split, evaluate_bank
from models.heads import make_head
from models.loading import load
from trainer.base import DataBundle
from utils.gpu_tools import pick_device
from utils.misc import mean_ci, write_json_atomic

PRECISIONS = {"fp32": "off", "bf16": "bfloat16"}  # name -> utils.gpu_tools.amp_mode


def paired(acc_fp32: np.ndarray, acc_bf16: np.ndarray) -> dict[str, Any]:
    """The paired comparison of two ``(E,)`` per-episode accuracies in [0, 1] on the same episodes, in points:
    ``diff_mean`` (bf16 - fp32) with its 95% half-width ``diff_ci95``, and ``episodes_equal``."""
    a, b = np.asarray(acc_fp32, np.float64), np.asarray(acc_bf16, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired accuracies need the same (E,) shape, got {a.shape} and {b.shape}")
    mean, ci = mean_ci(100 * (b - a))
    return {"diff_mean": mean, "diff_ci95": ci, "episodes": int(a.size), "episodes_equal": int((a == b).sum())}


def measure(main_argv: Sequence[str], device_name: str = "cpu") -> dict[str, Any]:
    """Meta-test one checkpoint in fp32 and bf16 on the same episodes (see the module docstring)."""
    args = parse_args(["--phase", "meta_eval", *main_argv])
    for line in model_flags_from_checkpoint(args):  # the model flags left out come from the checkpoint, as main.py
        print(line, flush=True)
    settings = Settings.from_args(args)
    device = pick_device(device_name)
    ev, path = settings.test, settings.eval_checkpoint
    data = DataBundle(settings.data)
    test_set = data.load("test")
    check_episode_fit(test_set, ev.way, ev.shot + ev.query, "meta-test")
    model = load(path, device, settings.model.expect())
    encoder, kind = model.encoder, model.kind
    head = make_head(ev.classifier, ev.way, model.head_init(ev.way, ev.seed), ev.inner, order="first")
    episodes = fixed_episodes(test_set.labels, ev.episodes, ev.way, ev.shot, ev.query, ev.seed)
    out: dict[str, Any] = {"checkpoint": path, "kind": kind, "test_images": int(len(test_set.labels)),
                           "way": ev.way, "shot": ev.shot, "query": ev.query, "inner_steps": ev.inner.steps,
                           "eval_mode": ev.mode, "classifier": ev.classifier, "device": str(device),
                           "threads": torch.get_num_threads(), "argv": list(main_argv)}
    accs, feats = {}, {}
    for name, mode in PRECISIONS.items():
        t0 = time.perf_counter()
        feats[name] = encode_split(encoder, test_set, data.eval_transform, device, ev.batch_size, mode)
        flipped = encode_split(encoder, test_set, data.eval_transform, device, ev.batch_size, mode,
                               flipped=True) if ev.flip_support else None  # (--test_flip_support: as meta_eval)
        t1 = time.perf_counter()
        accs[name] = evaluate_bank(feats[name], episodes, head, ev, flipped_features=flipped)
        mean, ci = mean_ci(accs[name])
        out[name] = {"mean": 100 * mean, "ci95": 100 * ci, "encode_seconds": t1 - t0,
                     "evaluate_seconds": time.perf_counter() - t1}
    scale = feats["fp32"].abs().max().clamp_min(1e-30)
    out["feature_max_rel_diff"] = float((feats["bf16"] - feats["fp32"]).abs().max() / scale)
    out["paired"] = paired(accs["fp32"], accs["bf16"])
    return out


def report(r: dict[str, Any]) -> str:
    p = r["paired"]
    return (f"{r['way']}-way {r['shot']}-shot, {p['episodes']} episodes of {r['checkpoint']}:\n"
            + "".join(f"  {n} {r[n]['mean']:.2f} ± {r[n]['ci95']:.2f} %  (encode {r[n]['encode_seconds']:.1f} s, "
                      f"evaluate {r[n]['evaluate_seconds']:.1f} s)\n" for n in PRECISIONS)
            + f"  paired bf16 - fp32: {p['diff_mean']:+.3f} ± {p['diff_ci95']:.3f} points; "
            f"{p['episodes_equal']}/{p['episodes']} episodes equal; "
            f"features' max relative difference {r['feature_max_rel_diff']:.2e}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, main_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m tools.amp_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    opts = p.parse_args(own)
    r = measure(main_argv, opts.device)
    print(report(r), flush=True)
    if opts.out:
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        write_json_atomic(opts.out, r)
        print(f"written to {opts.out}", flush=True)
    return r


if __name__ == "__main__":
    main()
