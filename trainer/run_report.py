"""The run report: what the files of one run folder say, as ``report.md`` (``tools/report.py`` draws ``report.png``
from the same :func:`collect_run`).

A run folder is what a phase writes into (``config.settings.RunPaths``): a pre-train or meta-train run
(``trlog.json``, ``args.json``; a hard-task run ``hard_tasks.jsonl``) and the ``results*.json`` that ``meta_eval``
wrote next to the checkpoint it tested (per-episode accuracies ``episode_accs`` and per-class ones ``class_accs``
since issue 23; older results files give the mean only). Every part is optional: the report says which files it
read and leaves out what is not there.

**At the end of each phase** (``BaseTrainer.run`` after the last epoch, ``meta_eval`` after its results file) the
phase writes ``report.md`` into its folder: reading a few JSON files and writing one, milliseconds (measured in
docs/RESULTS.md); it has no matplotlib import and no timestamp, so it never slows a test or a run. The picture
(matplotlib, about a second) is drawn on request: ``python -m tools.report RUN_DIR`` writes both files. A report that
cannot be written (a read-only folder) is one ``warning:`` line; the phase's result stands.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

import numpy as np

from utils.misc import WriteError, atomic_write

__all__ = ["REPORT_MD", "REPORT_PNG", "RESULTS_GLOB", "collect_run", "markdown", "write_run_report",
           "episode_histogram_bins"]

REPORT_MD, REPORT_PNG = "report.md", "report.png"
RESULTS_GLOB = "results*.json"
N_CLASSES_SHOWN = 5  # hardest and easiest classes listed (report.md) and drawn (report.png)
MAX_EPOCH_ROWS = 30  # epochs listed in report.md (longer runs: evenly spaced ones, the best and the last)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _curves(trlog: list[dict], num_batch: int | None) -> dict:
    """The per-epoch series of ``trlog.json`` (accuracies in %)."""
    get = lambda k: [None if r.get(k) is None else float(r[k]) for r in trlog]  # noqa: E731
    pct = lambda v: [None if x is None else 100 * x for x in v]  # noqa: E731
    best = max(trlog, key=lambda r: r.get("val_acc", -1.0)) if trlog else None
    return {"epoch": [int(r["epoch"]) for r in trlog], "train_loss": get("train_loss"),
            "train_acc": pct(get("train_acc")), "val_acc": pct(get("val_acc")), "val_ci95": pct(get("val_ci95")),
            "best_epoch": int(best["epoch"]) if best else None,
            "best_val_acc": 100 * float(best["val_acc"]) if best else None,
            "best_val_ci95": 100 * float(best.get("val_ci95", 0.0)) if best else None,
            "num_batch": num_batch,
            "train_s": sum(float(r.get("train_time", 0.0)) for r in trlog),
            "val_s": sum(float(r.get("val_time", 0.0)) for r in trlog)}


def _test(path: str) -> dict:
    """One results file: its numbers, the per-episode accuracies (%) and the per-class ones when it has them."""
    r = _read_json(path)
    accs = [100 * float(a) for a in r.get("episode_accs", [])]
    classes = r.get("class_accs") or {}
    ranked = sorted(classes.items(), key=lambda kv: (kv[1]["acc"], kv[0]))
    return {"file": os.path.basename(path), "method": r.get("method"), "mean": r.get("mean"), "ci95": r.get("ci95"),
            "episodes": r.get("episodes"), "way": r.get("way"), "shot": r.get("shot"), "query": r.get("query"),
            "eval_seed": r.get("eval_seed"), "classifier": r.get("classifier"), "checkpoint": r.get("checkpoint"),
            "episode_accs": accs, "classes": [{"name": k, **v} for k, v in ranked]}


def _hard_tasks(path: str) -> dict:
    """How hard the hard tasks were (``hard_tasks.jsonl``, one line per meta-batch, ``data_generator/hard_tasks.py``)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fail = np.array([a for r in rows for a in r.get("failure_accuracies", [])], dtype=np.float64)
    normal = np.array([a for r in rows for a in r.get("task_accuracies", [])], dtype=np.float64)
    hard = np.array([a for r in rows for a in r.get("hard_task_accuracies", [])], dtype=np.float64)
    counts: dict[str, int] = {}
    for r in rows:
        for name in r.get("failure_classes", []):
            counts[name] = counts.get(name, 0) + 1
    frequent = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:N_CLASSES_SHOWN]
    mean = lambda a: float(100 * a.mean()) if a.size else None  # noqa: E731
    return {"meta_batches": len(rows), "hard_tasks": sum(len(r.get("hard_tasks", [])) for r in rows),
            "topped_up_batches": sum(1 for r in rows if r.get("topped_up")),
            "failure_acc_mean": mean(fail), "failure_acc_perfect": float((fail >= 1.0).mean()) if fail.size else None,
            "failure_acc_at_most_half": float((fail <= 0.5).mean()) if fail.size else None,
            "normal_task_acc_mean": mean(normal), "hard_task_acc_mean": mean(hard),
            "frequent_failure_classes": frequent,
            "series": {"iteration": [int(r["iteration"]) for r in rows],
                       "failure_acc": [100 * float(np.mean(r["failure_accuracies"])) if r.get("failure_accuracies")
                                       else None for r in rows],
                       "normal_acc": [100 * float(np.mean(r["task_accuracies"])) if r.get("task_accuracies")
                                      else None for r in rows],
                       "hard_acc": [100 * float(np.mean(r["hard_task_accuracies"])) if r.get("hard_task_accuracies")
                                    else None for r in rows]}}


