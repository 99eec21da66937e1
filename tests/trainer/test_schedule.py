import pytest

from trainer.base import scheduled_lr


def test_pretrain_schedule_matches_official_epochs():
    # reference 5.1: measured lr of the official code at epochs 1-29 -> 0.1, 30-59 -> 0.02, 60-89 -> 0.004, 90+ -> 0.0008
    lr = {e: scheduled_lr(0.1, e, 30, 0.2) for e in range(1, 111)}
    assert lr[1] == lr[29] == pytest.approx(0.1)
    assert lr[30] == lr[59] == pytest.approx(0.02)
    assert lr[60] == pytest.approx(0.004) and lr[90] == pytest.approx(0.0008) and lr[110] == pytest.approx(0.0008)


def test_meta_schedule_matches_official_epochs():
    # reference 4.1: lr1 epochs 1-9 1e-4, 10-19 5e-5, 20 2.5e-5, 50 3.1e-6, 90 1.95e-7, 100 9.8e-8
    assert scheduled_lr(1e-4, 9, 10, 0.5) == pytest.approx(1e-4)
    assert scheduled_lr(1e-4, 10, 10, 0.5) == pytest.approx(5e-5)
    assert scheduled_lr(1e-4, 20, 10, 0.5) == pytest.approx(2.5e-5)
    assert scheduled_lr(1e-4, 50, 10, 0.5) == pytest.approx(3.125e-6)
    assert scheduled_lr(1e-4, 100, 10, 0.5) == pytest.approx(9.765625e-8)


def test_floor():
    assert scheduled_lr(1e-3, 200, 10, 0.5, floor=1e-4) == pytest.approx(1e-4)
    assert scheduled_lr(1e-3, 10, 10, 0.5, floor=1e-4) == pytest.approx(5e-4)
