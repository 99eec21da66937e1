"""Rebuilding a model from a file: one adapter per source, one loader (:func:`load`).

Every file a flag can name (``--eval_weights``, ``--init_weights``, the tools' checkpoints) goes through
:func:`read_weights`, which picks the adapter by what the file is and returns :class:`models.spec.Weights` (the
model's :class:`~models.spec.ModelSpec` and its state dicts in our keys):

==============================  ============================================  ===========================================
source                          adapter (one home each)                       the spec
==============================  ============================================  ===========================================
ours, with ``"spec"``           :func:`_read_ours`                            stored by the trainer
ours, before the spec           :func:`_read_ours` -> :func:`_legacy_spec`    ``backbone`` and ``args`` of the file (a
(``format`` but no ``spec``)                                                  checkpoint from before ``--bn_mode``:
                                                                              pytorch; ``--shortcut_ss``: on)
official PyTorch                :func:`_read_official`                        backbone detected from the keys and shapes
``{"params": state_dict}``                                                    (resnet25 unless they fit another one
                                                                              only), ``--bn_mode pytorch``
TF ``.npy`` folder              :func:`models.tf_weights.read_tf_model`       ResNet-12 of the widths in the files,
                                                                              ``--bn_mode tf``, no SS on the shortcut
==============================  ============================================  ===========================================

``expect`` (:class:`~models.spec.Expect`: the flags the command line gave) is checked against the spec in the same
call (:meth:`~models.spec.ModelSpec.check`); flags never change what is built. :func:`load` builds the encoder the
spec describes, loads it strictly (``utils.checkpoint.load_strict``: every key, every shape, finite values) and
returns a :class:`LoadedModel`: the encoder, the spec, and the few-shot head's initialisation (the meta-learned base
learner, or a fresh seeded one for a pre-trained encoder: :meth:`LoadedModel.head_init`). Meta-training starts
from a file through the same reader (:func:`init_meta_model`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from utils.checkpoint import FORMAT, check_finite_weights, load_checkpoint, load_strict
from utils.errors import UserError
from utils.misc import listing

from .heads import HEADS, fresh_init
from .mtl import MetaLearner, build_encoder
from .resnet_mtl import BACKBONES, build_backbone
from .spec import KINDS, Expect, HasSpec, ModelSpec, Weights
from .tf_weights import is_tf_weights, read_tf_model, tf_folder

__all__ = ["SS_KEYS", "OURS", "OURS_BEFORE_SPEC", "OFFICIAL", "check_weights_path", "read_weights", "LoadedModel",
           "load", "init_meta_model", "detect_backbone"]

SS_KEYS = ("mtl_weight", "mtl_bias")  # the SS parameters of a Conv2dMtl (Eq. 6): absent from a plain encoder
OURS, OURS_BEFORE_SPEC, OFFICIAL = "ours", "ours (before the spec)", "official PyTorch"


def check_weights_path(path: str, flag: str) -> None:
    """A one-line error, before any data is loaded, when the checkpoint named by ``flag`` (``--init_weights``,
    ``--eval_weights``) is not there: the path itself is named (never "run the phase first" for a file the user
    gave), with the checkpoints its folder does hold. TF weights (a folder or ``.npy``) are checked by
    :func:`models.tf_weights.tf_folder`; a folder holding ``.pth`` files but no ``weights.npy`` names those files.
    ``PATH:HEAD`` (a method of ``--phase compare``) given to meta_eval names ``--eval_classifier``."""
    prefix, sep, head = path.rpartition(":")
    if flag == "--eval_weights" and sep and head in HEADS and not os.path.exists(path) and os.path.exists(prefix):
        raise UserError(f"--eval_weights {path}: ':{head}' after a checkpoint names its head in --phase compare; "
                        f"meta_eval takes the head from --eval_classifier: pass --eval_weights {prefix} "
                        f"--eval_classifier {head}")
    if os.path.isdir(path):
        pths = sorted(f for f in os.listdir(path) if f.endswith(".pth"))
        if pths and not os.path.isfile(os.path.join(path, "weights.npy")):
            pick = "max_acc.pth" if "max_acc.pth" in pths else pths[0]
            raise UserError(f"{flag} {path} is a folder without TensorFlow weights.npy; it holds {listing(pths)}"
                            f": pass one of them, e.g. {flag} {os.path.join(path, pick)}")
    if is_tf_weights(path):
        tf_folder(path)
        return
    if os.path.isfile(path):
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: no such file (the folder {folder} does not exist either)")
    pths = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
    near = f"; {folder} holds {listing(pths)}" if pths else f"; {folder} holds no .pth checkpoint"
    raise UserError(f"{flag} {path}: no such file{near}")


def read_weights(path: str, expect: Expect | None = None, parts: str = "auto") -> Weights:
    """Read the model file ``path`` with the adapter of its source and check ``expect`` against its spec.

    Args:
        path: our ``.pth``, the official PyTorch ``.pth``, or a TF weights folder / its ``weights.npy``.
        expect: the model flags the command line gave (None: nothing to check).
        parts: TF only: ``pre`` reads ``weights.npy`` alone (meta-training starts from the pre-trained encoder, as
            the TF ``META_LOAD``); ``auto`` all three files when they are there.
    Raises:
        UserError: one line for an unreadable, unknown or damaged file, or a flag that disagrees with the spec.
    """
    if is_tf_weights(path):
        return read_tf_model(path, expect, parts)
    ck = load_checkpoint(path)
    if ck.get("format") == FORMAT:
        weights = _read_ours(ck, path)
    elif isinstance(ck.get("params"), dict):
        weights = _read_official(ck["params"], path, expect.backbone if expect else None)
    else:
        raise UserError(f"checkpoint {path} is in an unknown format (keys {sorted(ck)[:5]}); expected one written "
                        "by this project or the official code's {'params': state_dict}")
    weights.spec.check(expect, path)
    return weights


# ------------------------------------------------------------------------------------------------------------ ours
def _read_ours(ck: dict, path: str) -> Weights:
    """Our checkpoints (``{"format": "mtl-pytorch/1", "kind": "pre" | "meta", "encoder": ..., "pre_fc" |
    "base_learner": ..., "spec": ...}``; before the spec, without ``"spec"``)."""
    kind = ck.get("kind")
    if kind not in KINDS:
        raise UserError(f"checkpoint {path} is a '{kind}' checkpoint, not a model (pre or meta)")
    head_key = "base_learner" if kind == "meta" else "pre_fc"
    encoder, head = ck.get("encoder"), ck.get(head_key)
    if not isinstance(encoder, dict) or (kind == "meta" and not isinstance(head, dict)):
        raise UserError(f"checkpoint {path} has no {'encoder' if not isinstance(encoder, dict) else head_key} "
                        "(a damaged file)")
    if "spec" in ck:
        spec, source = ModelSpec.from_dict(ck["spec"], path), OURS
        if spec.kind != kind:
            raise UserError(f"checkpoint {path} is a '{kind}' checkpoint, but its model spec says '{spec.kind}' "
                            "(a damaged file)")
    else:
        spec, source = _legacy_spec(ck, path), OURS_BEFORE_SPEC
    if kind == "meta":
        rows = _rows(head.get("weight"))
        if rows != spec.way:
            raise UserError(f"checkpoint {path}: its model spec says {spec.way}-way, but its base learner has "
                            f"{rows} rows (a damaged file)")
    return Weights(spec, encoder, head, source, path)


def _rows(weight) -> int | None:
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _pre_fc_spec(pre_fc: dict | None) -> tuple[str | None, int | None]:
    """(pre_head, num_classes) of a pre-train classifier's state dict: ``mlp`` (``0.*``, ``2.*``) or ``linear``."""
    if not pre_fc:
        return None, None
    if "2.weight" in pre_fc:
        return "mlp", _rows(pre_fc["2.weight"])
    return "linear", _rows(pre_fc.get("weight"))


