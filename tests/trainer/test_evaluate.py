"""The feature-bank path and the per-episode path give the same accuracies on the same episodes
(``models/evaluate.py``, every path through a few-shot head of ``models/heads.py``)."""
import numpy as np
import torch

from data_generator.dataset_loader import ImageSet
from data_generator.meta_data_generator import episode_labels, fixed_episodes
from data_generator.transforms import BatchTransform
from models.evaluate import EvalSettings, encode_split, evaluate_bank, evaluate_episodic
from models.heads import InnerLoop, fresh_init, make_head
from models.resnet_mtl import build_backbone

def protocol(way, shot, **kw):
    """The evaluation settings the bank and per-episode paths read (way, shot; ``kw``: flip_support, amp, ...); the
    episodes' query count comes from the episodes themselves."""
    return EvalSettings(way, shot, query=1, episodes=1, seed=0, inner=InnerLoop(0, 0.0), **kw)


def head(classifier, way, w, b, steps, lr, order, loss_scale=1.0):
    """The few-shot head ``classifier`` with the inner loop of ``steps`` at ``lr`` (the ``finetune`` head's)."""
    return make_head(classifier, way, (w, b), InnerLoop(steps, lr, loss_scale), order)


def _classify(feat_s, feat_q, way, shot, w, b, steps, lr, classifier, loss_scale, order):
    """Query logits (E, n_q, way) of episodes in the layout (support label = position % way), through the head."""
    y_s = episode_labels(way, shot).to(feat_s.device).expand(feat_s.shape[0], -1)
    return head(classifier, way, w, b, steps, lr, order, loss_scale).fit(feat_s, y_s).logits(feat_q)


def _imageset(n_classes=8, per_class=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (n_classes, size, size, 3))
    imgs = np.clip(protos[:, None] + rng.normal(0, 60, (n_classes, per_class, size, size, 3)), 0, 255)
    labels = np.repeat(np.arange(n_classes), per_class)
    return ImageSet(images=imgs.reshape(-1, size, size, 3).astype(np.uint8), labels=labels.astype(np.int64),
                    class_names=[f"c{i}" for i in range(n_classes)], source="synthetic")


U32 = 2.0 ** -24


def _tie_free(feats, eps, way, shot, w, b, steps, lr, classifier):
    """(E,) bool: episodes none of whose queries has its two best float64 logits closer than twice the float32
    rounding bound of the computation, so two float32 implementations must predict every query alike.

    finetune (lr within ``stable_inner_lr``, non-expansive steps): each step adds at most a few roundings of the
    logits, none amplified: bound = (steps + 1) * 32 * u * (max |logit| + 1). centroid: a squared distance is a sum
    of D terms (directly, or through ``|q|^2 + |c|^2 - 2 q.c``), whose rounding grows like a random walk:
    bound = 8 * sqrt(D) * u * (max |q|^2 + max |c|^2 + 1)."""
    return tie_free_features(feats[torch.from_numpy(eps)], way, shot, w, b, steps, lr, classifier)


def tie_free_features(f, way, shot, w, b, steps, lr, classifier):
    """:func:`_tie_free` on the episodes' own features ``f`` (E, way * (shot + query), D) in the episode layout (e.g.
    each episode encoded alone, as the per-episode path does)."""
    f = f.double()
    n_s = way * shot
    logits = _classify(f[:, :n_s], f[:, n_s:], way, shot, w.double(), b.double(), steps, lr, classifier, 1.0,
                       order="first")
    if classifier == "finetune":
        bound = (steps + 1) * 32 * U32 * (logits.abs().max().item() + 1)
    else:
        bound = 8 * f.shape[-1] ** 0.5 * U32 * (2 * f.pow(2).sum(-1).max().item() + 1)
    top2 = logits.topk(2, dim=-1).values
    return ((top2[..., 0] - top2[..., 1]) > 2 * bound).all(dim=1).numpy()


def test_bank_equals_episodic_finetune_and_centroid():
    from models.heads import stable_inner_lr
    torch.manual_seed(0)
    ds = _imageset()
    tf = BatchTransform(16, "paper")
    enc = build_backbone("conv4", mtl=True)
    for m in enc.modules():  # non-trivial BN statistics and SS parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    eps = fixed_episodes(ds.labels, 20, 5, 2, 3, seed=3)
    w, b = fresh_init(5, enc.out_dim, seed=1)
    feats = encode_split(enc, ds, tf, torch.device("cpu"), batch_size=7)
    assert feats.shape == (len(ds.labels), enc.out_dim)
    lr = 0.9 * stable_inner_lr(feats[torch.from_numpy(eps[:, :10])]).min().item()  # inside the stable step
    for clf in ("finetune", "centroid"):
        bank = evaluate_bank(feats, eps, head(clf, 5, w, b, 15, lr, "first"), protocol(5, 2))
        epi = evaluate_episodic(enc, ds, tf, eps, head(clf, 5, w, b, 15, lr, "autograd"), protocol(5, 2),
                                torch.device("cpu"))
        assert bank.shape == (20,)
        clear = _tie_free(feats, eps, 5, 2, w, b, 15, lr, clf)
        assert clear.sum() >= 15, (clf, clear)
        np.testing.assert_array_equal(bank[clear], epi[clear])
        assert bank.mean() > 0.3  # the synthetic classes are separable: well above 20% chance


