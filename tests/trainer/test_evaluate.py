"""The feature-bank path and the per-episode path give the same accuracies on the same episodes."""
import numpy as np
import torch

from data_generator.dataset_loader import ImageSet
from data_generator.meta_data_generator import fixed_episodes
from data_generator.transforms import BatchTransform
from models.resnet_mtl import build_backbone
from trainer.evaluate import encode_split, evaluate_bank, evaluate_episodic, init_head


def _imageset(n_classes=8, per_class=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (n_classes, size, size, 3))
    imgs = np.clip(protos[:, None] + rng.normal(0, 60, (n_classes, per_class, size, size, 3)), 0, 255)
    labels = np.repeat(np.arange(n_classes), per_class)
    return ImageSet(images=imgs.reshape(-1, size, size, 3).astype(np.uint8), labels=labels.astype(np.int64),
                    class_names=[f"c{i}" for i in range(n_classes)], source="synthetic")


def test_bank_equals_episodic_finetune_and_centroid():
    torch.manual_seed(0)
    ds = _imageset()
    tf = BatchTransform(16, "paper")
    enc = build_backbone("conv4", mtl=True)
    for m in enc.modules():  # non-trivial BN statistics and SS parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    eps = fixed_episodes(ds.labels, 20, 5, 2, 3, seed=3)
    w, b = init_head(5, enc.out_dim, seed=1)
    feats = encode_split(enc, ds, tf, torch.device("cpu"), batch_size=7)
    assert feats.shape == (len(ds.labels), enc.out_dim)
    for clf in ("finetune", "centroid"):
        bank = evaluate_bank(feats, eps, 5, 2, w, b, steps=15, lr=0.5, classifier=clf)
        epi = evaluate_episodic(enc, ds, tf, eps, 5, 2, w, b, steps=15, lr=0.5, device=torch.device("cpu"),
                                classifier=clf)
        assert bank.shape == (20,)
        np.testing.assert_allclose(bank, epi, atol=1e-6)
        assert bank.mean() > 0.3  # the synthetic classes are separable: well above 20% chance


def test_bank_chunking_does_not_change_results():
    ds = _imageset(seed=1)
    enc = build_backbone("conv4", mtl=False)
    feats = encode_split(enc, ds, BatchTransform(16, "paper"), torch.device("cpu"))
    eps = fixed_episodes(ds.labels, 30, 5, 1, 4, seed=0)
    w, b = init_head(5, enc.out_dim, 0)
    a = evaluate_bank(feats, eps, 5, 1, w, b, 10, 0.1, chunk=7)
    c = evaluate_bank(feats, eps, 5, 1, w, b, 10, 0.1, chunk=1000)
    np.testing.assert_array_equal(a, c)


def test_init_head_is_seeded():
    a, _ = init_head(5, 64, 3)
    b, _ = init_head(5, 64, 3)
    c, _ = init_head(5, 64, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
