"""One evaluation routine for pre-train validation, meta-validation and meta-test.

Every evaluation scores its episodes with a few-shot head of ``models/heads.py`` (``EvalSettings.classifier``, a key
of :data:`models.heads.HEADS`: ``finetune``, the MTL base learner's inner loop from its initialisation; ``centroid``,
nearest class mean; any registered one): ``head.fit(support features, labels)`` then ``head.logits(query
features)``, the same head meta-training calls.

Evaluation episodes are fixed (``fixed_episodes`` with ``--eval_seed``), so every checkpoint and every method
is compared on the same episodes. Two paths compute the same numbers:

* **feature bank** (default, ``--eval_mode bank``): with the encoder in eval mode its features do not depend
  on the batch, so each image of the split is encoded once; then all episodes' inner loops run together on
  the stored features, ``(E, way, D)`` fast weights and batched matmuls, with the closed-form gradient.
* **episodic** (``--eval_mode episodic``): the straightforward reference, one episode at a time through the
  encoder (query, then support, as the official ``meta_forward`` and ``MetaLearner.forward_tasks``) and an autograd inner loop.

When the two agree: in exact arithmetic they are the same function (``tests/trainer/test_speed_paths.py`` checks
this in float64). In float32 they round differently (batched vs one-episode encoder passes, closed-form vs autograd
gradients), and the inner loop decides whether those last-bit differences stay small: while the inner step is
within the stable range of gradient descent on the support loss, ``lr <= models.heads.stable_inner_lr(features)``
(``4 n_s / (loss_scale * lambda_max([X, 1]^T [X, 1]))``), each step is non-expansive and the two paths' logits stay
within float32 rounding of each other, so the accuracies are the same unless a query's two best logits are tied
to within that rounding. Far outside it (large unnormalised features, e.g. squared norm ~1,600 as a ResNet-25 with
freshly initialised BatchNorm gives, at lr 0.01 for 100 steps) rounding is amplified at every step and the two
paths' logits drift apart (by ~2 after 100 steps), so some accuracies differ. ``tests/trainer/test_evaluate.py``
tests the equality at 0.9 of the stable step. "Identical" is per machine: the same numbers on the same machine
and thread count, close but not bit-identical on another CPU.

Non-finite values stop the evaluation (``utils/finite.py``): a NaN or an infinity in the features of a split (one
check per split, after encoding), in the logits of a chunk of episodes (one per chunk, with its accuracies) or of an
episode (episodic path, with its accuracy) raises :class:`utils.finite.NonFiniteError` naming the phase
(``EvalSettings.phase``), the episode or the image, and the flags to change (``InnerLoop.hint``): an overflowing
inner loop would otherwise score every query as class 0, a chance-level accuracy that looks like a result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_generator.meta_data_generator import by_class, episode_classes, episode_labels
from utils import distributed
from utils.finite import NonFiniteError, all_finite, first_nonfinite_row
from utils.gpu_tools import autocast, to_device
from utils.misc import mean_ci

from .bn_mode import batch_dependent
from .heads import HEADS, FewShotHead, InnerLoop, make_head

if TYPE_CHECKING:  # (annotations only)
    from data_generator.dataset_loader import ImageSet

__all__ = ["EvalSettings", "hflip", "encode_split", "encode_bank", "evaluate", "evaluate_bank", "evaluate_episodic",
           "class_accuracy"]


@dataclass(frozen=True)
class EvalSettings:
    """One few-shot evaluation (pre-train validation, meta-validation, meta-test): ``episodes`` fixed episodes of
    ``way`` x (``shot`` + ``query``) drawn with ``seed``; ``mode`` bank | episodic; ``classifier`` the few-shot head
    (a key of :data:`models.heads.HEADS`: finetune, the inner loop ``inner``; centroid, nearest class mean);
    ``flip_support``: the support set also holds each support image's horizontal flip (the TF test protocol's
    ``base_augmentation``). ``config/settings.py`` builds the three of a run from the flags."""

    way: int
    shot: int
    query: int
    episodes: int
    seed: int
    inner: InnerLoop
    mode: str = "bank"
    classifier: str = "finetune"
    batch_size: int = 256
    amp: bool | str = False  # utils.gpu_tools.amp_mode: off | auto | bfloat16 (a bool: --amp alone)
    progress: bool = False
    flip_support: bool = False
    phase: str = "evaluation"  # named in messages: pre-train validation, meta-validation, meta-test


def hflip(images: np.ndarray) -> np.ndarray:
    """Horizontal flips of uint8 images ``(N, H, W, 3)`` (``cv2.flip(img, 1)`` of the TF code)."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1])