def test_bank_chunking_does_not_change_results():
    ds = _imageset(seed=1)
    enc = build_backbone("conv4", mtl=False)
    feats = encode_split(enc, ds, BatchTransform(16, "paper"), torch.device("cpu"))
    eps = fixed_episodes(ds.labels, 30, 5, 1, 4, seed=0)
    w, b = fresh_init(5, enc.out_dim, 0)
    from models.heads import stable_inner_lr
    lr = min(0.1, 0.9 * stable_inner_lr(feats[torch.from_numpy(eps[:, :5])]).min().item())
    a = evaluate_bank(feats, eps, head("finetune", 5, w, b, 10, lr, "first"), protocol(5, 1), chunk=7)
    c = evaluate_bank(feats, eps, head("finetune", 5, w, b, 10, lr, "first"), protocol(5, 1), chunk=1000)
    clear = _tie_free(feats, eps, 5, 1, w, b, 10, lr, "finetune")  # (batched matmuls of other batch counts
    assert clear.sum() >= 25                                         #  may round differently)
    np.testing.assert_array_equal(a[clear], c[clear])


def test_fresh_init_is_seeded():
    a, _ = fresh_init(5, 64, 3)
    b, _ = fresh_init(5, 64, 3)
    c, _ = fresh_init(5, 64, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bank_equals_episodic_just_inside_the_stable_inner_step():
    """The condition of models/evaluate.py: with the inner step at 0.9 of the largest non-expansive step of the
    worst episode (``stable_inner_lr``) and the paper's 100 test steps, the two paths' query logits (bank: batched
    encoding and the closed-form loop; per-episode: one-episode encoding and the autograd loop) stay within the
    bound that non-expansive steps give: each step adds at most a few float32 roundings of the logits, none is
    amplified, so |difference| <= steps * 32 * u * (max |logit| + 1), u = 2**-24. Every query whose float64
    margin between its two best logits exceeds twice that bound is predicted alike, and so the accuracies that
    ``evaluate_bank`` and ``evaluate_episodic`` report are equal wherever no query is that close to a tie."""
    from models.heads import stable_inner_lr
    torch.manual_seed(0)
    ds = _imageset(seed=2)
    tf = BatchTransform(16, "paper")
    enc = build_backbone("conv4", mtl=False).eval()
    way, shot, steps, u = 5, 2, 100, 2.0 ** -24
    eps = fixed_episodes(ds.labels, 20, way, shot, 3, seed=4)
    w, b = fresh_init(way, enc.out_dim, seed=1)
    feats = encode_split(enc, ds, tf, torch.device("cpu"), batch_size=64)
    n_s = way * shot
    f_bank = feats[torch.from_numpy(eps)]
    lr = 0.9 * stable_inner_lr(f_bank[:, :n_s]).min().item()
    with torch.no_grad():  # the per-episode path's features: each episode encoded alone, query then support
        f_epi = torch.stack([torch.cat([enc(x[n_s:]), enc(x[:n_s])]) for x in
                             (tf(torch.from_numpy(ds.images[ep])) for ep in eps)])
    f_epi = torch.cat([f_epi[:, -n_s:], f_epi[:, :-n_s]], dim=1)  # back to the episode layout
    lg_bank = _classify(f_bank[:, :n_s], f_bank[:, n_s:], way, shot, w, b, steps, lr, "finetune", 1.0, "first")
    with torch.enable_grad():
        lg_epi = torch.cat([_classify(f_epi[i:i + 1, :n_s], f_epi[i:i + 1, n_s:], way, shot, w, b, steps, lr,
                                      "finetune", 1.0, "autograd") for i in range(len(eps))]).detach()
    lg64 = _classify(f_bank[:, :n_s].double(), f_bank[:, n_s:].double(), way, shot, w.double(), b.double(), steps,
                     lr, "finetune", 1.0, order="first")
    bound = steps * 32 * u * (lg64.abs().max().item() + 1)
    diff = (lg_bank - lg_epi).abs().max().item()
    assert diff <= bound, (diff, bound)
    top2 = lg64.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * bound                      # (E, n_q) queries far from a tie
    assert clear.float().mean() > 0.9
    assert torch.equal(lg_bank.argmax(-1)[clear], lg_epi.argmax(-1)[clear])
    bank = evaluate_bank(feats, eps, head("finetune", way, w, b, steps, lr, "first"), protocol(way, shot))
    epi = evaluate_episodic(enc, ds, tf, eps, head("finetune", way, w, b, steps, lr, "autograd"),
                            protocol(way, shot), torch.device("cpu"))
    all_clear = clear.all(dim=1).numpy()
    np.testing.assert_array_equal(bank[all_clear], epi[all_clear])
    assert all_clear.sum() >= 15 and 0.3 < bank.mean() < 1.0


# ---------------------------------------------------------------- issue 20: non-finite values stop the evaluation
def _overflow_case():
    """8 classes of 6 images; class 7's images are white, and the encoder gives them features of 1e25 (finite), so
    the inner loop overflows in the one episode that holds class 7: the last of 4 (in a 2-process run, rank 1's)."""
    from data_generator.meta_data_generator import layout
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 200, (8, 6, 16, 16, 3)).astype(np.uint8)
    imgs[7] = 255
    imageset = ImageSet(images=imgs.reshape(-1, 16, 16, 3), labels=np.repeat(np.arange(8), 6).astype(np.int64),
                        class_names=[f"c{i}" for i in range(8)], source="synthetic")
    eps = np.stack([layout(np.array([[6 * c + j for j in range(3)] for c in cls]), 1)
                    for cls in ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [0, 1, 2, 3, 7])])

    class Encoder(torch.nn.Module):
        out_dim = 16

        def forward(self, x):  # x: (B, 16, 16, 3) float in [0, 255] (the identity transform below)
            white = (x.mean((1, 2, 3)) > 250).float()[:, None]
            return x.reshape(len(x), -1)[:, :16] / 255 + white * 1e25
    return imageset, eps, Encoder(), (lambda x: x.float())


