"""Reports from the files runs wrote (issues #6 and 23): the run report, the seed summary, the ablation report.

    python -m tools.report RUN_DIR [RUN_DIR ...]                       # report.png + report.md in each run folder
    python -m tools.report --seeds RUN_DIR [RUN_DIR ...] --out DIR     # DIR/summary.json + summary.md
    python -m tools.report --log_root logs/ablation --dataset glyphs --backbone conv4 --out docs/results

**The run report** (:func:`plot_run`, and ``trainer/run_report.py`` for what it reads and for ``report.md``, which
every phase also writes at its end): of a pre-train or meta-train folder (or any folder holding ``results*.json``),
the training and validation curves (``trlog.json``), the test accuracy over episodes as a histogram with its mean and
95% interval and the hardest and easiest test classes by name (the per-episode and per-class accuracies ``meta_eval``
stores in ``results*.json``), and for a hard-task run how hard the hard tasks were (``hard_tasks.jsonl``). One panel
per part the folder has, two per row, 600 x 450 px each; ``report.md`` names the files it read and the panels.

**The seed summary** (:func:`seed_summary`; ``run_experiment.py`` with ``SEEDS`` of several seeds, mode ``SUMMARY``):
the same experiment under several ``--seed`` values, one run folder each, tested on the same fixed episodes: per
seed its mean and 95% interval, the mean over seeds and the sample standard deviation across seeds (``ddof = 1``:
the spread of what another seed would give; with one seed it is not defined).

**The ablation report** (issue #6): one table and one plot from the files the ablation's runs wrote.
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

A bad input is one ``error:`` line and exit 2 (docs/ERRORS.md E190-E192).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import replace
from typing import Sequence

import numpy as np

from config.settings import RunPaths
from trainer.run_report import REPORT_MD, REPORT_PNG, RESULTS_GLOB, collect_run, episode_histogram_bins, markdown
from utils.misc import WriteError, atomic_write, write_json_atomic

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


# ------------------------------------------------------------------------------------------------ the run report
PANEL_PX = (600, 450)  # one panel's width and height in pixels (dpi 100)


def run_panels(run: dict) -> list[str]:
    """The panels a run's files allow, in drawing order."""
    panels = []
    if run["curves"] and run["curves"]["epoch"]:
        panels.append("training")
    if any(t["episode_accs"] for t in run["tests"]):
        panels.append("test episodes")
    if any(t["classes"] for t in run["tests"]):
        panels.append("classes")
    if run["hard_tasks"] and run["hard_tasks"]["meta_batches"]:
        panels.append("hard tasks")
    return panels