@torch.no_grad()
def encode_split(encoder: nn.Module, imageset: ImageSet, transform, device: torch.device,
                 batch_size: int = 256, amp: bool | str = False, progress: bool = False,
                 desc: str = "encode", flipped: bool = False) -> torch.Tensor:
    """Encode every image of a split once (``flipped``: its horizontal flip), in eval mode.

    Returns:
        ``(N, D)`` float32 features on ``device``, row i for ``imageset.images[i]``.
    """
    if batch_dependent(encoder):
        raise ValueError("this encoder's features depend on the batch (BatchNorm without running statistics, "
                         "--bn_mode tf): evaluate it episode by episode (eval_mode 'episodic')")
    was_training = encoder.training
    encoder.eval()
    out = []
    n = len(imageset.labels)
    starts = range(0, n, batch_size)
    lo, hi = distributed.shard_range(len(starts))  # torchrun: each rank encodes a block of the same batches
    with torch.inference_mode():
        for start in tqdm(starts[lo:hi], desc=desc, disable=not progress, leave=False):
            chunk = np.array(imageset.images[start:start + batch_size])
            x = to_device(torch.from_numpy(hflip(chunk) if flipped else chunk), device)
            with autocast(device, amp):
                out.append(encoder(transform(x)).float())
    encoder.train(was_training)
    if distributed.active():
        feats = distributed.all_gather_rows(torch.cat(out) if out else None)  # every rank checks the same rows
    else:
        feats = torch.cat(out).clone()
    if not all_finite(feats):  # one check for the split
        raise _nonfinite(None, imageset, "features", image=first_nonfinite_row(feats), flipped=flipped)
    return feats


def _nonfinite(ev: EvalSettings | None, imageset: ImageSet | None, kind: str, episode: int | None = None,
               n_episodes: int = 0, image: int | None = None, flipped: bool = False) -> NonFiniteError:
    """The one-line error for non-finite ``kind`` ("features" or "logits"): the phase, the episode (0-based here,
    1-based in the message) or the image (its index in the split and its file, or class), the flags to change."""
    phase = ev.phase if ev is not None else "evaluation"
    amp = ", or drop --amp" if ev is not None and ev.amp and ev.amp != "off" else ""
    where = f" in episode {episode + 1} (of {n_episodes})" if episode is not None else ""
    if kind == "features":
        name = ""
        if imageset is not None and image is not None:
            label = (imageset.files[image] if imageset.files else
                     f"class {imageset.class_names[int(imageset.labels[image])]}")
            name = f" {image} of {imageset.source} ({label}{', flipped' if flipped else ''})"
        what = f"{phase}: the encoder gave non-finite features for image{name}{where}"
        advice = f"The encoder's weights are finite but overflow float32 on it: check the checkpoint{amp}"
    else:  # the head says what gave the logits and what to do
        head, advice = HEADS[ev.classifier if ev is not None else "finetune"].nonfinite(ev.inner if ev else None)
        what = f"{phase}: {head} gave non-finite logits{where}"
        advice += amp
    err = NonFiniteError(what, advice, kind=kind)
    err.episode, err.image, err.flipped = episode, image, flipped
    return err


