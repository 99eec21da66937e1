"""Multi-process runs (``torchrun``): the one home of the process group and of everything the trainers share across
ranks. Built on ``torch.distributed`` only (gloo on CPU, NCCL on CUDA); the launcher is PyTorch's ``torchrun``.

One process is rank 0 of a world of 1: every function here is then a no-op (or the identity), so the trainers call
them unconditionally and a single-process run computes exactly what it computed before.

* :func:`init_from_env` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
  ``MASTER_PORT`` and joins the group with a timeout (``--dist_timeout``), so a rank that dies or hangs ends the
  run on every rank with an error instead of a hang;
* :func:`shard_range` / :func:`shard`: the contiguous block of a sequence that this rank computes (rank order =
  the sequence's order, so a gather in rank order restores it);
* :func:`gather_shards`, :func:`all_gather_rows`, :func:`broadcast_object`, :func:`on_main`: results, tensors and
  errors across ranks;
* :func:`all_reduce_grads`: the summed gradient of the meta-batch (meta-train, which has no DDP module: its
  forward is ``MetaLearner.forward_tasks``); pre-train uses ``DistributedDataParallel``;
* :func:`sync_bn_running_stats`: train-mode BatchNorm running statistics made equal to those of one process that ran
  every task in order (the EMA is an affine map per forward pass; the ranks' maps compose in rank order);
* :class:`SyncBatchNorm2d` / :func:`convert_sync_bn` (``--sync_bn``): BatchNorm with the statistics of the global
  batch on any backend (``torch.nn.SyncBatchNorm`` runs on CUDA only, and the tests here run on CPU).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import UserError

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerError(RuntimeError):
    """A collective failed because another rank died, hung past ``--dist_timeout`` or broke the connection."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node), the backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    timeout_s: float = 0.0


_INFO = DistInfo()
RANK_SEED_STRIDE = 1_000_003  # rank r's own random streams (augmentation, dropout) start at seed + r * stride


def info() -> DistInfo:
    return _INFO


def world() -> int:
    return _INFO.world


def rank() -> int:
    return _INFO.rank


def is_main() -> bool:
    """Rank 0: the one that writes logs, TensorBoard, checkpoints and results."""
    return _INFO.rank == 0


def active() -> bool:
    return _INFO.world > 1


def initialized() -> bool:
    """Whether this process has joined a process group (and not left it)."""
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) set a world size above 1 in the environment."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device_type: str, timeout_s: float) -> DistInfo:
    """Join the process group torchrun describes in the environment (nothing to do for a world of 1).

    ``device_type`` ``"cuda"`` -> NCCL (each rank on ``cuda:LOCAL_RANK``), otherwise gloo. ``timeout_s`` bounds every
    collective: a rank that waits longer for a dead or stuck peer raises instead of hanging.
    """
    global _INFO
    if not launched():
        _INFO = DistInfo()
        return _INFO
    missing = [k for k in ENV if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not; launch with "
                        "torchrun --nproc_per_node=N main.py ... (it sets them)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                            "lower --nproc_per_node or widen --gpu / CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise PeerError(f"could not join the process group at {os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']} ({backend}): {str(e).splitlines()[0]}") from e
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, float(timeout_s))
    return _INFO


def shutdown() -> None:
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo()


def _collective(fn: Callable[[], T], what: str) -> T:
    """Run a collective; a failure caused by a peer becomes one :class:`PeerError` line."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(f"rank {_INFO.rank}/{_INFO.world}: {what} failed: another rank died, hung for more than "
                        f"--dist_timeout {_INFO.timeout_s:g} s, or lost its connection ({first[:300]})") from e


def barrier() -> None:
    if active():
        # a gloo barrier honours the group timeout; a tiny all-reduce does too, on every backend
        _collective(lambda: dist.all_reduce(torch.zeros(1, device=_device())), "barrier")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _INFO.backend == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- sharding and gathering
def shard_range(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of ``n`` items that rank ``r`` of ``w`` computes: blocks in rank order,
    sizes differing by at most one (the first ``n % w`` ranks take one more)."""
    r = _INFO.rank if r is None else r
    w = _INFO.world if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(seq: Sequence[T]) -> Sequence[T]:
    start, stop = shard_range(len(seq))
    return seq[start:stop]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, produced by this program), in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * _INFO.world
    _collective(lambda: dist.all_gather_object(out, obj), "gathering results")
    return out


def gather_shards(local: list[T]) -> list[T]:
    """The concatenation, in rank order, of every rank's shard results (``local`` from :func:`shard`)."""
    if not active():
        return local
    return [x for part in all_gather_objects(local) for x in part]


def broadcast_object(obj: T, src: int = 0) -> T:
    if not active():
        return obj
    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=src), "broadcast")
    return box[0]


