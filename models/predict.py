"""Few-shot classification of your own images: a model from any checkpoint the project loads, the few-shot head of
meta-test fitted on a support set you give, and class probabilities for the images you ask about.

    from models.predict import FewShotPredictor
    p = FewShotPredictor.from_checkpoint("max_acc.pth", steps=100, lr=0.1)   # ours, official .pth, TF folder
    p.fit(["support/cat/1.png", "support/dog/1.png"], ["cat", "dog"])       # images (any size / mode) or features
    p.predict_proba(["query/a.png", "query/b.jpg"])   # (2, 2) float64, rows sum to 1, columns in p.classes_ order

Nothing here is a second copy of what the library has: the model and its spec come from :func:`models.loading.load`,
every image is decoded by ``data_generator.decoding`` (every Pillow mode to 8-bit RGB, shorter side to the stored
size, centre crop) and preprocessed by the model's own :class:`data_generator.transforms.BatchTransform` (its spec's
input size and preprocessing), the encoder runs batched through :func:`models.evaluate.encode_split`, and the head is
one of :data:`models.heads.HEADS` (``finetune``: the MTL inner loop, paper Eq. 3, from the checkpoint's meta-learned
initialisation, closed form as the feature-bank meta-test; ``centroid``: nearest class mean). With the same images,
head, steps and learning rate, :meth:`FewShotPredictor.predict_proba` scores exactly what ``meta_eval`` scores for an
episode of those images (``tests/test_predict.py`` checks the accuracies through both command lines).

What is decided here (README, "Few-shot on your own images"):

* **The support order.** When every class has as many support images, they are put in the episode layout
  (``data_generator.meta_data_generator.layout``: the i-th image of class k at row ``i * way + k``), the order in
  which meta-test and meta-training present a support set, so the inner loop sums in the same order as there;
  otherwise class by class.
* **Another way than the checkpoint's** (:func:`head_init_for_way`). A meta checkpoint's base learner has one row per
  class of the way it was trained with, and the official code only ever uses it at that way. For a support of that
  way the stored rows are used, row k for the k-th support class (as ``meta_eval``). For any other way, more classes
  or fewer, every row starts from the mean of the stored rows (weight and bias). Why: meta-training assigns the
  classes of each task to the rows at random (``CategoriesSampler``), so no row belongs to a class, and a start that
  treats the classes alike is the only one that does not depend on which rows are kept or repeated (the single
  shared row of UNICORN-MAML, Ye & Chao, ICLR 2022, made permutation-invariant for the same reason). Note what that
  means: a vector added to every row shifts all logits of a query by the same amount, which softmax ignores, so the
  mean-row start gives exactly the probabilities of a start from zero (the inner loop separates the classes from its
  first step, ``(softmax - onehot) X``, which differs per class). Measured on the 5-way conv4 fixture
  (``tests/data/checkpoints_v1``, glyph test classes, 600 episodes, 100 steps at lr 0.1): 3-way 1-shot 76.15 (mean
  row) vs 73.46 (the first 3 stored rows) vs 74.00 (fresh random rows); 10-way 1-shot 49.80 vs 46.86 (fresh); at its
  own 5 ways 63.99 (mean row) vs 61.44 (the stored rows): on this lightly trained checkpoint the symmetric start is
  the better one at every way (README, "Few-shot on your own images"). A pre-train checkpoint has no base learner: a
  fresh head seeded with ``seed`` (``--eval_seed``), as ``meta_eval``'s FT baseline.
* **BatchNorm with batch statistics** (``--bn_mode tf``, the TF weights): an image's features depend on its batch
  (the TF test graph is transductive), so the support (with its flips) is one batch, as in ``meta_eval``'s
  per-episode path, and the queries are encoded ``batch_size`` at a time: predictions then depend on which queries
  share a batch (a query folder of at most ``batch_size`` images is one batch, as an episode's query set).
"""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from data_generator.decoding import decode_image, fit_square, to_rgb
from data_generator.image_cache import ImageSet
from data_generator.meta_data_generator import layout
from data_generator.transforms import BatchTransform
from utils.finite import NonFiniteError, all_finite, first_nonfinite_row
from utils.gpu_tools import autocast, pick_device, to_device
from models.heads import InnerLoop, inner_loss_scale

