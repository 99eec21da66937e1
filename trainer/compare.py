"""``--phase compare``: several methods scored on one fixed episode set, with paired tests between every two.

    python main.py --phase compare --eval_weights A.pth B.pth:centroid C.pth [...] <data and protocol flags>

A **method** is a checkpoint (any file ``models.load`` reads: ours, the official PyTorch ``.pth``, a TF ``.npy``
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

import argparse
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from data_generator.dataset_loader import check_episode_fit
from data_generator.meta_data_generator import fixed_episodes
from models.evaluate import encode_bank, evaluate
from models.heads import HEADS
from models.loading import load, read_weights
from models.resnet_mtl import min_image_size
from models.spec import Expect
from trainer.base import DataBundle
from trainer.meta import ResultsNotWritten, check_weights_path, model_flags_from_checkpoint
from utils import distributed
from utils.errors import UserError
from utils.misc import WriteError, atomic_write, remove_orphaned_temporaries, write_json_atomic
from utils.options import explicit_flags, settings_dict
from utils.settings import Settings
from utils.stats import paired_comparison

__all__ = ["Method", "parse_methods", "plan_compare", "run_compare", "compare_folder", "markdown_tables"]

MODEL_FLAGS = ("backbone", "bn_mode", "image_size", "preprocess")  # (way: one for all, set by plan_compare)


@dataclass
class Method:
    """One method of a comparison: ``id`` (A, B, ...), the checkpoint ``path``, the ``head`` (a key of ``HEADS``),
    ``text`` as given, and (after :func:`plan_compare`) ``args``: the command line with this checkpoint's model
    flags, and the lines that say what its checkpoint set."""

    id: str
    path: str
    head: str
    text: str
    args: argparse.Namespace | None = None
    lines: list[str] = field(default_factory=list)


def _ids(n: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"M{i + 1}" for i in range(n)]


def parse_methods(values: list[str] | None, default_head: str) -> list[Method]:
    """The methods ``--eval_weights`` names: ``PATH`` (head ``default_head``) or ``PATH:HEAD``.

    Raises:
        UserError: fewer than two methods (E180), an unknown head after ``:`` (E181), a method given twice (E186).
    """
    values = list(values or [])
    if len(values) < 2:
        got = "none" if not values else f"one ({values[0]})"
        raise UserError(f"--phase compare needs at least two methods in --eval_weights, got {got}: pass --eval_weights "
                        "A.pth B.pth[:HEAD] ... (one checkpoint may come twice with two heads, e.g. A.pth "
                        "A.pth:centroid)")
    out = []
    for text, mid in zip(values, _ids(len(values))):
        path, head = text, default_head
        prefix, sep, suffix = text.rpartition(":")
        if sep and not os.path.exists(text) and "/" not in suffix and "\\" not in suffix:
            if suffix not in HEADS:
                raise UserError(f"--eval_weights {text}: unknown head '{suffix}' after ':' (the heads are "
                                f"{', '.join(HEADS)}: models/heads.py HEADS)")
            path, head = prefix, suffix
        out.append(Method(mid, path, head, text))
    seen: dict[tuple[str, str], str] = {}
    for m in out:
        key = (os.path.realpath(m.path), m.head)
        if key in seen:
            raise UserError(f"--eval_weights names {m.path} with the {m.head} head twice ({seen[key]} and {m.text}); "
                            "give each method once")
        seen[key] = m.text
    return out


def plan_compare(args: argparse.Namespace) -> list[str]:
    """Before the settings are built (``main.py``): the methods of ``--eval_weights`` (:func:`parse_methods`), the
    way they share, and each method's flags (the command line plus what its checkpoint's spec sets, checked against
    what was given: ``model_flags_from_checkpoint``). The model flags every checkpoint agrees on are set on ``args``
    too (the run header). Keeps the methods in ``args._methods`` (not a setting) and returns the lines to print.

    Raises:
        UserError: E180-E186, and every one-line error of reading a checkpoint (E10-E14, E31, E50-E58, E124, ...).
    """
    methods = parse_methods(args.eval_weights, args.eval_classifier)
    given = explicit_flags(args)
    specs = {}
    for m in methods:
        if m.path not in specs:
            check_weights_path(m.path, "--eval_weights")
            specs[m.path] = read_weights(m.path).spec
    meta_way = {p: s.way for p, s in specs.items() if s.kind == "meta"}
    if "way" not in given and len(set(meta_way.values())) > 1:
        (p1, w1), *rest = meta_way.items()
        p2, w2 = next((p, w) for p, w in rest if w != w1)
        raise UserError(f"--eval_weights: {p1} is a {w1}-way model and {p2} a {w2}-way one; the methods of a "
                        "comparison are scored on the same episodes, so they must have one way: compare checkpoints "
                        "of one way")
    if "way" not in given and meta_way:
        args.way = next(iter(meta_way.values()))
    lines = []
    for m in methods:
        a = argparse.Namespace(**vars(args))
        a.eval_weights, a.eval_classifier = m.path, m.head
        m.lines = model_flags_from_checkpoint(a)  # (the given flags checked against this checkpoint: E11, E31, ...)
        if a.image_size < min_image_size(a.backbone):
            raise UserError(f"--image_size {a.image_size} is too small for --backbone {a.backbone} (at least "
                            f"{min_image_size(a.backbone)} px)")
        m.args = a
        lines += [f"{m.id} = {m.text}: {line}" for line in m.lines]
    for flag in MODEL_FLAGS:
        values = {getattr(m.args, flag) for m in methods}
        if flag not in given and len(values) == 1:
            setattr(args, flag, values.pop())
    args._methods = methods
    return lines


def compare_folder(settings: Settings) -> str:
    """``<log_root>/compare/<dataset>_<W>way<S>shot``: where ``compare.json`` and ``compare.md`` go."""
    a, ev = settings.args, settings.test
    return os.path.join(a.log_root, "compare", f"{a.dataset}_{ev.way}way{ev.shot}shot")


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


def run_compare(settings: Settings, device: torch.device) -> dict:
    """Score every method of ``settings.args._methods`` (:func:`plan_compare`) on one fixed episode set, compare
    every two, print the tables and write ``compare.json`` / ``compare.md`` (module docstring). Returns the result."""
    args = settings.args
    methods: list[Method] = args._methods
    per = {m.id: Settings.from_args(m.args) for m in methods}
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
        model = load(path, device, Expect.from_args(group[0].args, only={"backbone", "bn_mode", "way"}))
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
              "settings": {m.id: settings_dict(m.args) for m in methods}}
    table = markdown_tables(result)
    print(table, flush=True)
    folder = compare_folder(settings)
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