def _legacy_spec(ck: dict, path: str) -> ModelSpec:
    """The spec of a checkpoint written before the spec existed: the ``backbone`` it stores and the settings of its
    run (``args``); a setting that did not exist yet has the value that code always used (``--bn_mode pytorch``,
    ``--shortcut_ss on``). The way and the pre-train classifier are read from the tensors themselves."""
    args = ck.get("args") if isinstance(ck.get("args"), dict) else {}
    backbone = ck.get("backbone", args.get("backbone"))
    if backbone not in BACKBONES:
        raise UserError(f"checkpoint {path} holds a {backbone!r} backbone, which this program does not have (it has "
                        f"{', '.join(BACKBONES)})")
    common = dict(backbone=backbone, bn_mode=args.get("bn_mode") or "pytorch", image_size=args.get("image_size"),
                  preprocess=args.get("preprocess"))
    if ck["kind"] == "meta":
        return ModelSpec(kind="meta", way=_rows(ck["base_learner"].get("weight")),
                         shortcut_ss=(args.get("shortcut_ss") or "on") == "on", **common)
    pre_head, num_classes = _pre_fc_spec(ck.get("pre_fc"))
    return ModelSpec(kind="pre", backbone_kwargs={"dropout_keep": float(args.get("pre_dropout_keep", 1.0))},
                     pre_head=pre_head, num_classes=ck.get("num_classes", num_classes), **common)