from .bn_mode import batch_dependent
from .evaluate import encode_split, hflip
from .heads import HEADS, FewShotHead, make_head
from .loading import LoadedModel, load
from .resnet_mtl import min_image_size
from .spec import Expect

__all__ = ["FewShotPredictor", "head_init_for_way", "LOW_CONFIDENCE", "decode_images", "ImageInput"]

#: A prediction whose probability is below this is "low confidence" (marked in the contact sheet and the JSON):
#: the model gives its own answer less than even odds.
LOW_CONFIDENCE = 0.5

#: One image: a file path, a PIL image (any mode), or an array ``(H, W)`` / ``(H, W, 3)`` / ``(H, W, 4)`` uint8.
ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


# ------------------------------------------------------------------------------------------------- the images
def _decode_one(item: Any, size: int, where: str) -> np.ndarray:
    """One image -> uint8 (size, size, 3) through ``data_generator.decoding`` (every mode to RGB, resize + crop)."""
    if isinstance(item, (str, os.PathLike)):
        return decode_image(os.fspath(item), size)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"{where}: an image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        item = Image.fromarray(np.ascontiguousarray(arr))
    if isinstance(item, Image.Image):
        return fit_square(to_rgb(item, where), size)
    raise TypeError(f"{where}: an image must be a path, a PIL image or a uint8 array, not {type(item).__name__}")


def decode_images(images: Sequence[ImageInput] | np.ndarray, size: int, names: Sequence[str] | None = None
                  ) -> np.ndarray:
    """Images of any size and mode -> uint8 ``(N, size, size, 3)``: paths through ``decode_image``, PIL images and
    arrays through ``to_rgb`` + ``fit_square`` (the same conversion as a dataset's). ``images``: a sequence, or a
    batch array ``(N, H, W)`` / ``(N, H, W, 3)``. ``names``: what messages call each image (default its path or
    index)."""
    n = len(images)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        item = images[i]
        where = names[i] if names is not None else (os.fspath(item) if isinstance(item, (str, os.PathLike))
                                                     else f"image {i}")
        out[i] = _decode_one(item, size, where)
    return out


class _Lazy:
    """A sequence of images decoded on access (``[a:b]`` -> uint8 (b - a, S, S, 3)), so that a large query folder is
    decoded one encoder batch at a time (:func:`models.evaluate.encode_split` slices it batch by batch)."""

    def __init__(self, items: Sequence[ImageInput] | np.ndarray, size: int, names: Sequence[str] | None):
        self.items, self.size, self.names = items, size, names

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        idx = range(len(self.items))[key] if isinstance(key, slice) else [key]
        names = [self.names[i] for i in idx] if self.names is not None else [
            os.fspath(self.items[i]) if isinstance(self.items[i], (str, os.PathLike)) else f"image {i}" for i in idx]
        arr = decode_images([self.items[i] for i in idx], self.size, names)
        return arr if isinstance(key, slice) else arr[0]


def _is_features(x: Any) -> bool:
    """Features are a 2-D floating-point array or tensor ``(N, D)``; anything else is images."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 2 and x.is_floating_point()
    return isinstance(x, np.ndarray) and x.ndim == 2 and np.issubdtype(x.dtype, np.floating)


# ------------------------------------------------------------------------------------------------- the way rule
def head_init_for_way(model: LoadedModel, way: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The ``finetune`` head's initialisation for a ``way``-class support, and one line saying what it is (the
    module docstring gives the reasons).

    Returns:
        ``weight (way, D)``, ``bias (way,)`` float32 on the encoder's device, and the description: the stored
        meta-learned rows (meta checkpoint of this way), the mean of the stored rows repeated ``way`` times (meta
        checkpoint of another way), or a fresh head seeded with ``seed`` (pre-train checkpoint: the FT baseline).
    """
    if model.init is None:
        w, b = model.head_init(way, seed)
        return w, b, (f"a fresh {way}-way head (kaiming normal, zero bias, seed {seed}): the checkpoint is a "
                      "pre-trained encoder without a base learner (meta_eval's FT baseline)")
    w0, b0 = model.init
    trained = int(w0.shape[0])
    if way == trained:
        return w0, b0, f"the meta-learned {way}-way initialisation (row k for the k-th support class, as meta_eval)"
    w = w0.mean(0, keepdim=True).expand(way, -1).clone()
    b = b0.mean().reshape(1).expand(way).clone()
    return w, b, (f"the mean of the checkpoint's {trained} meta-learned rows, repeated for the {way} support classes "
                  f"(a {trained}-way base learner; meta-training assigns classes to rows at random, so no row belongs "
                  "to a class; under softmax this start equals a start from zero)")


