"""utils/distributed.py's collectives in 2 gloo processes (``torch.multiprocessing`` spawn), in float64 against the
single-process computation they replace: tolerance 1e-12 relative (float64 rounding of sums of a few hundred terms
in another order: ~n * 2**-53 ~ 1e-14, with margin).

* :class:`SyncBatchNorm2d`: forward, input / weight / bias gradients and running statistics of two shards equal
  ``nn.BatchNorm2d`` on the whole batch (unequal shard sizes);
* :func:`sync_bn_running_stats`: BN buffers after rank 0 ran passes 1-2 and rank 1 passes 3-5 equal one module
  that ran passes 1-5 in order;
* one pre-train step of resnet12_slim under DDP with :func:`convert_sync_bn` on two shards: the gradients and BN
  buffers of one process on the whole batch;
* :func:`all_reduce_grads`: sums, zero-fills a gradient missing on one rank, keeps ``None`` missing on all;
* :func:`all_gather_rows` with a rank that has no rows; :func:`gather_shards` order; :func:`on_main` raises rank
  0's ``UserError`` on every rank.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp
from torch import nn

RTOL = 1e-12


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).norm() / max(b.norm(), 1e-300)
    assert err <= RTOL, float(err)


def _worker(rank: int, port: int, q) -> None:
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from utils import distributed as D
        from utils.errors import UserError
        D.init_from_env("cpu", 60)
        torch.manual_seed(0)
        # ---- SyncBatchNorm2d against BatchNorm2d on the union of the shards (5 + 3 images)
        x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 1
        dy = torch.randn(8, 4, 3, 3, dtype=torch.float64)
        ref = nn.BatchNorm2d(4).double()
        nn.init.uniform_(ref.weight, 0.5, 1.5)
        nn.init.uniform_(ref.bias, -0.5, 0.5)
        syn = D.convert_sync_bn(nn.Sequential(nn.BatchNorm2d(4).double()))[0]
        syn.load_state_dict(ref.state_dict())
        assert type(syn) is D.SyncBatchNorm2d
        xr = x.clone().requires_grad_(True)
        y_ref = ref(xr)
        (y_ref * dy).sum().backward()
        lo, hi = (0, 5) if rank == 0 else (5, 8)
        xs = x[lo:hi].clone().requires_grad_(True)
        y = syn(xs)
        (y * dy[lo:hi]).sum().backward()
        _close(y.detach(), y_ref.detach()[lo:hi])
        _close(xs.grad, xr.grad[lo:hi])
        gw = D.all_reduce_sum(syn.weight.grad.clone())
        gb = D.all_reduce_sum(syn.bias.grad.clone())
        _close(gw, ref.weight.grad)
        _close(gb, ref.bias.grad)
        _close(syn.running_mean, ref.running_mean)
        _close(syn.running_var, ref.running_var)
        assert int(syn.num_batches_tracked) == int(ref.num_batches_tracked) == 1

        # ---- BN running statistics: rank 0 runs passes 0-1, rank 1 passes 2-4; one module runs 0-4
        batches = [torch.randn(6, 4, 2, 2, dtype=torch.float64) * (i + 1) + i for i in range(5)]
        one = nn.BatchNorm2d(4).double()
        for b in batches:
            one(b)
        mine = nn.BatchNorm2d(4).double()
        before = D.bn_state(mine)
        for b in (batches[:2] if rank == 0 else batches[2:]):
            mine(b)
        D.sync_bn_running_stats(mine, before)
        _close(mine.running_mean, one.running_mean)
        _close(mine.running_var, one.running_var)
        assert int(mine.num_batches_tracked) == 5

        # ---- gradients: summed; missing on one rank -> zeros there; missing everywhere -> stays None
        p, q_, r = (nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3))
        p.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
        if rank == 1:
            q_.grad = torch.ones(3, dtype=torch.float64)
        D.all_reduce_grads([p, q_, r])
        assert p.grad.tolist() == [3.0] * 3 and q_.grad.tolist() == [1.0] * 3 and r.grad is None

        # ---- rows and shards
        rows = D.all_gather_rows(torch.arange(6.0).view(3, 2) if rank == 0 else None)
        assert rows.tolist() == torch.arange(6.0).view(3, 2).tolist()
        assert D.gather_shards(list(D.shard(list(range(7))))) == list(range(7))
        assert list(D.shard(list(range(7)))) == ([0, 1, 2, 3] if rank == 0 else [4, 5, 6])

        # ---- one pre-train step: DDP + --sync_bn on two shards (16 + 16) = one process on the batch of 32
        from torch.nn.parallel import DistributedDataParallel

        import torch.nn.functional as F
        from models.mtl import PreLearner
        torch.manual_seed(1)
        model = PreLearner("resnet12_slim", num_classes=10, pre_head="linear").double()
        ref_m = PreLearner("resnet12_slim", num_classes=10, pre_head="linear").double()
        ref_m.load_state_dict(model.state_dict())
        xb = torch.randn(32, 3, 16, 16, dtype=torch.float64)
        yb = torch.randint(0, 10, (32,))
        F.cross_entropy(ref_m(xb), yb).backward()
        D.convert_sync_bn(model)
        ddp = DistributedDataParallel(model)
        lo, hi = (0, 16) if rank == 0 else (16, 32)
        (F.cross_entropy(ddp(xb[lo:hi]), yb[lo:hi], reduction="sum") * 2 / 32).backward()  # as train_step_distributed
        for (name, p_), q_ref in zip(model.named_parameters(), ref_m.parameters()):
            _close(p_.grad, q_ref.grad)
        for (name, buf), b_ref in zip(model.named_buffers(), ref_m.buffers()):
            if buf.is_floating_point():
                _close(buf, b_ref)

        def fail() -> None:
            raise UserError("only rank 0 sees this")
        try:
            D.on_main(fail)
            raise AssertionError("on_main did not raise")
        except UserError as e:
            assert str(e) == "only rank 0 sees this"
        D.shutdown()
        q.put((rank, "ok"))
    except BaseException:
        q.put((rank, traceback.format_exc()))


def test_collectives_in_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {0: "ok", 1: "ok"}, results