# ------------------------------------------------------------------------------------------------ official PyTorch
def _official_head(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Map the official ``BaseLearner`` keys (``fc1_w``, ``fc1_b``, aliases ``vars.0/1``) to nn.Linear's."""
    w = sd.get("fc1_w", sd.get("vars.0"))
    b = sd.get("fc1_b", sd.get("vars.1"))
    if w is None or b is None:
        raise UserError(f"checkpoint {path}: base_learner weights (fc1_w / fc1_b) not found")
    extra = sorted(set(sd) - {"fc1_w", "fc1_b", "vars.0", "vars.1"})
    if extra:
        raise UserError(f"checkpoint {path}: unexpected base_learner keys {extra[:3]}")
    return {"weight": w, "bias": b}


@functools.lru_cache(maxsize=None)
def _signature(name: str) -> frozenset[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of backbone ``name``'s plain state dict (built on the meta device: no memory,
    no random numbers drawn)."""
    with torch.device("meta"):
        sd = build_backbone(name, mtl=False).state_dict()
    return frozenset((k, tuple(v.shape)) for k, v in sd.items())


def detect_backbone(encoder_sd: dict[str, torch.Tensor]) -> list[str]:
    """The registered backbones whose plain state dict has exactly the keys and shapes of ``encoder_sd`` (its SS
    entries ``mtl_*`` aside), in registry order."""
    have = frozenset((k, tuple(v.shape)) for k, v in encoder_sd.items()
                     if not k.endswith(SS_KEYS) and isinstance(v, torch.Tensor))
    return [name for name in BACKBONES if _signature(name) == have]


def _read_official(sd: dict, path: str, backbone: str | None) -> Weights:
    """The official PyTorch code's ``{"params": state_dict}``: the pre-train phase saves the encoder's state dict
    (``conv1.weight``, ...), the meta phase the whole ``MtlLearner`` (``encoder.*`` and ``base_learner.fc1_w/fc1_b``
    with their aliases ``vars.0/1``). The file names no backbone: it is read from the keys and shapes
    (:func:`detect_backbone`): the official resnet25 unless they fit another registered backbone only; where they fit
    none, the flag's backbone (or resnet25), whose strict load then names the keys that differ."""
    if any(k.startswith("encoder.") for k in sd):
        enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        head = {k[len("base_learner."):]: v for k, v in sd.items() if k.startswith("base_learner.")}
        other = sorted(k for k in sd if not k.startswith(("encoder.", "base_learner.", "pre_fc.")))
        if other:
            raise UserError(f"checkpoint {path}: unexpected keys {other[:3]}")
        pre_fc = {k[len("pre_fc."):]: v for k, v in sd.items() if k.startswith("pre_fc.")} or None
        kind, head = ("meta", _official_head(head, path)) if head else ("pre", pre_fc)
    else:
        kind, enc, head = "pre", sd, None
    fits = detect_backbone(enc)
    if backbone is not None and fits and backbone not in fits:
        raise UserError(f"checkpoint {path} (the official code's {{'params': ...}}) holds a {fits[0]}, by its keys "
                        f"and shapes, not a {backbone}; pass --backbone {fits[0]}")
    chosen = backbone or ("resnet25" if "resnet25" in fits or not fits else fits[0])
    if kind == "meta":
        spec = ModelSpec(kind="meta", backbone=chosen, way=_rows(head["weight"]), shortcut_ss=True)
    else:
        pre_head, num_classes = _pre_fc_spec(head)
        spec = ModelSpec(kind="pre", backbone=chosen, pre_head=pre_head, num_classes=num_classes)
    return Weights(spec, enc, head, OFFICIAL, path)


# ------------------------------------------------------------------------------------------------------- the loader
@dataclass
class LoadedModel(HasSpec):
    """A model rebuilt from a file (:func:`load`).

    Attributes:
        spec: what it is (:class:`models.spec.ModelSpec`).
        encoder: the encoder, ``(B, 3, S, S) -> (B, D)``, in ``eval()`` mode on the device asked for.
        init: ``meta``: the base learner's meta-learned initialisation theta, ``((way, D), (way,))`` float32 on that
            device; ``pre``: None (:meth:`head_init` draws a fresh one).
        pre_fc: ``pre``: the pre-train classifier's state dict where the file has one (the TF exporter writes it).
        path: the file named in messages; source: the adapter that read it.
    """

    spec: ModelSpec
    encoder: nn.Module
    init: tuple[torch.Tensor, torch.Tensor] | None
    pre_fc: dict[str, torch.Tensor] | None
    path: str
    source: str

    @property
    def out_dim(self) -> int:
        return self.encoder.out_dim

    def head_init(self, way: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The initialisation of a ``way``-way few-shot head: the stored base learner (meta; its way must be
        ``way``, E31), or :func:`models.heads.fresh_init` seeded with ``seed`` (pre: the "FT" baseline), on the
        encoder's device. Returns ``(way, D)``, ``(way,)``."""
        if self.init is not None:
            self.spec.check_way(way, self.path)
            return self.init
        device = next(self.encoder.parameters()).device
        w, b = fresh_init(way, self.out_dim, seed)
        return w.to(device), b.to(device)


def load(path: str, device: torch.device | str = "cpu", expect: Expect | None = None) -> LoadedModel:
    """Rebuild the model in ``path`` (any source :func:`read_weights` reads) on ``device``, checked against the
    flags ``expect`` gives, every weight loaded strictly and checked finite."""
    weights = read_weights(path, expect)
    encoder = build_encoder(weights.spec)
    load_strict(encoder, weights.encoder, f"checkpoint {weights.path}")
    init = pre_fc = None
    if weights.kind == "meta":
        check_finite_weights({f"base_learner.{k}": v for k, v in weights.head.items()}, f"checkpoint {weights.path}")
        init = (weights.head["weight"].float().to(device), weights.head["bias"].float().to(device))
    else:
        pre_fc = weights.head
    return LoadedModel(weights.spec, encoder.to(device).eval(), init, pre_fc, weights.path, weights.source)


def init_meta_model(model: MetaLearner, weights: Weights) -> None:
    """Meta-training's start: a pre-trained encoder into the SS encoder (Phi_S1 = 1, Phi_S2 = 0: the SS keys are
    absent from the file) with the base learner as built; or a meta checkpoint's encoder and base learner (to go on
    meta-training downloaded weights). Strict: a key or shape that differs is one line naming it."""
    what = f"checkpoint {weights.path}"
    load_strict(model.encoder, weights.encoder, what, allow_missing=SS_KEYS if weights.kind == "pre" else ())
    if weights.kind == "meta":
        load_strict(model.base_learner, weights.head, what)