# ------------------------------------------------------------------------------------------------- the predictor
class FewShotPredictor:
    """A checkpoint's model with a few-shot head: :meth:`fit` on a labelled support set, :meth:`predict_proba` for
    query images.

    Args:
        model: what :func:`models.loading.load` returned (or use :meth:`from_checkpoint`).
        head: a name of :data:`models.heads.HEADS`: ``finetune`` (the MTL inner loop, Eq. 3) or ``centroid``.
        steps, lr: the inner loop's steps and step size (``finetune``; ``--test_update_step``, ``--base_lr``).
        inner_loss: ``mean`` (official PyTorch) or ``sum`` (TF: way x the mean; :func:`models.heads.inner_loss_scale`).
        flip_support: the support set also holds each image's horizontal flip (``--test_flip_support``).
        image_size, preprocess: the model's input; default the checkpoint's spec. Files that do not record it (the
            official PyTorch ``.pth``, the TF folder) need them (80 / ``pytorch`` and 84 / ``paper`` respectively).
        seed: the fresh head's seed for a pre-train checkpoint (``--eval_seed``).
        batch_size: images per encoder batch (``--eval_batch_size``); amp: :func:`utils.gpu_tools.autocast`'s request.
        progress: a progress bar over the encoder batches.

    Attributes (after :meth:`fit`): ``classes_`` (way,) the class labels in column order (sorted), ``counts_`` the
    support images per class, ``init_note`` what the head started from.
    """

    def __init__(self, model: LoadedModel, head: str = "finetune", steps: int = 100, lr: float = 0.01,
                 inner_loss: str = "mean", flip_support: bool = False, image_size: int | None = None,
                 preprocess: str | None = None, seed: int = 1, batch_size: int = 256, amp: bool | str = False,
                 progress: bool = False) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown few-shot head {head!r}; registered: {', '.join(HEADS)}")
        if steps < 0 or not lr > 0 or batch_size < 1:
            raise ValueError(f"steps >= 0, lr > 0 and batch_size >= 1 are needed, got {steps}, {lr}, {batch_size}")
        self.model, self.head_name, self.steps, self.lr = model, head, int(steps), float(lr)
        self.inner_loss, self.flip_support, self.seed = inner_loss, bool(flip_support), int(seed)
        self.batch_size, self.amp, self.progress = int(batch_size), amp, bool(progress)
        size = image_size or model.spec.image_size
        prep = preprocess or model.spec.preprocess
        if size is None or prep is None:
            raise ValueError(f"{model.path} does not record its input ({model.source} file): pass image_size and "
                             "preprocess (the official PyTorch code: 80, 'pytorch'; the TF weights: 84, 'paper')")
        if size < min_image_size(model.spec.backbone):
            raise ValueError(f"image_size {size} is too small for a {model.spec.backbone} (at least "
                             f"{min_image_size(model.spec.backbone)} px)")
        self.transform = BatchTransform(int(size), prep, augment=False)
        self.device = next(model.encoder.parameters()).device
        self.head: FewShotHead | None = None
        self.classes_: list = []
        self.counts_: list[int] = []
        self.init_note = ""

    @classmethod
    def from_checkpoint(cls, path: str, head: str = "finetune", steps: int = 100, lr: float = 0.01,
                        device: str | torch.device = "cpu", expect: Expect | None = None,
                        **kwargs: Any) -> "FewShotPredictor":
        """Load ``path`` (our pre / meta ``.pth``, the official PyTorch ``.pth``, a TF ``.npy`` folder) on ``device``
        (``auto``: CUDA when there is one) and wrap it; ``kwargs`` are the constructor's. A file that does not load
        raises :class:`utils.errors.UserError` with one line."""
        dev = pick_device(device) if isinstance(device, str) else device
        return cls(load(path, dev, expect), head=head, steps=steps, lr=lr, **kwargs)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def way(self) -> int:
        return len(self.classes_)

    @property
    def stored_size(self) -> int:
        """The side images are decoded to before the model's preprocessing (``BatchTransform.stored_size``)."""
        return self.transform.stored_size

    @property
    def inner(self) -> InnerLoop:
        """The inner loop of the fitted head (Eq. 3): ``steps`` at ``lr`` on the support loss of this way."""
        copies = 2 if self.flip_support else 1
        return InnerLoop(self.steps, self.lr, inner_loss_scale(self.inner_loss, max(self.way, 1), copies),
                         flags=("--test_update_step", "--base_lr"))

    def describe_head(self) -> str:
        """One line: the head, its inner loop and what it starts from (after :meth:`fit`)."""
        if self.head_name == "centroid":
            return "centroid (nearest class mean of the support features)"
        flip = ", support with its horizontal flips" if self.flip_support else ""
        return (f"finetune (the MTL inner loop, Eq. 3): {self.steps} steps at lr {self.lr:g} on the {self.inner_loss} "
                f"cross-entropy{flip}, from {self.init_note}")

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, images: Sequence[ImageInput] | np.ndarray, names: Sequence[str] | None = None,
               desc: str = "encode", source: str = "images", flipped: bool = False) -> torch.Tensor:
        """Images of any size and mode -> features ``(N, D)`` float32 on the model's device, ``batch_size`` images per
        encoder pass (decoded batch by batch). ``names``: the images' names in messages; ``flipped``: encode their
        horizontal flips."""
        names = list(names) if names is not None else None
        n = len(images)
        if n == 0:
            return torch.zeros(0, self.model.out_dim, device=self.device)
        imageset = ImageSet(_Lazy(images, self.stored_size, names), np.zeros(n, np.int64), ["?"], source,
                            files=names)
        return self.encode_set(imageset, desc, flipped)

    def encode_set(self, imageset: ImageSet, desc: str = "encode", flipped: bool = False) -> torch.Tensor:
        """The images of an :class:`~data_generator.image_cache.ImageSet` (a split :func:`load_split` read, decoded
        at :attr:`stored_size`) -> features ``(N, D)`` float32, ``batch_size`` images per encoder pass."""
        if not batch_dependent(self.model.encoder):
            try:
                return encode_split(self.model.encoder, imageset, self.transform, self.device, self.batch_size,
                                    self.amp, self.progress, desc=desc, flipped=flipped)
            except NonFiniteError as e:
                raise self._nonfinite_features(imageset, e.image) from None
        return self._encode_batches(imageset, flipped)

    def _encode_batches(self, imageset: ImageSet, flipped: bool) -> torch.Tensor:
        """A batch-dependent encoder (``--bn_mode tf``): ``batch_size`` images per pass, each batch normalised by its
        own statistics (module docstring)."""
        from tqdm import tqdm
        out = []
        n = len(imageset)
        with torch.inference_mode():
            for start in tqdm(range(0, n, self.batch_size), desc="encode", disable=not self.progress, leave=False):
                chunk = np.asarray(imageset.images[start:start + self.batch_size])
                out.append(self._forward(hflip(chunk) if flipped else chunk))
        feats = torch.cat(out)
        if not all_finite(feats):
            raise self._nonfinite_features(imageset, first_nonfinite_row(feats))
        return feats

    def _forward(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, D) float32: the model's preprocessing, then one encoder pass (eval mode)."""
        self.model.encoder.eval()
        with torch.inference_mode(), autocast(self.device, self.amp):
            x = self.transform(to_device(torch.from_numpy(np.ascontiguousarray(images)), self.device))
            return self.model.encoder(x).float()

    def _nonfinite_features(self, imageset: ImageSet, image: int | None) -> NonFiniteError:
        name = imageset.files[image] if imageset.files and image is not None else f"image {image}"
        return NonFiniteError(f"predict: the encoder gave non-finite features for {name} of {imageset.source}",
                              "The encoder's weights are finite but overflow float32 on it: check the checkpoint",
                              kind="features")

    def _support_features(self, images: Sequence[ImageInput] | np.ndarray, names: Sequence[str] | None,
                          source: str) -> torch.Tensor:
        """The support's features ``(n_s, D)``, followed by its flips' with ``flip_support`` (``(2 n_s, D)``). A
        batch-dependent encoder sees the support (and its flips) as one batch, as ``meta_eval``'s per-episode path."""
        if not batch_dependent(self.model.encoder):
            f = self.encode(images, names, desc="encode support", source=source)
            if self.flip_support:
                f = torch.cat([f, self.encode(images, names, desc="encode support (flipped)", source=source,
                                              flipped=True)])
            return f
        decoded = decode_images(images, self.stored_size, names)
        batch = np.concatenate([decoded, hflip(decoded)]) if self.flip_support else decoded
        f = self._forward(batch)
        if not all_finite(f):
            row = first_nonfinite_row(f) % len(decoded)
            raise self._nonfinite_features(ImageSet(decoded, np.zeros(len(decoded), np.int64), ["?"], source,
                                                    files=list(names) if names is not None else None), row)
        return f

    # ------------------------------------------------------------------------------------------ fit / predict
    def fit(self, support: Sequence[ImageInput] | np.ndarray | torch.Tensor, labels: Sequence,
            names: Sequence[str] | None = None, source: str = "support") -> "FewShotPredictor":
        """Fit the head on a labelled support set.

        Args:
            support: images (paths, PIL images, uint8 arrays of any size; or a batch ``(N, H, W[, 3])`` uint8), or
                their features ``(N, D)`` float (from :meth:`encode`; not with ``flip_support``).
            labels: ``(N,)`` the class of each (any sortable values: names or numbers); at least 2 classes.
            names: the images' names in messages (default their paths).
        Returns:
            ``self``; ``classes_`` holds the classes in column order (sorted).
        """
        labels = [v.item() if isinstance(v, np.generic) else v for v in labels]  # numpy scalars as Python values
        if len(labels) != len(support):
            raise ValueError(f"fit: {len(support)} support items but {len(labels)} labels")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"fit: a few-shot head needs at least 2 classes, the support has {len(classes)}")
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[c] for c in labels], dtype=np.int64)
        counts = np.bincount(y, minlength=len(classes))
        order = np.argsort(y, kind="stable")                                       # class by class
        if (counts == counts[0]).all():                                            # the episode layout
            order = layout(order.reshape(len(classes), counts[0]), int(counts[0]))
        self.classes_, self.counts_ = classes, [int(c) for c in counts]
        y_t = torch.from_numpy(y[order]).to(self.device)
        if _is_features(support):
            if self.flip_support:
                raise ValueError("fit: flip_support needs the support images, not their features")
            feats = torch.as_tensor(support, dtype=torch.float32)[torch.from_numpy(order)].to(self.device)
        else:
            items = [support[i] for i in order]
            feats = self._support_features(items, [names[i] for i in order] if names is not None else None, source)
        if self.flip_support:
            y_t = torch.cat([y_t, y_t])
        w0 = b0 = None
        self.init_note = "nothing (nearest class mean)"
        if self.head_name != "centroid":
            w0, b0, self.init_note = head_init_for_way(self.model, self.way, self.seed)
        self.head = make_head(self.head_name, self.way, (w0, b0) if w0 is not None else None, self.inner,
                              order="first")
        self.head.fit(feats[None], y_t[None])
        return self

    def logits(self, query: Sequence[ImageInput] | np.ndarray | torch.Tensor, names: Sequence[str] | None = None,
               source: str = "query") -> torch.Tensor:
        """Query images (or features ``(N, D)``) -> logits ``(N, way)`` float32 (columns in ``classes_`` order)."""
        if self.head is None:
            raise RuntimeError("call fit(support, labels) before predicting")
        feats = (torch.as_tensor(query, dtype=torch.float32).to(self.device) if _is_features(query)
                 else self.encode(query, names, desc="encode query", source=source))
        if len(feats) == 0:
            return torch.zeros(0, self.way, device=self.device)
        with torch.no_grad():
            logits = self.head.logits(feats[None])[0]
        if not all_finite(logits):
            what, advice = HEADS[self.head_name].nonfinite(self.inner)
            raise NonFiniteError(f"predict: {what} gave non-finite logits", advice, kind="logits")
        return logits

    def predict_proba(self, query: Sequence[ImageInput] | np.ndarray | torch.Tensor,
                      names: Sequence[str] | None = None, source: str = "query") -> np.ndarray:
        """Class probabilities ``(N, way)`` float64 (softmax of :meth:`logits` in float64: each row sums to 1 up to
        float64 rounding), columns in ``classes_`` order."""
        return torch.softmax(self.logits(query, names, source).double(), dim=-1).cpu().numpy()

    def predict(self, query: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> list:
        """The most probable class of each query (``(N,)`` values of ``classes_``; ties to the first column)."""
        return [self.classes_[i] for i in self.predict_proba(query).argmax(1)]

