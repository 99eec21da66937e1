"""What a checkpoint's model is: :class:`ModelSpec`, stored in every checkpoint the trainers write (``"spec"``), and
:class:`Expect`, what the command line says about it, checked against the spec in one place (:meth:`ModelSpec.check`).

A spec holds everything needed to rebuild the model from the file alone (``models/loading.py`` ``load``): the kind
(``pre``: a pre-trained encoder and its classifier over the base classes; ``meta``: the SS encoder and the base
learner's meta-learned initialisation), the backbone and its arguments, the BatchNorm mode, the number of classes
of the base learner (``way``), the few-shot head that initialisation belongs to, and the input the model was
trained on (size and preprocessing). Files that hold no spec get one derived by their adapter (``models/loading.py``:
our checkpoints from before the spec, from their ``backbone`` and ``args``; the official PyTorch ``{"params": ...}``
from its keys and shapes; the TF ``.npy`` folder in ``models/tf_weights.py``).

Flags only verify: a flag given on the command line that disagrees with the spec is one line naming the flag and
the value the checkpoint needs (``docs/ERRORS.md`` E11, E31, E58, E140; the TF rows E56, E57), never a model silently
built otherwise.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch

from utils.errors import UserError

from .bn_mode import BN_MODES
from .resnet_mtl import BACKBONES

__all__ = ["SPEC_VERSION", "KINDS", "ModelSpec", "Expect", "HasSpec", "Weights", "MODEL_FLAGS"]

SPEC_VERSION = 1
KINDS = ("pre", "meta")


@dataclass(frozen=True)
class ModelSpec:
    """The model of a checkpoint.

    Attributes:
        kind: ``pre`` (plain encoder + pre-train classifier) or ``meta`` (SS encoder, Eq. 6, + base learner theta).
        backbone: a name of :data:`models.resnet_mtl.BACKBONES`.
        bn_mode: ``pytorch`` or ``tf`` (``models/bn_mode.py``).
        backbone_kwargs: the builder's other arguments (``dropout_keep`` of a pre-train model).
        way: ``meta``: the base learner's classes (its rows); ``pre``: None (a few-shot head of any way is fitted).
        shortcut_ss: ``meta``: whether the 1x1 shortcut convs had trainable SS (``--shortcut_ss``).
        head: the few-shot head whose initialisation a ``meta`` checkpoint stores (``models/heads.py`` HEADS).
        image_size, preprocess: the input it was trained on (``--image_size``, ``--preprocess``); None where the
            file does not say.
        pre_head, num_classes: ``pre``: the pre-train classifier (``mlp`` | ``linear``) and its classes, where known.
    """

    kind: str
    backbone: str
    bn_mode: str = "pytorch"
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    way: int | None = None
    shortcut_ss: bool = True
    head: str = "finetune"
    image_size: int | None = None
    preprocess: str | None = None
    pre_head: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"spec kind must be one of {KINDS}, got {self.kind!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        if self.kind == "meta" and (self.way is None or self.way < 2):
            raise ValueError(f"a meta spec needs way >= 2, got {self.way}")

    # ------------------------------------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """Plain values only (``torch.load(weights_only=True)`` reads them back): ``{"version": 1, "kind": ...}``."""
        d = asdict(self)
        d["backbone_kwargs"] = dict(self.backbone_kwargs)
        return {"version": SPEC_VERSION, **d}

    @classmethod
    def from_dict(cls, d: Any, path: str) -> "ModelSpec":
        """The spec stored in checkpoint ``path``; a one-line :class:`UserError` for a damaged or newer one."""
        if not isinstance(d, dict):
            raise UserError(f"checkpoint {path}: its model spec is a {type(d).__name__}, not a dict (a damaged file)")
        if d.get("version") != SPEC_VERSION:
            raise UserError(f"checkpoint {path}: model spec version {d.get('version')!r}, this program reads "
                            f"version {SPEC_VERSION} (written by a newer version of it? update it)")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"version"})
        if unknown:
            raise UserError(f"checkpoint {path}: unknown model spec field(s) {', '.join(unknown)}")
        if d.get("backbone") not in BACKBONES:
            raise UserError(f"checkpoint {path} holds a {d.get('backbone')!r} backbone, which this program does not "
                            f"have (it has {', '.join(BACKBONES)})")
        try:
            return cls(**{k: v for k, v in d.items() if k != "version"})
        except (TypeError, ValueError) as e:
            raise UserError(f"checkpoint {path}: invalid model spec ({e})") from None

    def describe(self) -> str:
        """``'conv4 meta 5-way, --bn_mode pytorch, 32 px --preprocess paper'`` (what a line names)."""
        way = f" {self.way}-way" if self.way else ""
        size = f", {self.image_size} px" if self.image_size else ""
        prep = f" --preprocess {self.preprocess}" if self.preprocess else ""
        return f"{self.backbone} {self.kind}{way}, --bn_mode {self.bn_mode}{size}{prep}"

    # ------------------------------------------------------------------------------------------ verification
    def check(self, expect: "Expect | None", path: str) -> None:
        """One line for the first flag of ``expect`` that disagrees with this spec (backbone, BatchNorm mode, way).

        The messages are docs/ERRORS.md E11, E58 and E31; the official and TF adapters word their own lines where
        the file's format says more (E140, E56, E57)."""
        if expect is None:
            return
        if expect.backbone is not None and expect.backbone != self.backbone:
            raise UserError(f"checkpoint {path} was trained with --backbone {self.backbone}, not {expect.backbone}; "
                            f"pass --backbone {self.backbone}")
        if expect.bn_mode is not None and expect.bn_mode != self.bn_mode:
            raise UserError(f"checkpoint {path} was trained with --bn_mode {self.bn_mode}, not {expect.bn_mode}; "
                            f"pass --bn_mode {self.bn_mode}")
        self.check_way(expect.way, path)

    def check_way(self, way: int | None, path: str) -> None:
        """E31: a meta checkpoint's base learner has ``self.way`` classes; a head of another way cannot start from it."""
        if way is not None and self.kind == "meta" and self.way != way:
            raise UserError(f"checkpoint {path} has a {self.way}-way base learner, but --way is {way}; pass --way "
                            f"{self.way}")


