"""Batched image transforms: uint8 (B, H, W, 3) on any device -> float32 (B, 3, S, S) on the same device.

Two preprocessing profiles (reference section 2.5):

* ``"pytorch"`` (official PT code): images are stored at ``round(S * 92 / 80)`` (``Resize(92)`` for S = 80).
  Eval: ``CenterCrop(S)``. Train augmentation (pre-train only in the official code):
  ``RandomResizedCrop(round(S * 88 / 80), scale=(0.08, 1), ratio=(3/4, 4/3))`` -> ``CenterCrop(S)`` ->
  ``RandomHorizontalFlip(0.5)``. Normalised with the CIFAR mean [125.3, 123.0, 113.9] / 255 and std
  [63.0, 62.1, 66.7] / 255.
* ``"paper"`` (official TF code): images are stored at S. Eval: identity. Train augmentation: horizontal flip
  with p = 0.5. Pixels / 255 only.

Everything runs on whole batches: the per-image crop boxes are sampled like torchvision's
``RandomResizedCrop.get_params`` (10 tries of log-uniform ratio and uniform scale, then the fallback
center crop), but vectorised, and the crops are resampled with ``F.affine_grid`` + ``F.grid_sample`` (bilinear,
``align_corners=False``, sample positions clamped to the box: the same values as torchvision ``resized_crop``
on tensors without antialias).
Every random number comes from the ``torch.Generator`` passed to ``__call__`` (a CPU generator; the parameters
are drawn on the CPU and then moved), so the output is a function of the input and the generator state only.
Without a generator the global CPU RNG is used.

Deviation from the official PIL pipeline: bilinear resampling here has no antialiasing, which matters only
when a crop is shrunk (at most 92/88 for the default sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BatchTransform", "PREPROCESS", "CIFAR_MEAN", "CIFAR_STD", "stored_size_for"]

PREPROCESS = ("pytorch", "paper")
CIFAR_MEAN = (125.3 / 255.0, 123.0 / 255.0, 113.9 / 255.0)
CIFAR_STD = (63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10


def stored_size_for(image_size: int, preprocess: str = "pytorch") -> int:
    """The stored (decoded) image side: ``round(image_size * 92 / 80)`` for "pytorch", ``image_size`` for "paper"."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    return int(round(image_size * 92 / 80)) if preprocess == "pytorch" else int(image_size)