def encode_bank(encoder: nn.Module, imageset: ImageSet, transform, ev: EvalSettings, device: torch.device,
                desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The feature bank of a split for the evaluation ``ev``: every image encoded once (:func:`encode_split`), and
    with ``ev.flip_support`` every image's horizontal flip too. Several heads scored on one encoder share it
    (``evaluate(..., features=...)``: ``--phase compare`` encodes each test image once per model).

    Returns:
        ``(features (N, D), flipped features (N, D) or None)``.
    Raises:
        :class:`utils.finite.NonFiniteError` naming the phase and the image, for a non-finite feature.
    """
    try:
        feats = encode_split(encoder, imageset, transform, device, ev.batch_size, ev.amp, ev.progress, desc=desc)
        flipped = None
        if ev.flip_support:
            flipped = encode_split(encoder, imageset, transform, device, ev.batch_size, ev.amp, ev.progress,
                                   desc=desc + " (flipped)", flipped=True)
    except NonFiniteError as e:
        raise _nonfinite(ev, imageset, "features", image=e.image, flipped=e.flipped) from None
    return feats, flipped


def evaluate(encoder: nn.Module, imageset: ImageSet, transform, episodes: np.ndarray, init_w: torch.Tensor,
             init_b: torch.Tensor, ev: EvalSettings, device: torch.device, desc: str = "encode",
             features: tuple[torch.Tensor, torch.Tensor | None] | None = None,
             return_class_acc: bool = False) -> tuple:
    """The one evaluation entry point (pre-train validation, meta-validation, meta-test, ``--phase compare``).

    Args:
        episodes: ``(E, way * (shot + query))`` fixed episodes (``fixed_episodes``) of ``imageset``.
        init_w, init_b: ``(way, D)``, ``(way,)`` the base learner's initialisation (the heads that start from one:
            ``finetune``).
        ev: the evaluation's settings: the inner loop, bank or episodic, the head (``ev.classifier``), batch size,
            AMP.
        features: bank mode: the split's bank from :func:`encode_bank` for this ``encoder`` (not encoded again);
            None: encoded here.
        return_class_acc: also return each episode's per-class query accuracy.
    Returns:
        ``(mean, ci95, accuracies (E,))`` with accuracies in [0, 1]; with ``return_class_acc`` a fourth element,
        ``(E, way)`` float32: the query accuracy of each episode label (column k: the class
        ``episode_classes(episode, labels, way)[k]``).
    """
    n_all = len(episodes)
    first, _ = distributed.shard_range(n_all)
    episodes = distributed.shard(episodes)  # torchrun: each rank scores a block of the episodes; gathered below
    if ev.mode != "episodic":  # (the features of the whole split: every rank holds and checks the same)
        feats, flipped = features if features is not None else encode_bank(encoder, imageset, transform, ev,
                                                                            device, desc)
    bad = None  # this rank's first non-finite finding: (kind, global episode, image, flipped)
    class_accs = np.zeros((0, ev.way), np.float32)
    try:
        if ev.mode == "episodic":  # the per-episode reference: the autograd inner loop
            head = make_head(ev.classifier, ev.way, (init_w, init_b), ev.inner, order="autograd")
            accs = evaluate_episodic(encoder, imageset, transform, episodes, head, ev, device, return_class_acc=True)
        else:  # the bank: all episodes batched, the closed-form inner loop
            head = make_head(ev.classifier, ev.way, (init_w, init_b), ev.inner, order="first")
            accs = evaluate_bank(feats, episodes, head, ev, flipped_features=flipped, return_class_acc=True) \
                if len(episodes) else (np.zeros(0, np.float32), class_accs)
        accs, class_accs = accs
    except NonFiniteError as e:
        bad, accs = (e.kind, first + e.episode, e.image, e.flipped), np.zeros(0, np.float32)
    if distributed.active():  # every rank learns of a finding on any rank, so all stop together
        parts = distributed.all_gather_objects((accs, class_accs, bad))
        accs = np.concatenate([a for a, _, _ in parts]).astype(np.float32)
        class_accs = np.concatenate([c for _, c, _ in parts]).astype(np.float32)
        bad = next((b for _, _, b in parts if b is not None), None)
    if bad is not None:
        kind, episode, image, flipped = bad
        raise _nonfinite(ev, imageset, kind, episode, n_all, image, flipped)
    mean, ci = mean_ci(accs)
    return (mean, ci, accs, class_accs) if return_class_acc else (mean, ci, accs)


def evaluate_bank(features: torch.Tensor, episodes: np.ndarray, head: FewShotHead, ev: EvalSettings,
                  flipped_features: torch.Tensor | None = None, chunk: int = 500,
                  return_class_acc: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run all episodes on stored features, ``chunk`` episodes at a time: ``head`` is fitted on the chunk's
    support sets together (T = the chunk's episodes) and scores their queries.

    Args:
        features: ``(N, D)`` from :func:`encode_split`.
        episodes: ``(E, way * (shot + query))`` image indices in episode layout.
        head: the few-shot head (``models/heads.py``; the bank's ``finetune`` runs the closed-form loop, ``order
            first``).
        ev: the evaluation's protocol (``way``, ``shot``, ``flip_support``).
        flipped_features: ``(N, D)`` features of the flipped images, given exactly when ``ev.flip_support``: the
            support set becomes ``(E, 2 * way * shot, D)``, the support then its flips (labels ``position % way``
            throughout).
        return_class_acc: also return the ``(E, way)`` per-class query accuracies (episode label order).
    Returns:
        ``(E,)`` query accuracies in [0, 1] (with ``return_class_acc``: and the ``(E, way)`` ones).
    Raises:
        :class:`utils.finite.NonFiniteError` at the first chunk whose logits hold a NaN or an infinity (``episode``:
        the first such episode, 0-based).
    """
    if ev.flip_support != (flipped_features is not None):
        raise ValueError("evaluate_bank: flipped_features must be given exactly when ev.flip_support is set")
    way, shot = ev.way, ev.shot
    n_s = way * shot
    accs, class_accs = [], []
    idx_all = torch.from_numpy(np.asarray(episodes, dtype=np.int64))
    for start in range(0, len(idx_all), chunk):
        idx = idx_all[start:start + chunk].to(features.device)
        f = features[idx]                                                     # (e, n, D)
        f_s, k = f[:, :n_s], shot
        if flipped_features is not None:
            f_s, k = torch.cat([f_s, flipped_features[idx[:, :n_s]]], dim=1), 2 * shot   # (e, 2 n_s, D)
        y_s = episode_labels(way, k).to(features.device).expand(len(idx), -1)
        logits = head.fit(f_s, y_s).logits(f[:, n_s:])
        y_q = episode_labels(way, (idx.shape[1] - n_s) // way).to(features.device)
        hit = (logits.argmax(-1) == y_q).float()                             # (e, n_q)
        acc = hit.mean(1)
        per_class = [by_class(hit, way, dim=1).mean(1).reshape(-1)] if return_class_acc else []   # (e * way,)
        out = torch.cat([acc, *per_class, torch.isfinite(logits).all().float()[None]]).cpu()  # one transfer
        if not out[-1]:
            raise _nonfinite(None, None, "logits", start + first_nonfinite_row(logits), len(idx_all))
        accs.append(out[:len(idx)])
        class_accs.append(out[len(idx):-1].view(-1, way))
    accs_np = torch.cat(accs).numpy()
    if not return_class_acc:
        return accs_np
    return accs_np, torch.cat(class_accs).numpy() if class_accs else np.zeros((0, way), np.float32)


def evaluate_episodic(encoder: nn.Module, imageset: ImageSet, transform, episodes: np.ndarray, head: FewShotHead,
                      ev: EvalSettings, device: torch.device,
                      return_class_acc: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The per-episode reference path: each episode's images go through the encoder (eval mode) and ``head`` is
    fitted and scores it, one episode at a time (``evaluate`` gives the ``finetune`` head the autograd inner loop,
    ``order autograd``). From ``ev``: ``way``, ``shot``, ``progress``; ``amp``: the encoder runs under
    :func:`utils.gpu_tools.autocast` and its features are cast back to float32, as in :func:`encode_split`.
    The query is one batch, the support another (with ``ev.flip_support``: the support images then their horizontal
    flips, ``(2 * way * shot, 3, S, S)``, as the TF test graph's ``inputa``).

    Returns:
        ``(E,)`` query accuracies in [0, 1] (with ``return_class_acc``: and the ``(E, way)`` per-class ones).
    Raises:
        :class:`utils.finite.NonFiniteError` at the first episode whose features or logits hold a NaN or an infinity
        (``episode`` 0-based, ``image`` the split index of the first such image).
    """
    way, shot, amp = ev.way, ev.shot, ev.amp
    was_training = encoder.training
    encoder.eval()
    n_s = way * shot
    accs, class_accs = [], []
    for i, ep in enumerate(tqdm(episodes, desc="episodes", disable=not ev.progress, leave=False)):
        images = np.ascontiguousarray(imageset.images[ep])
        x = transform(to_device(torch.from_numpy(images), device))
        x_s, k = x[:n_s], shot
        if ev.flip_support:
            x_s = torch.cat([x_s, transform(to_device(torch.from_numpy(hflip(images[:n_s])), device))])
            k = 2 * shot
        with torch.no_grad(), autocast(device, amp):
            f_q = encoder(x[n_s:]).float()
            f_s = encoder(x_s).float()
        with torch.enable_grad():
            logits = head.fit(f_s[None], episode_labels(way, k).to(device)[None]).logits(f_q[None])
        y_q = episode_labels(way, (len(ep) - n_s) // way).to(device)
        hit = (logits[0].argmax(-1) == y_q).float()
        acc = hit.mean()
        checks = torch.stack([torch.isfinite(f_q).all(), torch.isfinite(f_s).all(), torch.isfinite(logits).all()])
        per_class = by_class(hit, way).mean(0) if return_class_acc else hit[:0]              # (way,) or empty
        acc, ok_q, ok_s, ok_logits, *cls = torch.cat([acc[None], checks.float(), per_class]).tolist()  # one sync
        if not (ok_q and ok_s and ok_logits):
            encoder.train(was_training)
            if not ok_q:
                raise _nonfinite(None, imageset, "features", i, len(episodes), int(ep[n_s + first_nonfinite_row(f_q)]))
            if not ok_s:
                row = first_nonfinite_row(f_s)
                raise _nonfinite(None, imageset, "features", i, len(episodes), int(ep[row % n_s]), row >= n_s)
            raise _nonfinite(None, None, "logits", i, len(episodes))
        accs.append(acc)
        class_accs.append(cls)
    encoder.train(was_training)
    accs_np = np.asarray(accs, dtype=np.float32)
    if not return_class_acc:
        return accs_np
    return accs_np, np.asarray(class_accs, dtype=np.float32).reshape(len(accs), way)


def class_accuracy(class_accs: np.ndarray, episodes: np.ndarray, labels: np.ndarray,
                   class_names: list[str]) -> dict[str, dict[str, float | int]]:
    """Per test class: the query accuracy over the episodes it appeared in (each episode has the same number of
    queries of each of its classes, so this is the fraction of all its queries classified right), and that count.

    Args:
        class_accs: ``(E, way)`` from ``evaluate(..., return_class_acc=True)``, episode label order.
        episodes: ``(E, way * (shot + query))`` the episodes they were scored on; labels ``(N,)`` and class_names
            ``(C,)`` of the split.
    Returns:
        ``{class name: {"acc": % (4 decimals), "episodes": n}}`` for the classes that appeared, in split order.
    """
    way = class_accs.shape[1]
    ids = np.stack([episode_classes(ep, labels, way) for ep in episodes]) if len(episodes) else \
        np.zeros((0, way), np.int64)                                              # (E, way) dataset class ids
    n = np.bincount(ids.reshape(-1), minlength=len(class_names))
    total = np.bincount(ids.reshape(-1), weights=class_accs.reshape(-1).astype(np.float64), minlength=len(class_names))
    return {class_names[c]: {"acc": round(100 * float(total[c] / n[c]), 4), "episodes": int(n[c])}
            for c in range(len(class_names)) if n[c]}
