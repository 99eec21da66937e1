"""``--phase compare``: several methods scored on one fixed episode set, with paired tests between every two.

    python main.py --phase compare --eval_weights A.pth B.pth:centroid C.pth [...] <data and protocol flags>

The methods and their settings are made from the flags in ``config/compare.py``. A **method** is a checkpoint (any file ``models.load`` reads: ours, the official PyTorch ``.pth``, a TF ``.npy``
folder) and a few-shot head of ``models/heads.py`` ``HEADS``: ``PATH`` uses ``--eval_classifier`` (default
``finetune``), ``PATH:HEAD`` names it (``pre.pth pre.pth:centroid`` compares the FT baseline with the nearest class
mean on the same features). A path that exists is taken whole, so a file name holding ``:`` still works.

What is the same for every method, and what is not:

* **one episode set**: ``--num_test_episodes`` fixed episodes of the test split from ``--eval_seed``
  (``fixed_episodes``), ``--way`` x (``--shot`` + the test queries), the inner loop of the command line
  (``--test_update_step``, ``--base_lr``, ``--inner_loss``, ``--test_flip_support``): exactly what ``meta_eval``
  would run for each checkpoint alone with the same flags, so each method's accuracies are meta_eval's;
* **each model as its checkpoint says**: the model flags left off the command line (``--backbone``, ``--bn_mode``,
  ``--image_size``, ``--preprocess``) come from each checkpoint's spec (``model_flags_from_checkpoint``, as in
  ``meta_eval``), so a conv4 and a ResNet-12, or models trained at different input sizes, can be compared; a model
  flag given applies to every checkpoint and is checked against each. The way must be one: a meta checkpoint's
  base learner fixes it (two meta checkpoints of different way cannot share episodes: one line), a pre-trained
  encoder takes it;
* **each test image is encoded once per model**: the feature bank (``models.evaluate.encode_bank``) of a checkpoint
  is shared by all its heads; a batch-dependent encoder (``--bn_mode tf``: BatchNorm on batch statistics) is
  evaluated episode by episode, as ``meta_eval`` does, on the same episodes.

Output: per method the mean accuracy with its 95% interval; per pair (B against each method A listed before it) the
mean per-episode difference B - A with its 95% interval, on how many episodes B was better / worse / equal, and the
two-sided p-values of the paired t-test and the Wilcoxon signed-rank test (``utils/stats.py``: what each assumes,
the exact and the normal Wilcoxon). Every interval is the project's ``1.96 * population std / sqrt(n)``
(``utils.misc.mean_ci``, the official code's). Printed as a markdown table, then written to
``<log_root>/compare/<dataset>_<W>way<S>shot/compare.json`` (everything, with the per-episode accuracies of each
method) and ``compare.md`` (the tables) beside it; the table is printed first, so a folder that cannot be written
loses nothing of the result (exit 5, as ``meta_eval``). A later comparison with the same protocol replaces both
files (they name the methods they compared).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from config.compare import CompareSettings
from data_generator.dataset_loader import check_episode_fit
from data_generator.meta_data_generator import fixed_episodes
from models.evaluate import encode_bank, evaluate
from models.heads import HEADS
from models.loading import load
from trainer.base import DataBundle
from trainer.meta import ResultsNotWritten
from utils import distributed
from utils.errors import UserError
from utils.misc import WriteError, atomic_write, remove_orphaned_temporaries, write_json_atomic
from utils.stats import paired_comparison

__all__ = ["run_compare", "markdown_tables"]


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 1e-300" if p < 1e-300 else f"{p:.2g}"


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def markdown_tables(result: dict) -> str:
    """The two tables of a comparison (printed, ``compare.md``): the methods, then every pair."""
    e = result["episodes"]
    lines = ["| | method | checkpoint | accuracy (%) ± 95% |", "|---|---|---|---|"]
    for m in result["methods"]:
        lines.append(f"| {m['id']} | {m['method']} | `{m['checkpoint']}` | {m['mean']:.2f} ± {m['ci95']:.2f} |")
    lines += ["", "| pair | difference (%) ± 95% | episodes better / worse / equal | paired t | Wilcoxon signed-rank |",
              "|---|---|---|---|---|"]
    by_id = {m["id"]: m for m in result["methods"]}
    for p in result["pairs"]:
        a, b = by_id[p["a"]], by_id[p["b"]]
        t, w = p["t_test"], p["wilcoxon"]
        tt = "–" if t["t"] is None else f"t = {t['t']:.2f}, p = {_p(t['p'])}"
        ww = f"W+ = {w['statistic']:g}, n = {w['n']}, p = {_p(w['p'])} ({w['method']})"
        lines.append(f"| {p['b']} - {p['a']} ({b['method']} - {a['method']}) | {_signed(p['mean'])} ± "
                     f"{p['ci95']:.2f} | {p['b_better']} / {p['a_better']} / {p['ties']} | {tt} | {ww} |")
    lines += ["", f"{e['episodes']} fixed test episodes (eval seed {e['eval_seed']}), {e['way']}-way {e['shot']}-shot, "
                  f"{e['query']} queries per class, the same for every method. Intervals: 1.96 x std / sqrt(episodes) "
                  "(population std, as every interval of this project). A pair's difference is per episode, the later "
                  "method's accuracy minus the earlier one's. "
                  "p-values are two-sided; the paired t-test assumes independent episodes and a roughly normal mean "
                  "difference, the Wilcoxon signed-rank test independent episodes and differences symmetric about "
                  "their median (zero differences dropped, ties at average ranks; exact up to 50 non-zero "
                  "differences, else the normal approximation with the tie correction)."]
    return "\n".join(lines)


def run_compare(cs: CompareSettings, device: torch.device) -> dict:
    """Score every method of ``cs`` (``config/compare.py``) on one fixed episode set, compare every two, print the
    tables and write ``compare.json`` / ``compare.md`` (module docstring). Returns the result."""
    methods = cs.methods
    per = {m.id: m.settings for m in methods}
    ev0 = per[methods[0].id].test
    bundles: dict = {}  # DataSettings -> (DataBundle, test split): one load per input size and preprocessing
    for m in methods:
        data = per[m.id].data
        if data not in bundles:
            bundle = DataBundle(data)
            test_set = bundle.load("test")
            check_episode_fit(test_set, ev0.way, ev0.shot + ev0.query, "meta-test")
            bundles[data] = (bundle, test_set)
    first_set = next(iter(bundles.values()))[1]
    for _, s in bundles.values():  # the same split at another size: the same images, labels and classes
        if not (np.array_equal(s.labels, first_set.labels) and list(s.class_names) == list(first_set.class_names)):
            raise UserError(f"the test split {s.source} holds other images at {s.stored_size} px than at "
                            f"{first_set.stored_size} px; compare checkpoints of one input size (--image_size)")
    episodes = fixed_episodes(first_set.labels, ev0.episodes, ev0.way, ev0.shot, ev0.query, ev0.seed)
    scored: dict[str, dict] = {}
    for path in dict.fromkeys(m.path for m in methods):  # each checkpoint once, in the order given
        group = [m for m in methods if m.path == path]
        s0 = per[group[0].id]
        bundle, test_set = bundles[s0.data]
        model = load(path, device, group[0].expect)
        bank = None
        if s0.test.mode != "episodic":  # one encoding of the test split for all heads of this model
            bank = encode_bank(model.encoder, test_set, bundle.eval_transform, s0.test, device,
                               desc=f"encode test ({'/'.join(m.id for m in group)})")
        for m in group:
            ev = per[m.id].test
            w, b = model.head_init(ev.way, ev.seed)
            mean, ci, accs = evaluate(model.encoder, test_set, bundle.eval_transform, episodes, w, b, ev, device,
                                      desc=f"encode test ({m.id})", features=bank)
            scored[m.id] = {"id": m.id, "method": HEADS[m.head].method(model.kind), "checkpoint": m.path,
                            "head": m.head, "kind": model.kind, "spec": model.spec.describe(), "eval_mode": ev.mode,
                            "mean": round(100 * mean, 4), "ci95": round(100 * ci, 4), "accs": accs,
                            "episode_accs": [round(float(x), 6) for x in accs]}
        del model, bank
    pairs = []
    for j, mb in enumerate(methods):
        for ma in methods[:j]:
            # the per-episode accuracies as results.json stores them (6 decimals), so a comparison made afterwards
            # from those files gives the same numbers
            r = paired_comparison(scored[ma.id]["episode_accs"], scored[mb.id]["episode_accs"])
            pairs.append({"a": ma.id, "b": mb.id, "mean": round(100 * r["mean"], 4), "ci95": round(100 * r["ci95"], 4),
                          **{k: r[k] for k in ("n", "t_test", "wilcoxon", "b_better", "a_better", "ties")}})
    for s in scored.values():
        s.pop("accs")
    ev = ev0
    result = {"episodes": {"episodes": ev.episodes, "way": ev.way, "shot": ev.shot, "query": ev.query,
                           "eval_seed": ev.seed, "inner_steps": ev.inner.steps, "base_lr": ev.inner.lr,
                           "flip_support": ev.flip_support, "test_split": first_set.source},
              "interval": "1.96 * population std / sqrt(episodes) (utils.misc.mean_ci)",
              "difference": "per episode, B - A, for every method B and each method A listed before it",
              "methods": [scored[m.id] for m in methods], "pairs": pairs,
              "settings": {m.id: m.settings.record() for m in methods}}
    table = markdown_tables(result)
    print(table, flush=True)
    folder = cs.folder
    out = os.path.join(folder, "compare.json")
    if distributed.is_main():
        try:
            os.makedirs(folder, exist_ok=True)
            remove_orphaned_temporaries(folder)
            write_json_atomic(out, {**result, "table_markdown": table})
            atomic_write(os.path.join(folder, "compare.md"), lambda f: f.write(table + "\n"))
        except OSError as e:  # the folder itself could not be made
            raise ResultsNotWritten(f"the comparison could not be written to {out}: {e.strerror or e} (the tables "
                                    "above are complete; choose another --log_root, then run the same command "
                                    "again)") from None
        except WriteError as e:
            raise ResultsNotWritten(f"the comparison could not be written to {out}: {e.reason} (the tables above are "
                                    f"complete; {e.fix}, then run the same command again)") from None
    print(f"comparison written to {out} and compare.md", flush=True)
    result["path"] = out
    return result