def _overflow_settings(mode="bank"):
    return EvalSettings(way=5, shot=1, query=2, episodes=4, seed=0, mode=mode, phase="meta-test",
                        inner=InnerLoop(3, 0.1, flags=("--test_update_step", "--base_lr")))


def test_an_overflowing_episode_is_named_on_both_paths():
    import pytest

    from models.evaluate import evaluate
    from utils.finite import NonFiniteError
    imageset, eps, enc, tf = _overflow_case()
    w, b = fresh_init(5, 16, 0)
    for mode in ("bank", "episodic"):
        with pytest.raises(NonFiniteError) as e:
            evaluate(enc, imageset, tf, eps, w, b, _overflow_settings(mode), torch.device("cpu"))
        assert str(e.value) == ("meta-test: the inner loop gave non-finite logits in episode 4 (of 4); nothing was "
                                "written. Lower --base_lr (set to 0.1) or --test_update_step (set to 3)"), mode
    for chunk in (1, 3):  # the chunk that holds it, and the index within the chunk
        with pytest.raises(NonFiniteError) as e:
            evaluate_bank(encode_split(enc, imageset, tf, torch.device("cpu")), eps,
                          head("finetune", 5, w, b, 3, 0.1, "first"), protocol(5, 1), chunk=chunk)
        assert e.value.episode == 3
    assert len(evaluate_bank(encode_split(enc, imageset, tf, torch.device("cpu")), eps[:3],
                             head("finetune", 5, w, b, 3, 0.1, "first"), protocol(5, 1))) == 3


def _two_rank_worker(rank: int, port: int, q) -> None:
    import os
    import traceback
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from models.evaluate import evaluate
        from utils import distributed as D
        from utils.finite import NonFiniteError
        D.init_from_env("cpu", 30)  # a rank left waiting would fail after 30 s, not pass
        imageset, eps, enc, tf = _overflow_case()
        w, b = fresh_init(5, 16, 0)
        for mode in ("bank", "episodic"):  # one pair of processes for both (each start imports torch: seconds)
            try:
                evaluate(enc, imageset, tf, eps, w, b, _overflow_settings(mode), torch.device("cpu"))
                q.put((mode, rank, "no error"))
            except NonFiniteError as e:
                q.put((mode, rank, str(e)))
        D.shutdown()
    except BaseException:
        q.put(("?", rank, traceback.format_exc()))


def test_two_processes_stop_together_when_one_shard_overflows():
    """Under torchrun each rank scores its shard; only rank 1's holds the bad episode. Every rank must stop with the
    same line (found by the gather that collects the accuracies), none wait at a collective for the other."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(4):
        mode, rank, said = q.get(timeout=120)
        results.setdefault(mode, {})[rank] = said
        if mode == "?":
            break
    for p in procs:
        p.join(timeout=30)
    line = ("meta-test: the inner loop gave non-finite logits in episode 4 (of 4); nothing was written. Lower "
            "--base_lr (set to 0.1) or --test_update_step (set to 3)")
    assert results == {"bank": {0: line, 1: line}, "episodic": {0: line, 1: line}}, results