def _draw_training(ax, c: dict) -> None:
    from matplotlib.ticker import MaxNLocator
    ep = np.asarray(c["epoch"])
    val = np.array([np.nan if v is None else v for v in c["val_acc"]])
    ci = np.array([0.0 if v is None else v for v in c["val_ci95"]])
    ax.plot(ep, val, "o-", color="tab:blue", ms=3.5, lw=1.5, label="validation")
    ax.fill_between(ep, val - ci, val + ci, color="tab:blue", alpha=0.15, lw=0)
    if any(v is not None for v in c["train_acc"]):
        ax.plot(ep, [np.nan if v is None else v for v in c["train_acc"]], "s-", color="tab:orange", ms=3, lw=1.2,
                label="training (batches)")
    if c["best_epoch"] is not None:
        ax.plot([c["best_epoch"]], [c["best_val_acc"]], "*", color="tab:red", ms=12, label="kept (best val)")
    ax.set_xlabel("epoch" + (f" ({c['num_batch']} iterations)" if c["num_batch"] else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    loss = [np.nan if v is None else v for v in c["train_loss"]]
    if not all(np.isnan(loss)):
        ax2 = ax.twinx()
        ax2.plot(ep, loss, "--", color="tab:gray", lw=1.2, label="training loss")
        ax2.set_ylabel("training loss", color="tab:gray")
        ax2.legend(fontsize=7, loc="lower right")
    ax.set_title("training and validation (band: 95% interval)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")


def _draw_test(ax, tests: list[dict]) -> None:
    drawn = [t for t in tests if t["episode_accs"]]
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for i, t in enumerate(drawn):
        color = colors[i % len(colors)]
        ax.hist(t["episode_accs"], bins=episode_histogram_bins(t), histtype="stepfilled" if len(drawn) == 1 else "step",
                color=color, alpha=0.6 if len(drawn) == 1 else 1.0, lw=1.5,
                label=f"{t['file']}: {t['mean']:.2f} ± {t['ci95']:.2f}")
        ax.axvline(t["mean"], color=color, lw=1.5)
        ax.axvspan(t["mean"] - t["ci95"], t["mean"] + t["ci95"], color=color, alpha=0.2, lw=0)
    t0 = drawn[0]
    ax.set_title(f"test: {t0['episodes']} fixed episodes, {t0['way']}-way {t0['shot']}-shot (line: mean, band: 95%)",
                 fontsize=10)
    ax.set_xlabel("episode accuracy (%)")
    ax.set_ylabel("episodes")
    ax.legend(fontsize=7, loc="upper left")


def _draw_classes(ax, t: dict, k: int) -> None:
    hard, easy = t["classes"][:k], t["classes"][-k:]
    rows = hard + easy
    y = np.arange(len(rows))
    ax.barh(y, [r["acc"] for r in rows], color=["tab:red"] * len(hard) + ["tab:green"] * len(easy))
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['name']} ({r['episodes']})" for r in rows], fontsize=7)
    if t["mean"] is not None:
        ax.axvline(t["mean"], color="black", lw=1, ls="--", label=f"mean {t['mean']:.2f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, 100)
    ax.set_xlabel("query accuracy of the class (%)")
    ax.set_title(f"hardest (red), easiest (green) of {len(t['classes'])} test classes (episodes in brackets)",
                 fontsize=10)


def _rolling(values: list, window: int) -> np.ndarray:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    out = np.full(len(v), np.nan)
    for i in range(len(v)):
        w = v[max(0, i - window + 1):i + 1]
        w = w[~np.isnan(w)]
        out[i] = w.mean() if w.size else np.nan
    return out


def _draw_hard_tasks(ax, h: dict, window: int) -> None:
    s = h["series"]
    it = np.asarray(s["iteration"])
    ax.plot(it, [np.nan if v is None else v for v in s["failure_acc"]], ".", color="tab:red", alpha=0.25, ms=3)
    for key, color, label in (("failure_acc", "tab:red", "failure classes (worst class of a normal task)"),
                              ("normal_acc", "tab:blue", "normal tasks"), ("hard_acc", "tab:purple", "hard tasks")):
        if any(v is not None for v in s[key]):
            ax.plot(it, _rolling(s[key], window), color=color, lw=1.8, label=label)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("meta-train iteration")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"how hard the hard tasks were (mean over {window} iterations)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def plot_run(run: dict, path: str) -> list[str]:
    """Draw ``report.png`` of a run (:func:`run_panels`: one panel per part, two per row, :data:`PANEL_PX` each);
    returns the panels drawn (none: no file)."""
    panels = run_panels(run)
    if not panels:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    w, h = PANEL_PX
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols / 100, h * nrows / 100), dpi=100, squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, panels):
        if panel == "training":
            _draw_training(ax, run["curves"])
        elif panel == "test episodes":
            _draw_test(ax, run["tests"])
        elif panel == "classes":
            t = next(t for t in run["tests"] if t["classes"])
            _draw_classes(ax, t, min(8, max(1, len(t["classes"]) // 2)))
        else:
            c = run["curves"]
            _draw_hard_tasks(ax, run["hard_tasks"], max(1, (c or {}).get("num_batch") or 10))
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.remove()
    fig.suptitle(run["run_dir"], fontsize=10)
    fig.tight_layout()
    write_png(fig, path)
    plt.close(fig)
    return panels


def write_png(fig, path: str) -> None:
    """``fig.savefig`` through :func:`utils.misc.atomic_write` (a failing write leaves the earlier picture)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)


def run_report(run_dir: str) -> dict:
    """``report.png`` and ``report.md`` of one run folder; returns the run with ``panels`` and the written paths."""
    run = collect_run(run_dir)
    png_path = os.path.join(run_dir, REPORT_PNG)
    run["panels"] = plot_run(run, png_path)
    text = markdown(run, REPORT_PNG if run["panels"] else None, f"python -m tools.report {run_dir}")
    md_path = os.path.join(run_dir, REPORT_MD)
    atomic_write(md_path, lambda f: f.write(text + "\n"))
    run["written"] = [md_path] + ([png_path] if run["panels"] else [])
    return run


# ------------------------------------------------------------------------------------------------ the seed summary
def seed_summary(run_dirs: Sequence[str]) -> dict:
    """One experiment under several seeds: the ``results*.json`` every run folder holds (by file name, i.e. by
    method), per seed its mean and 95% interval, the mean over seeds and the standard deviation across seeds.

    Raises:
        ValueError: a folder with no results file, no file common to all, or runs tested on different episodes.
    """
    per_dir = []
    for d in run_dirs:
        paths = sorted(glob.glob(os.path.join(d, RESULTS_GLOB)))
        if not paths:
            raise ValueError(f"{d} holds no {RESULTS_GLOB} (meta_eval writes results.json there: run the test of "
                             "that seed first, e.g. python run_experiment.py TEST)")
        per_dir.append({os.path.basename(p): _load(p) for p in paths})
    common = [f for f in per_dir[0] if all(f in r for r in per_dir[1:])]
    if not common:
        raise ValueError(f"the run folders hold no results file of the same name: {', '.join(run_dirs)}")
    results = {}
    for name in common:
        rows, ref = [], None
        for d, r in zip(run_dirs, per_dir):
            x = r[name]
            key = {k: x.get(k) for k in SAME_EPISODES}
            if ref is None:
                ref = key
            elif key != ref:
                raise ValueError(f"{os.path.join(d, name)} was tested on other episodes than "
                                 f"{os.path.join(run_dirs[0], name)}: {key} vs {ref}")
            rows.append({"run_dir": d, "seed": (x.get("settings") or {}).get("seed"), "mean": x["mean"],
                         "ci95": x["ci95"], "episodes": x["episodes"]})
        means = np.array([row["mean"] for row in rows], dtype=np.float64)
        results[name] = {"method": per_dir[0][name].get("method"), "per_seed": rows, "n_seeds": len(rows),
                         "mean": round(float(means.mean()), 4),
                         "std": round(float(means.std(ddof=1)), 4) if len(rows) > 1 else None,
                         "min": round(float(means.min()), 4), "max": round(float(means.max()), 4),
                         "episodes": ref}
    return {"run_dirs": list(run_dirs), "results": results,
            "std": "sample standard deviation across seeds (numpy std, ddof=1), in accuracy points",
            "interval": "per seed: 1.96 * population std / sqrt(episodes) over its test episodes (utils.misc.mean_ci)"}


def seed_table(summary: dict) -> str:
    """The markdown table of :func:`seed_summary`: one row per seed, then the mean and the std across seeds."""
    names = list(summary["results"])
    res = summary["results"]
    head = ["seed", "run folder"] + [f"{n} ({res[n]['method']}) test (%)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, d in enumerate(summary["run_dirs"]):
        row = [res[names[0]]["per_seed"][i]]
        cells = [f"{res[n]['per_seed'][i]['mean']:.2f} ± {res[n]['per_seed'][i]['ci95']:.2f}" for n in names]
        lines.append(f"| {row[0]['seed']} | `{d}` | " + " | ".join(cells) + " |")
    n = res[names[0]]["n_seeds"]
    lines.append(f"| mean over {n} seeds | | " + " | ".join(f"{res[k]['mean']:.2f}" for k in names) + " |")
    lines.append("| std across seeds | | " + " | ".join("–" if res[k]["std"] is None else f"{res[k]['std']:.2f}"
                                                    for k in names) + " |")
    e = res[names[0]]["episodes"]
    lines += ["", f"Each seed: mean ± 95% interval over its {e['episodes']} fixed test episodes (eval seed "
                  f"{e['eval_seed']}, {e['way']}-way {e['shot']}-shot, {e['query']} queries per class), the same "
                  "episodes for every seed; std: the sample standard deviation of the seeds' means (ddof = 1)."]
    return "\n".join(lines)


def write_seed_summary(run_dirs: Sequence[str], out: str) -> dict:
    """``<out>/summary.json`` and ``<out>/summary.md`` (:func:`seed_summary`, :func:`seed_table`)."""
    summary = seed_summary(run_dirs)
    table = seed_table(summary)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "summary.json"), {**summary, "table_markdown": table})
    atomic_write(os.path.join(out, "summary.md"), lambda f: f.write(table + "\n"))
    summary["table_markdown"] = table
    return summary


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run folders: report.png and report.md in each (with --seeds: the seed summary of them)")
    p.add_argument("--seeds", action="store_true",
                   help="the RUN_DIRs are one experiment under several seeds: write --out/summary.json, summary.md")
    p.add_argument("--log_root", help="the ablation's --log_root (the ablation report)")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--label", default="ss", help="--meta_label of rows 3 and 4")
    p.add_argument("--scratch_label", default="scratch", help="--meta_label of row 5")
    p.add_argument("--pre_label", default="")
    p.add_argument("--out", default=None,
                   help="ablation: folder for ablation.json and meta_val_curves.png (default docs/results); "
                        "--seeds: folder for summary.json and summary.md")
    a = p.parse_args(argv)
    if a.log_root is None and not a.run_dirs:
        return _error("name a run folder (python -m tools.report RUN_DIR), several with --seeds --out DIR, or "
                      "--log_root for the ablation report")
    if a.log_root is not None and (a.run_dirs or a.seeds):
        return _error("--log_root (the ablation report) takes no RUN_DIR or --seeds: give one of them")
    if a.log_root is None:
        missing = [d for d in a.run_dirs if not os.path.isdir(d)]
        if missing:
            return _error(f"run folder {missing[0]} does not exist (a RUN_DIR is a folder a phase wrote, e.g. "
                          "logs/meta/<run> or logs/pre/<run>)")
        try:
            if a.seeds:
                if a.out is None:
                    return _error("--seeds needs --out DIR, the folder for summary.json and summary.md")
                summary = write_seed_summary(a.run_dirs, a.out)
                print(summary["table_markdown"])
                print(f"\nwritten: {os.path.join(a.out, 'summary.json')}, {os.path.join(a.out, 'summary.md')}")
                return 0
            for d in a.run_dirs:
                run = run_report(d)
                print(f"{d}: read {', '.join(run['files'])}; wrote {', '.join(run['written'])}"
                      + (f" (panels: {', '.join(run['panels'])})" if run["panels"] else " (nothing to draw)"))
        except (ValueError, WriteError) as e:
            return _error(str(e))
        return 0
    out = a.out or "docs/results"
    try:
        summary = collect(a.log_root, a.dataset, a.backbone, a.way, a.shots, a.label, a.scratch_label, a.pre_label)
    except ValueError as e:
        return _error(str(e))
    if not any(row["shots"] for row in summary["rows"]):
        return _error(f"no results files under {a.log_root} (run python run_experiment.py ABLATION first)")
    timing = os.path.join(a.log_root, "ablation_timing.json")  # written by run_experiment.py ABLATION
    if os.path.isfile(timing):
        summary["timing"] = _load(timing)
    summary = write_report(summary, out)
    print(summary["table_markdown"])
    print(f"\nwritten: {os.path.join(out, 'ablation.json')}" + (f", {summary['plot']}" if summary["plot"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