# the flags that name a part of the model, and where each lives in a spec
MODEL_FLAGS = ("backbone", "bn_mode", "way", "image_size", "preprocess")


@dataclass(frozen=True)
class Expect:
    """What the command line says the model is; None = not said (the checkpoint decides). Checked by
    :meth:`ModelSpec.check` (backbone, bn_mode, way); ``image_size`` and ``preprocess`` only warn (meta-test)."""

    backbone: str | None = None
    bn_mode: str | None = None
    way: int | None = None
    image_size: int | None = None
    preprocess: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, only: frozenset[str] | set[str] | None = None) -> "Expect":
        """The model flags of ``args``; with ``only``, just those named there (e.g. the flags given explicitly,
        :func:`config.options.explicit_flags`)."""
        return cls(**{k: getattr(args, k, None) for k in MODEL_FLAGS if only is None or k in only})


class HasSpec:
    """What holds a model's spec (:class:`Weights`, ``models.loading.LoadedModel``): its kind, read from it."""

    spec: ModelSpec

    @property
    def kind(self) -> str:
        """``pre`` or ``meta``."""
        return self.spec.kind


@dataclass(frozen=True)
class Weights(HasSpec):
    """What an adapter read from a file (``models/loading.py`` ``read_weights``): the model's spec and its state
    dicts in our keys.

    Attributes:
        encoder: the encoder's state dict (SS keys ``mtl_*`` for a ``meta`` spec, none for ``pre``).
        head: ``meta``: the base learner ``{"weight": (way, D), "bias": (way,)}``; ``pre``: the pre-train
            classifier's state dict (``pre_fc.*`` without the prefix), or None where the file has none.
        source: which adapter read it (``ours``, ``ours (before the spec)``, ``official PyTorch``, ``TensorFlow``).
        path: the file named in messages (for a TF folder: its ``fc_weights.npy``, or ``weights.npy``).
    """

    spec: ModelSpec
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    source: str
    path: str
