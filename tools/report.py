"""The ablation report (issue #6): one table and one plot from the files the ablation's runs wrote.

    python -m tools.report --log_root logs/ablation --dataset glyphs --backbone conv4 --out docs/results

Reads, for each shot, the ``results*.json`` that ``main.py --phase meta_eval`` wrote for the five rows of the
ablation (``python run_experiment.py ABLATION``) and the ``trlog.json`` / ``args.json`` of the meta-trained
rows, then

* checks that every row was tested on the same fixed episodes (way, shot, queries, eval seed, episode count);
* writes ``<out>/ablation.json`` (every number of the table, the validation curves, the files they came from);
* draws ``<out>/meta_val_curves.png``: meta-validation accuracy vs. meta-train iteration (epoch x num_batch),
  one panel per shot, one line (and its 95% band) for each of rows 3 and 4 (matplotlib, Agg backend);
* prints the markdown table (also returned by :func:`markdown_table`).

Rows whose files are missing (e.g. row 5 skipped) are reported as "not run". ``<log_root>/ablation_timing.json``
(written by ``run_experiment.py ABLATION``: wall time per step) is copied into ``ablation.json`` when present.
The layout of the files is the one ``main.py`` writes (``config.settings.RunPaths``,
``trainer/meta.py meta_eval``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Sequence

from config.settings import RunPaths
from utils.misc import write_json_atomic

# (id, name in the table, kind) in table order. kind: "pre" = a pre-train checkpoint tested without
# meta-training (classifier in the results file name), "meta" = a meta-trained run (results.json + trlog.json).
ROWS = (
    ("ft", "1. FT: pre-trained backbone + fine-tuned linear head (no meta-training)", "pre"),
    ("centroid", "2. Pre-trained backbone + nearest class mean (ProtoNet-style)", "pre"),
    ("mtl", "3. MTL (SS meta-training, first order)", "meta"),
    ("mtl_ht", "4. MTL + HT meta-batch", "meta"),
    ("scratch", "5. MTL (SS) on a backbone trained from scratch (no pre-training)", "meta"),
)
CURVE_ROWS = ("mtl", "mtl_ht")  # rows drawn in the plot (row 5's curve, far below, is in ablation.json only)
# keys that must be equal across all results files of one shot: otherwise the rows saw different episodes
SAME_EPISODES = ("way", "shot", "query", "eval_seed", "episodes")


def row_files(log_root: str, dataset: str, backbone: str, way: int, shot: int, label: str = "ss",
              scratch_label: str = "scratch", pre_label: str = "") -> dict[str, dict[str, str | None]]:
    """Where ``main.py`` writes each row's results for one shot.

    Returns:
        ``{row id: {"results": results JSON path, "log_dir": meta log folder or None}}``.
    """
    run = RunPaths(log_root, dataset, backbone, way, shot, pre_label)
    pre = run.pre_dir
    dirs = {"mtl": replace(run, meta_label=label).meta_dir,
            "mtl_ht": replace(run, meta_label=label, hard_task=True).meta_dir,
            "scratch": replace(run, meta_label=scratch_label).meta_dir}
    out: dict[str, dict[str, str | None]] = {
        "ft": {"results": os.path.join(pre, f"results_pretrained_{way}way{shot}shot.json"), "log_dir": None},
        "centroid": {"results": os.path.join(pre, f"results_pretrained_centroid_{way}way{shot}shot.json"),
                     "log_dir": None},
    }
    for rid, d in dirs.items():
        out[rid] = {"results": os.path.join(d, "results.json"), "log_dir": d}
    return out


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def val_curve(log_dir: str) -> dict | None:
    """The meta-validation curve of a meta-train run: iteration = epoch x num_batch (from ``args.json``).

    Returns:
        ``{"iteration": [...], "val_acc": [...] (%), "val_ci95": [...] (%), "best_epoch", "best_iteration",
        "num_batch", "train_s"}`` or None when the run has no ``trlog.json``.
    """
    trlog_path = os.path.join(log_dir, "trlog.json")
    if not os.path.isfile(trlog_path):
        return None
    trlog = _load(trlog_path)
    args_path = os.path.join(log_dir, "args.json")
    num_batch = int(_load(args_path)["num_batch"]) if os.path.isfile(args_path) else 1
    best = max(trlog, key=lambda r: r["val_acc"]) if trlog else None
    return {"iteration": [int(r["epoch"]) * num_batch for r in trlog],
            "val_acc": [round(100 * r["val_acc"], 4) for r in trlog],
            "val_ci95": [round(100 * r.get("val_ci95", 0.0), 4) for r in trlog],
            "best_epoch": best["epoch"] if best else None,
            "best_iteration": best["epoch"] * num_batch if best else None,
            "num_batch": num_batch,
            "train_s": round(sum(r.get("train_time", 0.0) + r.get("val_time", 0.0) for r in trlog), 1)}


def collect(log_root: str, dataset: str, backbone: str, way: int = 5, shots: Sequence[int] = (1, 5),
            label: str = "ss", scratch_label: str = "scratch", pre_label: str = "") -> dict:
    """Every row's test result and (meta rows) validation curve, per shot; checks the episodes match.

    Raises:
        ValueError: two rows of one shot were tested on different episodes (``SAME_EPISODES`` differ).
    """
    rows = []
    for rid, name, kind in ROWS:
        rows.append({"id": rid, "name": name, "kind": kind, "shots": {}, "val_curve": {}})
    episodes = {}
    for shot in shots:
        files = row_files(log_root, dataset, backbone, way, shot, label, scratch_label, pre_label)
        ref = None
        for row in rows:
            f = files[row["id"]]
            if os.path.isfile(f["results"]):
                r = _load(f["results"])
                key = {k: r.get(k) for k in SAME_EPISODES}
                if ref is None:
                    ref = (row["id"], key)
                elif key != ref[1]:
                    raise ValueError(f"{shot}-shot rows {ref[0]!r} and {row['id']!r} were tested on different "
                                     f"episodes: {ref[1]} vs {key} ({f['results']})")
                row["shots"][str(shot)] = {"mean": r["mean"], "ci95": r["ci95"], "episodes": r["episodes"],
                                           "inner_steps": r.get("inner_steps"), "base_lr": r.get("base_lr"),
                                           "classifier": r.get("classifier"), "checkpoint": r.get("checkpoint"),
                                           "results_file": f["results"]}
            if f["log_dir"]:
                curve = val_curve(f["log_dir"])
                if curve is not None:
                    row["val_curve"][str(shot)] = curve
        if ref is not None:
            episodes[str(shot)] = ref[1]
    return {"log_root": log_root, "dataset": dataset, "backbone": backbone, "way": way,
            "shots": [int(s) for s in shots], "episodes": episodes, "rows": rows}


def _cell(row: dict, shot: int) -> str:
    r = row["shots"].get(str(shot))
    return f"{r['mean']:.2f} ± {r['ci95']:.2f}" if r else "not run"


def _val_cell(row: dict, shot: int) -> str:
    c = row["val_curve"].get(str(shot))
    if not c or not c["val_acc"]:
        return "–"
    i = c["val_acc"].index(max(c["val_acc"]))
    return f"{c['val_acc'][i]:.2f} @ {c['iteration'][i]}"


def markdown_table(summary: dict) -> str:
    """The results table: test accuracy (%) mean ± 95% interval per shot, and for meta-trained rows the best
    meta-validation accuracy and the iteration whose checkpoint was tested."""
    shots = summary["shots"]
    head = ["method"] + [f"{summary['way']}-way {s}-shot test (%)" for s in shots] + \
        [f"{s}-shot best val (%) @ iteration" for s in shots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        lines.append("| " + " | ".join([row["name"]] + [_cell(row, s) for s in shots] +
                                       [_val_cell(row, s) for s in shots]) + " |")
    notes = []
    for s in shots:
        e = summary["episodes"].get(str(s))
        if e:
            notes.append(f"{s}-shot: {e['episodes']} fixed test episodes (eval seed {e['eval_seed']}, "
                         f"{e['query']} queries per class), the same for every row")
    if notes:
        lines.append("")
        lines.append("Mean ± 95% confidence interval (1.96 x std / sqrt(episodes)). " + "; ".join(notes) + ".")
    return "\n".join(lines)


def plot_curves(summary: dict, path: str) -> str | None:
    """Meta-validation accuracy vs. meta-train iteration, one panel per shot; returns ``path`` (None when no
    meta-trained row has a curve)."""
    if not any(row["val_curve"] for row in summary["rows"] if row["id"] in CURVE_ROWS):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"mtl": ("tab:blue", "o", "-"), "mtl_ht": ("tab:red", "s", "-"), "scratch": ("tab:gray", "^", "--")}
    label = {"mtl": "3. MTL (SS)", "mtl_ht": "4. MTL + HT", "scratch": "5. MTL, no pre-training"}
    shots = summary["shots"]
    fig, axes = plt.subplots(1, len(shots), figsize=(5.2 * len(shots), 4.0), squeeze=False)
    for ax, shot in zip(axes[0], shots):
        for row in summary["rows"]:
            c = row["val_curve"].get(str(shot))
            if row["id"] not in CURVE_ROWS or not c:
                continue
            color, marker, ls = style[row["id"]]
            ax.plot(c["iteration"], c["val_acc"], color=color, marker=marker, ls=ls, ms=3.5, lw=1.5,
                    label=f"{label[row['id']]}, {shot}-shot")
            lo = [m - h for m, h in zip(c["val_acc"], c["val_ci95"])]
            hi = [m + h for m, h in zip(c["val_acc"], c["val_ci95"])]
            ax.fill_between(c["iteration"], lo, hi, color=color, alpha=0.12, lw=0)
        ax.set_title(f"{summary['way']}-way {shot}-shot meta-validation (band: 95% interval)", fontsize=10)
        ax.set_xlabel("meta-train iteration (epoch x num_batch)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict, out_dir: str) -> dict:
    """Write ``ablation.json`` and ``meta_val_curves.png`` under ``out_dir``; returns the summary with the
    written paths."""
    os.makedirs(out_dir, exist_ok=True)
    png = plot_curves(summary, os.path.join(out_dir, "meta_val_curves.png"))
    summary = {**summary, "plot": png, "table_markdown": markdown_table(summary)}
    write_json_atomic(os.path.join(out_dir, "ablation.json"), summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n")[0])
    p.add_argument("--log_root", required=True, help="the ablation's --log_root")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--label", default="ss", help="--meta_label of rows 3 and 4")
    p.add_argument("--scratch_label", default="scratch", help="--meta_label of row 5")
    p.add_argument("--pre_label", default="")
    p.add_argument("--out", default="docs/results", help="folder for ablation.json and meta_val_curves.png")
    a = p.parse_args(argv)
    try:
        summary = collect(a.log_root, a.dataset, a.backbone, a.way, a.shots, a.label, a.scratch_label, a.pre_label)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not any(row["shots"] for row in summary["rows"]):
        print(f"error: no results files under {a.log_root} (run python run_experiment.py ABLATION first)",
              file=sys.stderr)
        return 2
    timing = os.path.join(a.log_root, "ablation_timing.json")  # written by run_experiment.py ABLATION
    if os.path.isfile(timing):
        summary["timing"] = _load(timing)
    summary = write_report(summary, a.out)
    print(summary["table_markdown"])
    print(f"\nwritten: {os.path.join(a.out, 'ablation.json')}" + (f", {summary['plot']}" if summary["plot"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
