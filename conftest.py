"""pytest: the repository root on ``sys.path`` (this file's presence), and under pytest-xdist one torch thread per
cores-per-worker.

The README's ``python -m pytest -q`` runs the tests in ``-n 2`` worker processes (``pytest.ini``). Each worker would
otherwise start ``OMP_NUM_THREADS`` intra-op threads (torch's default: all cores), so two workers on two cores ran
four, and on these tests' tiny tensors the extra threads only wait for each other. Without xdist (``-n 0``) torch's
own setting is left alone, so ``OMP_NUM_THREADS=2 python -m pytest -n 0`` still runs the tests on two threads.
"""
import os


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
