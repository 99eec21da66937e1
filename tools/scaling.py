"""Scaling benchmark (issue 13): throughput of 1 vs N processes, the same runs launched by ``main.py`` and by
``torchrun --standalone --nproc_per_node=N main.py`` (CPU: gloo; ``--device cuda``: NCCL, one GPU per process).

    python -m tools.scaling --out logs/scaling                 # 1 vs 2 processes on the CPU, ~2 min on 2 idle cores
    python -m tools.scaling --out logs/scaling --nproc 1 2 4 --device cuda --epochs 3

Each configuration runs pre-train (``--pre_batch_size`` per process: the global batch grows with N, as in a real
scale-out run) and meta-train (``--meta_batch_size`` tasks split across the processes) on the embedded glyph pack
(``data/glyphs100.npz``, conv4 at 32 px). The throughput is taken from ``trlog.json`` (``train_time`` of the epochs
after the first, so start-up, data loading and the first-epoch warm-up are left out): pre-train images/s, meta-train
tasks/s. Writes ``scaling.json`` (every number, the commands, ``os.getloadavg()`` before and after) and
``scaling.md`` (the table, also printed). One thread per process (``OMP_NUM_THREADS=1``): N processes use N cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher(n: int) -> list[str]:
    if n == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def flags(phase: str, log_root: str, device: str, epochs: int, tiny: bool) -> list[str]:
    f = ["--phase", phase, "--dataset", "glyphs", "--dataset_dir", os.path.join(ROOT, "data", "glyphs100.npz"),
         "--backbone", "conv4", "--image_size", "32", "--preprocess", "paper", "--seed", "1", "--quiet",
         "--device", device, "--cache_dir", "none", "--log_root", log_root, "--num_val_episodes", "20",
         "--pre_val_update_step", "5", "--update_step", "5", "--overwrite"]
    if phase == "pre_train":
        f += ["--pre_max_epoch", str(epochs), "--pre_batch_size", "64", "--pre_optimizer", "adam", "--pre_lr", "0.001",
              "--pre_head", "linear", "--pre_augment", "off", "--pre_iters_per_epoch", "4" if tiny else "20"]
    else:
        f += ["--max_epoch", str(epochs), "--num_batch", "2" if tiny else "10", "--meta_batch_size", "8",
              "--init_weights", "scratch", "--train_query", "5"]
    return f


def measure(phase: str, n: int, out: str, device: str, epochs: int, tiny: bool) -> dict:
    root = os.path.join(out, f"{phase}_{n}")
    shutil.rmtree(root, ignore_errors=True)
    cmd = launcher(n) + [os.path.join(ROOT, "main.py")] + flags(phase, root, device, epochs, tiny)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        said = [ln for ln in lines if ln.startswith("error:") or "Error" in ln] or lines[-3:]
        with open(os.path.join(out, f"{phase}_{n}.stderr.txt"), "w") as f:
            f.write(p.stderr)
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}): {' | '.join(said[:3])} "
                         f"(stderr in {out}/{phase}_{n}.stderr.txt)")
    sub = "pre/glyphs_conv4" if phase == "pre_train" else "meta/glyphs_conv4_5way1shot_exp1"
    log = json.load(open(os.path.join(root, sub, "trlog.json")))
    timed = log[1:] or log
    seconds = sum(r["train_time"] for r in timed)
    if phase == "pre_train":
        per_epoch = (4 if tiny else 20) * 64 * n  # iterations x global batch
        unit = "images/s"
    else:
        per_epoch = (2 if tiny else 10) * 8        # meta-batches x tasks
        unit = "tasks/s"
    shown = ["torchrun"] + cmd[3:] if n > 1 else ["python"] + cmd[1:]
    return {"phase": phase, "processes": n, "rate": per_epoch * len(timed) / seconds, "unit": unit,
            "timed_epochs": len(timed), "train_seconds": seconds, "wall_seconds": wall,
            "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in shown)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="logs/scaling")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the test)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    load0 = os.getloadavg()
    rows = [measure(ph, n, a.out, a.device, a.epochs, a.tiny) for ph in ("pre_train", "meta_train") for n in a.nproc]
    base = {r["phase"]: r["rate"] for r in rows if r["processes"] == a.nproc[0]}
    for r in rows:
        r["speedup"] = r["rate"] / base[r["phase"]]
    res = {"rows": rows, "device": a.device, "machine": platform.platform(), "cpus": os.cpu_count(),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "settings": vars(a)}
    md = ["| phase | processes | throughput | speed-up |", "|---|---|---|---|"]
    md += [f"| {r['phase']} | {r['processes']} | {r['rate']:.1f} {r['unit']} | {r['speedup']:.2f}x |" for r in rows]
    md += ["", "commands:"] + [f"    {r['command']}" for r in rows]
    md.append(f"\nload average {load0[0]:.1f} at the start, {res['loadavg_end'][0]:.1f} at the end "
              f"({os.cpu_count()} CPUs)")
    with open(os.path.join(a.out, "scaling.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "scaling.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
