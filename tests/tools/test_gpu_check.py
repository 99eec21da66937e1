"""tools/gpu_check.py (issue #14) at toy sizes on the CPU: the same steps as on a GPU, one JSON of every figure.

The real dry run starts each ``main.py`` run as a subprocess, as on the GPU (8 interpreters that import torch: most
of its minute on 2 cores), so it is ``slow`` (``python -m pytest -m slow``, run by CI). The README's command runs the
pipeline steps of the same dry run with those runs in this process (``main.cli``), with the same checks but the
official recipe's (its ResNet-25 checkpoints cost 10 s to write), and ``run_main``'s subprocess handling on its own."""
import contextlib
import io
import json
import os
import time

import pytest

import main
from tools import gpu_check


def _check_dry_run(res: dict, out, official: bool = True) -> None:
    on_disk = json.loads((out / "gpu_check.json").read_text())
    assert on_disk["device"] == res["device"] and on_disk["tiny"] is True
    assert set(on_disk["checks"]) == {"fp32_ok", "amp_ok", "amp_eval_within_tol",
                                      "amp_test_within_5_points_of_fp32"} | ({"official_ok"} if official else set())
    assert on_disk["all_ok"] is True, on_disk["checks"]
    fp32 = on_disk["pipeline"]["fp32"]
    assert fp32["pre_s_per_iter"] > 0 and fp32["meta_s_per_iter"] > 0 and 0 <= fp32["test_mean"] <= 100
    assert len(fp32["train_losses"]) == 2  # one pre-train and one meta-train epoch
    amp = on_disk["amp_eval_of_fp32_checkpoint"]
    assert amp["episodes"] == gpu_check.TINY["test_episodes"]
    proj = on_disk["projection"]
    assert proj["paper"]["pre_20k_h"] == fp32["pre_s_per_iter"] * 20000 / 3600
    if official:
        assert proj["official_pytorch"]["meta_100x100_h"] > 0
    assert os.path.getsize(out / "mini_synthetic.npz") > 0
    assert [r["argv"][1] for r in on_disk["log"]] == ["pre_train", "meta_train", "meta_eval"] * 2 + \
        ["pre_train", "meta_train"] * official


@pytest.mark.slow
def test_gpu_check_tiny_pipeline_writes_checks_and_projection(tmp_path):
    res = gpu_check.main(["--tiny", "--out", str(tmp_path), "--steps", "pipeline,official", "--configs", "fp32,amp"])
    _check_dry_run(res, tmp_path)


def test_gpu_check_tiny_pipeline_in_process_writes_checks_and_projection(tmp_path, monkeypatch):
    def in_process(argv: list[str], log: list[dict]) -> dict:
        t, buf = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main.cli(argv)
        rec = {"argv": argv, "rc": rc, "seconds": time.perf_counter() - t,
               "tail": buf.getvalue().strip().splitlines()[-3:]}
        log.append(rec)
        return rec
    monkeypatch.setattr(gpu_check, "run_main", in_process)
    res = gpu_check.main(["--tiny", "--out", str(tmp_path), "--steps", "pipeline", "--configs", "fp32,amp"])
    _check_dry_run(res, tmp_path, official=False)


def test_run_main_records_a_subprocess_run(tmp_path):
    log: list[dict] = []
    rec = gpu_check.run_main(["--phase", "pre_train", "--dataset", "custom", "--dataset_dir",
                              str(tmp_path / "missing"), "--log_root", str(tmp_path)], log)
    assert log == [rec] and rec["rc"] == 2 and rec["seconds"] > 0
    assert rec["tail"][-1].startswith("error: ") and str(tmp_path / "missing") in rec["tail"][-1]