def collect_run(run_dir: str) -> dict:
    """What ``run_dir``'s files say: ``{"run_dir", "files": [names read], "curves": trlog series or None, "tests":
    [one per results file], "hard_tasks": summary or None, "kind": "pre" | "meta" | None}``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder; ValueError: it holds none of the files a report reads.
    """
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a folder")
    files, run = [], {"run_dir": run_dir, "curves": None, "tests": [], "hard_tasks": None, "kind": None}
    args_path = os.path.join(run_dir, "args.json")
    args = _read_json(args_path) if os.path.isfile(args_path) else {}
    if args:
        files.append("args.json")
        run["kind"] = {"pre_train": "pre", "meta_train": "meta"}.get(args.get("phase"))
    trlog_path = os.path.join(run_dir, "trlog.json")
    if os.path.isfile(trlog_path):
        files.append("trlog.json")
        num_batch = args.get("pre_iters_per_epoch") if run["kind"] == "pre" else args.get("num_batch")
        run["curves"] = _curves(_read_json(trlog_path), int(num_batch) if num_batch else None)
    for path in sorted(glob.glob(os.path.join(run_dir, RESULTS_GLOB))):
        files.append(os.path.basename(path))
        run["tests"].append(_test(path))
    # results.json (the MTL test of a meta run) first, then the rest in name order
    run["tests"].sort(key=lambda t: (t["file"] != "results.json", t["file"]))
    ht_path = os.path.join(run_dir, "hard_tasks.jsonl")
    if os.path.isfile(ht_path):
        files.append("hard_tasks.jsonl")
        run["hard_tasks"] = _hard_tasks(ht_path)
    if not files:
        raise ValueError(f"{run_dir} holds none of the files a run report reads (trlog.json, args.json, "
                         f"{RESULTS_GLOB}, hard_tasks.jsonl)")
    run["files"] = files
    return run


def episode_histogram_bins(test: dict) -> np.ndarray:
    """Bin edges (%) centred on the accuracies an episode can have: multiples of ``100 / (way * query)``."""
    n_q = (test.get("way") or 1) * (test.get("query") or 1)
    step = 100.0 / n_q
    return np.arange(-0.5, n_q + 1.0) * step


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _epoch_rows(c: dict) -> list[int]:
    n = len(c["epoch"])
    if n <= MAX_EPOCH_ROWS:
        return list(range(n))
    keep = set(np.linspace(0, n - 1, MAX_EPOCH_ROWS - 2).round().astype(int).tolist())
    keep |= {c["epoch"].index(c["best_epoch"]), n - 1}
    return sorted(keep)


