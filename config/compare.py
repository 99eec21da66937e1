"""``--phase compare``'s methods and their typed settings, made from the parsed flags before the run
(``main.PHASES``, the ``compare`` phase's ``prepare`` and ``settings``); the runner is ``trainer/compare.py`` (its
docstring: what is the same for every method, the output).

A **method** is a checkpoint and a few-shot head of ``models/heads.py`` ``HEADS``: ``PATH`` uses
``--eval_classifier`` (default ``finetune``), ``PATH:HEAD`` names it. :func:`plan_compare` reads each checkpoint's
spec and gives each method its own flags (the command line plus the model flags its checkpoint sets, checked against
those given: :func:`config.settings.model_flags_from_checkpoint`, as for ``meta_eval``); :meth:`CompareSettings.from_args`
turns them into one typed :class:`config.settings.Settings` per method, which is all the runner reads.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from models.heads import HEADS
from models.loading import check_weights_path, read_weights
from models.resnet_mtl import min_image_size
from models.spec import Expect
from utils.errors import UserError

from config.options import explicit_flags
from config.settings import Settings, model_flags_from_checkpoint

__all__ = ["Method", "parse_methods", "plan_compare", "CompareMethod", "CompareSettings"]

MODEL_FLAGS = ("backbone", "bn_mode", "image_size", "preprocess")  # (way: one for all, set by plan_compare)


@dataclass
class Method:
    """One method of a comparison: ``id`` (A, B, ...), the checkpoint ``path``, the ``head`` (a key of ``HEADS``),
    ``text`` as given, and (after :func:`plan_compare`) ``flags``: the command line with this checkpoint's model
    flags, and the lines that say what its checkpoint set."""

    id: str
    path: str
    head: str
    text: str
    flags: argparse.Namespace | None = None
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
        m.flags = a
        lines += [f"{m.id} = {m.text}: {line}" for line in m.lines]
    for flag in MODEL_FLAGS:
        values = {getattr(m.flags, flag) for m in methods}
        if flag not in given and len(values) == 1:
            setattr(args, flag, values.pop())
    args._methods = methods
    return lines


@dataclass(frozen=True)
class CompareMethod:
    """One method as the runner reads it: ``id`` (A, B, ...), the checkpoint ``path``, the ``head``, ``text`` as
    given; ``settings``: its typed settings (``settings.test`` its evaluation, ``settings.data`` its input);
    ``expect``: what its checkpoint must be (backbone, BatchNorm mode, way: ``ModelSpec.check``)."""

    id: str
    path: str
    head: str
    text: str
    settings: Settings
    expect: Expect


@dataclass(frozen=True)
class CompareSettings:
    """``--phase compare``: the methods, in the order given, and ``folder``,
    ``<log_root>/compare/<dataset>_<W>way<S>shot``, where ``compare.json`` and ``compare.md`` go."""

    methods: tuple[CompareMethod, ...]
    folder: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CompareSettings":
        """From the flags after :func:`plan_compare` (which left the methods in ``args._methods``)."""
        methods = []
        for m in args._methods:
            s = Settings.from_args(m.flags)
            methods.append(CompareMethod(m.id, m.path, m.head, m.text, s, s.model.expect()))
        ev = methods[0].settings.test
        return cls(tuple(methods), os.path.join(args.log_root, "compare", f"{args.dataset}_{ev.way}way{ev.shot}shot"))