def all_gather_rows(local: torch.Tensor | None) -> torch.Tensor:
    """Every rank's rows ``(n_r, ...)`` (``None`` or zero rows where a rank has none), concatenated in rank order:
    ``(sum n_r, ...)`` on ``local``'s device. One small object gather for the shapes, one tensor all-gather."""
    if not active():
        assert local is not None
        return local
    meta = all_gather_objects(None if local is None or len(local) == 0 else
                              (len(local), tuple(local.shape[1:]), str(local.dtype).replace("torch.", "")))
    known = [m for m in meta if m is not None]
    if not known:
        raise ValueError("all_gather_rows: no rank has any rows")
    _, tail, dtype = known[0]
    counts = [0 if m is None else m[0] for m in meta]
    dev = local.device if local is not None else _device()
    buf = torch.zeros((max(counts), *tail), dtype=getattr(torch, dtype), device=_device())
    if counts[_INFO.rank]:
        buf[:counts[_INFO.rank]] = local.to(buf.device)
    parts = [torch.empty_like(buf) for _ in range(_INFO.world)]
    _collective(lambda: dist.all_gather(parts, buf), "gathering features")
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(dev)


def on_main(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; a :class:`UserError` it raises is raised on every rank (same message), so the
    other ranks stop too instead of waiting at the next collective."""
    err = None
    if is_main():
        try:
            fn()
        except UserError as e:
            err = str(e)
    err = broadcast_object(err)
    if err is not None:
        raise UserError(err)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks of ``t`` (returned)."""
    if active():
        _collective(lambda: dist.all_reduce(t), "all-reduce")
    return t


# --------------------------------------------------------------------------- meta-train: gradients and BN buffers
def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum each parameter's ``.grad`` over ranks, in one flat all-reduce. A parameter without a gradient on every rank
    keeps ``grad = None`` (as one process would leave it: Adam then skips it); one with a gradient on some rank gets
    zeros where it had none."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_device())
    all_reduce_sum(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in live])
    all_reduce_sum(flat)
    pos = 0
    for p in live:
        n = p.numel()
        p.grad.copy_(flat[pos:pos + n].view_as(p.grad))
        pos += n


def bn_state(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Copies of ``(running_mean, running_var, num_batches_tracked)`` of every BatchNorm with running statistics."""
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in _bns(module)]


def _bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def sync_bn_running_stats(module: nn.Module, before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Make the BN running statistics what one process would hold after running every rank's shard in rank order.

    Each train-mode forward pass updates ``r <- (1 - m) r + m s`` (``s`` the batch statistic): ``k`` passes map
    ``r0`` to ``a r0 + c`` with ``a = (1 - m)^k``. Each rank knows its own ``k`` (the change of
    ``num_batches_tracked``) and ``c = r - a r0``; composing the ranks' maps in rank order gives the single-process
    result (float rounding aside). ``before`` is :func:`bn_state` taken before the shard ran (equal on every rank).
    """
    if not active():
        return
    bns = _bns(module)
    if not bns:
        return
    local = []
    for m, (rm0, rv0, n0) in zip(bns, before):
        if m.momentum is None:
            raise UserError("BatchNorm with momentum=None (cumulative average) cannot be merged across ranks")
        k = int(m.num_batches_tracked - n0)
        a = (1.0 - m.momentum) ** k
        local.append((k, m.running_mean - a * rm0, m.running_var - a * rv0))
    parts = all_gather_objects([(k, cm.cpu(), cv.cpu()) for k, cm, cv in local])
    for i, (m, (rm0, rv0, n0)) in enumerate(zip(bns, before)):
        rm, rv = rm0.clone(), rv0.clone()
        total = 0
        for part in parts:
            k, cm, cv = part[i]
            a = (1.0 - m.momentum) ** k
            rm = a * rm + cm.to(rm.device)
            rv = a * rv + cv.to(rv.device)
            total += k
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        m.num_batches_tracked.copy_(n0 + total)


# --------------------------------------------------------------------------- synchronised BatchNorm (pre-train)
class _SyncBNFunction(torch.autograd.Function):
    """Train-mode batch normalisation of ``x (N, C, H, W)`` with the mean and (biased) variance of the global batch:
    the union of every rank's ``x``. Two-pass statistics (mean, then the squared deviations), all-reduced."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = (0, 2, 3)
        n_local = x.numel() // x.shape[1]
        stats = torch.cat([x.sum(dims), torch.tensor([float(n_local)], dtype=x.dtype, device=x.device)])
        all_reduce_sum(stats)
        n = stats[-1]
        mean = stats[:-1] / n
        xc = x - mean.view(1, -1, 1, 1)
        var = all_reduce_sum(xc.pow(2).sum(dims)) / n
        invstd = torch.rsqrt(var + eps)
        xhat = xc * invstd.view(1, -1, 1, 1)
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.mark_non_differentiable(mean, var, n)
        return xhat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xhat, weight, invstd, n = ctx.saved_tensors
        dims = (0, 2, 3)
        g = dy * weight.view(1, -1, 1, 1)
        sums = torch.cat([g.sum(dims), (g * xhat).sum(dims)])
        all_reduce_sum(sums)
        c = weight.shape[0]
        sg, sgx = sums[:c] / n, sums[c:] / n
        dx = (g - sg.view(1, -1, 1, 1) - xhat * sgx.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        return dx, (dy * xhat).sum(dims), dy.sum(dims), None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose train-mode statistics are those of the global batch (all ranks); the same
    parameters, buffers and state-dict keys; eval mode and a world of 1 are plain ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active() and self.affine and self.track_running_stats):
            return super().forward(x)
        y, mean, var, n = _SyncBNFunction.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            self.num_batches_tracked.add_(1)
        return y


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``module`` (in place) by a :class:`SyncBatchNorm2d` sharing its tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_bn(child)
    return module