def markdown(run: dict, png: str | None = None, command: str | None = None) -> str:
    """``report.md``: the files read, the training curves as a table, each test with its spread over episodes and its
    hardest and easiest classes, the hard tasks; ``png``: the picture's file name when one was drawn."""
    d = run["run_dir"]
    lines = [f"# Run report: {d}", "",
             f"Read from {d}: " + ", ".join(f"`{f}`" for f in run["files"]) + "." +
             (f" Written by `{command}`." if command else ""), ""]
    if png:
        lines += [f"![the run: training curves, test accuracy over episodes, per-class accuracy]({png})", "",
                  f"`{png}` panels: " + ", ".join(run.get("panels", [])) + ".", ""]
    else:
        lines += [f"The picture (`{REPORT_PNG}`) is drawn by `python -m tools.report {d}`.", ""]
    c = run["curves"]
    if c:
        lines += ["## Training (trlog.json)", "", "| epoch | train loss | train acc (%) | val acc (%) ± 95% |",
                  "|---|---|---|---|"]
        for i in _epoch_rows(c):
            mark = " (best)" if c["epoch"][i] == c["best_epoch"] else ""
            lines.append(f"| {c['epoch'][i]}{mark} | {_f(c['train_loss'][i], 4)} | {_f(c['train_acc'][i])} | "
                         f"{_f(c['val_acc'][i])} ± {_f(c['val_ci95'][i])} |")
        per = f", {c['num_batch']} iterations each" if c["num_batch"] else ""
        lines += ["", f"{len(c['epoch'])} epochs{per}; best validation {_f(c['best_val_acc'])} ± "
                      f"{_f(c['best_val_ci95'])} at epoch {c['best_epoch']} (the epoch `max_acc.pth` keeps); "
                      f"{c['train_s']:.1f} s training + {c['val_s']:.1f} s validation.", ""]
    if run["tests"]:
        lines += ["## Test (results*.json)", "",
                  "| results file | method | episodes | task | accuracy (%) ± 95% | episode accuracy: min / median / max |",
                  "|---|---|---|---|---|---|"]
        for t in run["tests"]:
            a = np.asarray(t["episode_accs"])
            spread = f"{a.min():.1f} / {np.median(a):.1f} / {a.max():.1f}" if a.size else "– (not stored)"
            task = f"{t['way']}-way {t['shot']}-shot, {t['query']} queries, eval seed {t['eval_seed']}"
            lines.append(f"| `{t['file']}` | {t['method']} | {t['episodes']} | {task} | {_f(t['mean'])} ± "
                         f"{_f(t['ci95'])} | {spread} |")
        lines.append("")
        for t in run["tests"]:
            if not t["classes"]:
                continue
            k = min(N_CLASSES_SHOWN, len(t["classes"]) // 2) or 1
            hard, easy = t["classes"][:k], t["classes"][-k:][::-1]
            lines += [f"Classes of `{t['file']}` (query accuracy over the episodes each appeared in; "
                      f"{len(t['classes'])} test classes):", "",
                      "| hardest | acc (%) | episodes | easiest | acc (%) | episodes |", "|---|---|---|---|---|---|"]
            for h, e in zip(hard, easy):
                lines.append(f"| {h['name']} | {_f(h['acc'])} | {h['episodes']} | {e['name']} | {_f(e['acc'])} | "
                             f"{e['episodes']} |")
            lines.append("")
    h = run["hard_tasks"]
    if h:
        lines += ["## Hard tasks (hard_tasks.jsonl)", "",
                  f"{h['meta_batches']} meta-batches, {h['hard_tasks']} hard tasks ({h['topped_up_batches']} "
                  "meta-batches topped up with non-failure classes).", "",
                  f"* failure class (the worst class of each normal task): mean query accuracy "
                  f"{_f(h['failure_acc_mean'])}%; {_pct(h['failure_acc_perfect'])} of them were still at 100% (not a "
                  f"failure), {_pct(h['failure_acc_at_most_half'])} at or below 50%."]
        if h["hard_task_acc_mean"] is not None:
            lines.append(f"* query accuracy of the hard tasks {_f(h['hard_task_acc_mean'])}% against "
                         f"{_f(h['normal_task_acc_mean'])}% for the normal tasks of the same meta-batches.")
        else:
            lines.append("* this log does not record the hard tasks' own accuracy (a log written before it did).")
        if h["frequent_failure_classes"]:
            lines.append("* most frequent failure classes: " +
                         ", ".join(f"{n} ({k})" for n, k in h["frequent_failure_classes"]) + ".")
        lines.append("")
    return "\n".join(lines)


def write_run_report(run_dir: str, quiet: bool = False) -> str | None:
    """The end-of-phase report: ``<run_dir>/report.md`` (:func:`markdown` of :func:`collect_run`, no picture), and
    one line saying where. Returns its path, or None with one ``warning:`` line when it could not be read or written
    (the phase that called it has its result already). ``quiet``: print nothing."""
    out = os.path.join(run_dir, REPORT_MD)
    try:
        run = collect_run(run_dir)
        png = REPORT_PNG if os.path.isfile(os.path.join(run_dir, REPORT_PNG)) else None
        text = markdown(run, None, None)
        if png:  # a picture drawn earlier: named, not shown as current
            text += f"\n`{png}` was drawn earlier by `python -m tools.report {run_dir}`; run it again to redraw it.\n"
        atomic_write(out, lambda f: f.write(text))
    except (OSError, ValueError, KeyError, TypeError, WriteError) as e:
        if not quiet:
            print(f"warning: the run report {out} was not written: {e}", flush=True)
        return None
    if not quiet:
        print(f"report written to {out} (the picture: python -m tools.report {run_dir})", flush=True)
    return out