def _center_offset(size: int, crop: int) -> int:
    """Top/left offset of a center crop, as torchvision ``CenterCrop``: ``int(round((size - crop) / 2))``."""
    return int(round((size - crop) / 2.0))


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
    tries: int = RRC_TRIES,
) -> torch.Tensor:
    """Sample ``n`` RandomResizedCrop boxes for a (height, width) image, vectorised.

    Per image: ``tries`` candidates with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio);
    ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first candidate that fits wins and its
    top-left corner is uniform over the valid positions; if none fits, torchvision's fallback center crop.
    The number of random draws is fixed (2 * n * tries + 2 * n), so the generator advances identically every call.

    Returns:
        int64 (n, 4) CPU tensor of boxes ``(top, left, h, w)``.
    """
    dt = torch.float64
    area = float(height * width)
    u_scale = torch.rand(n, tries, generator=generator, dtype=dt)
    u_ratio = torch.rand(n, tries, generator=generator, dtype=dt)
    u_top = torch.rand(n, generator=generator, dtype=dt)
    u_left = torch.rand(n, generator=generator, dtype=dt)

    target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(u_top * (height - h + 1))
    left = torch.floor(u_left * (width - w + 1))

    # torchvision's fallback: the largest center crop whose ratio is clamped into [ratio[0], ratio[1]].
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    fb = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=dt)
    boxes = torch.stack([top, left, h, w], dim=1)
    boxes = torch.where(found[:, None], boxes, fb)
    return boxes.to(torch.int64)


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, out_size: int, keep: tuple[int, int] | None = None
) -> torch.Tensor:
    """Crop each image to its box and resize it to ``out_size`` (bilinear), in one ``grid_sample``.

    Args:
        x: float (B, C, H, W).
        boxes: (B, 4) ``(top, left, h, w)`` in pixels (any device; moved to ``x.device``).
        out_size: side of the resized crop.
        keep: optional ``(offset, size)``: return only ``[offset:offset+size]`` of the resized crop in both
            dimensions (a center crop after the resize, without computing the discarded border).

    Returns:
        float (B, C, size, size), with size = ``out_size`` or ``keep[1]``.
    """
    b, _, height, width = x.shape
    bx = boxes.detach().to(device="cpu", dtype=torch.float64)
    top, left, h, w = bx.unbind(1)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    # align_corners=False: normalised -1/+1 are the outer edges of the first/last pixel.
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    # Crop-then-resize semantics (as PIL / torchvision): sample positions are clamped to the centers of the
    # crop's edge pixels, so pixels outside the box never leak in at its border.
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], dim=1)
    theta = theta.to(device=x.device, dtype=x.dtype)
    lo = lo.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 2)
    hi = hi.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 2)
    grid = F.affine_grid(theta, [b, x.shape[1], out_size, out_size], align_corners=False)
    if keep is not None:
        off, size = keep
        grid = grid[:, off:off + size, off:off + size]
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) view of any layout -> a new contiguous float32 tensor (safe for in-place ops)."""
    return x.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


class BatchTransform:
    """uint8 (B, H, W, 3) -> float32 (B, 3, image_size, image_size), eval or train augmentation, on any device.

    Args:
        image_size: S, the side fed to the network.
        preprocess: "pytorch" (CIFAR mean/std, stored at round(S*92/80), RandomResizedCrop augmentation) or
            "paper" (/255, stored at S, flip-only augmentation).
        augment: apply the train augmentation; otherwise the deterministic eval transform.

    Inputs larger than ``image_size`` are center cropped in eval (so "paper" eval is the identity only on
    images stored at ``image_size``); "paper" augmentation center crops the same way before the flip.

    Attributes:
        stored_size: side at which ``load_split`` should store the images.
        crop_size: the RandomResizedCrop output side, round(S*88/80) ("pytorch" only; S for "paper").
    """

    def __init__(self, image_size: int, preprocess: str = "pytorch", augment: bool = False) -> None:
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.preprocess = preprocess
        self.augment = bool(augment)
        self.stored_size = stored_size_for(self.image_size, preprocess)
        self.crop_size = int(round(self.image_size * 88 / 80)) if preprocess == "pytorch" else self.image_size
        if preprocess == "pytorch":
            self.mean: tuple[float, ...] | None = CIFAR_MEAN
            self.std: tuple[float, ...] | None = CIFAR_STD
        else:
            self.mean = self.std = None

    def __repr__(self) -> str:
        return (f"BatchTransform(image_size={self.image_size}, preprocess={self.preprocess!r}, "
                f"augment={self.augment}, stored_size={self.stored_size})")

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, S, S) in 0..255 -> /255, then (x - mean) / std for "pytorch"."""
        x = x.mul_(1.0 / 255.0)
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x
        top, left = _center_offset(h, s), _center_offset(w, s)
        return x[..., top:top + s, left:left + s]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images: uint8 (B, H, W, 3) with H, W >= image_size, on any device -> float32 (B, 3, S, S), same device.

        ``generator`` (CPU) drives the augmentation; unused when ``augment`` is False.
        """
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
        b, h, w, _ = images.shape
        s = self.image_size
        if h < s or w < s:
            raise ValueError(f"images are {h}x{w}, smaller than image_size {s}")
        if b == 0:
            return torch.empty((0, 3, s, s), dtype=torch.float32, device=images.device)
        x = images.permute(0, 3, 1, 2)  # (B, 3, H, W) uint8 view
        if self.augment and self.preprocess == "pytorch":
            boxes = sample_crop_boxes(b, h, w, generator)
            off = _center_offset(self.crop_size, s)
            x = resized_crop(_to_float(x), boxes, self.crop_size, keep=(off, s))
        else:
            x = _to_float(self._center(x))  # crop the uint8 first: less to convert
        if self.augment:
            flip = torch.rand(b, generator=generator) < 0.5
            flip = flip.to(x.device).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        return self._normalise(x)
