"""tools/report.py on fake result files (no training), and the ABLATION commands that produce its inputs."""
import json
import os
import sys

import pytest

import run_experiment as rx
from config.options import parse_args, settings_dict
from tools import report

SHOTS = (1, 5)


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _result(mean, shot, seed=1, episodes=2000):
    return {"mean": mean, "ci95": 0.5, "episodes": episodes, "way": 5, "shot": shot, "query": 15,
            "eval_seed": seed, "inner_steps": 50, "base_lr": 0.1, "classifier": "finetune", "checkpoint": "x.pth"}


def fake_ablation(root, rows=("ft", "centroid", "mtl", "mtl_ht", "scratch"), seed_of=None):
    """Results files (and trlog.json / args.json for meta rows) where main.py would write them."""
    seed_of = seed_of or {}
    for shot in SHOTS:
        files = report.row_files(str(root), "glyphs", "conv4", 5, shot)
        for i, rid in enumerate(rows):
            _write(files[rid]["results"], _result(40.0 + i + 10 * (shot == 5), shot, seed=seed_of.get(rid, 1)))
            if files[rid]["log_dir"]:
                trlog = [{"epoch": e, "val_acc": 0.4 + 0.01 * e + 0.001 * i, "val_ci95": 0.008, "train_time": 10.0,
                          "val_time": 2.0} for e in range(1, 5)]
                _write(os.path.join(files[rid]["log_dir"], "trlog.json"), trlog)
                _write(os.path.join(files[rid]["log_dir"], "args.json"), {"num_batch": 25})


def test_report_writes_json_png_and_table(tmp_path, capsys):
    fake_ablation(tmp_path / "logs")
    _write(str(tmp_path / "logs" / "ablation_timing.json"), {"wall_s": 3600.0, "steps": []})
    out = tmp_path / "out"
    assert report.main(["--log_root", str(tmp_path / "logs"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "ablation.json").read_text())
    png = (out / "meta_val_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert summary["timing"]["wall_s"] == 3600.0
    rows = {r["id"]: r for r in summary["rows"]}
    assert [r["id"] for r in summary["rows"]] == ["ft", "centroid", "mtl", "mtl_ht", "scratch"]
    assert rows["mtl_ht"]["shots"]["5"]["mean"] == 53.0 and rows["ft"]["shots"]["1"]["mean"] == 40.0
    curve = rows["mtl"]["val_curve"]["1"]
    assert curve["iteration"] == [25, 50, 75, 100]          # epoch x num_batch
    assert curve["val_acc"][0] == pytest.approx(41.2) and curve["best_iteration"] == 100
    assert curve["train_s"] == 48.0
    assert summary["episodes"]["1"] == {"way": 5, "shot": 1, "query": 15, "eval_seed": 1, "episodes": 2000}
    assert "| 1. FT" in table and "40.00 ± 0.50" in table and "53.00 ± 0.50" in table
    assert "2000 fixed test episodes (eval seed 1" in table and "44.30 @ 100" in table
    assert summary["table_markdown"] in table


def test_missing_row_is_not_run(tmp_path):
    fake_ablation(tmp_path, rows=("ft", "centroid", "mtl", "mtl_ht"))
    s = report.collect(str(tmp_path), "glyphs", "conv4")
    table = report.markdown_table(s)
    assert "| 5. MTL (SS) on a backbone trained from scratch (no pre-training) | not run | not run |" in table
    assert report.plot_curves(s, str(tmp_path / "p.png")) and os.path.getsize(tmp_path / "p.png") > 0


def test_rows_on_different_episodes_are_refused(tmp_path, capsys):
    fake_ablation(tmp_path, seed_of={"mtl_ht": 2})
    with pytest.raises(ValueError, match="different episodes"):
        report.collect(str(tmp_path), "glyphs", "conv4")
    assert report.main(["--log_root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_no_results_is_an_error(tmp_path, capsys):
    assert report.main(["--log_root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ABLATION" in capsys.readouterr().err


# ------------------------------------------------------------------ the ABLATION commands feeding the report
def _parsed(cmd):
    assert cmd[:2] == [sys.executable, "main.py"]
    return parse_args(cmd[2:])


def test_ablation_commands_share_episodes_and_differ_only_by_ht(tmp_path):
    cmds = dict(rx.ablation_commands())
    assert cmds["benchmark"][1:] == ["-m", "tools.glyphs", "benchmark", "--out", "data/glyphs1k", "--seed", "0",
                                     "--ensure"]
    assert list(cmds)[-1] == "report" and list(cmds)[1] == "pre-train"
    tests = {k: _parsed(v) for k, v in cmds.items() if k.endswith(("test", "FT", "nearest mean"))}
    assert len(tests) == 10
    assert {(a.eval_seed, a.num_test_episodes, a.val_query, a.way) for a in tests.values()} == {(1, 2000, 15, 5)}
    assert all(a.num_test_episodes >= 2000 for a in tests.values())
    for shot in SHOTS:
        mtl = settings_dict(_parsed(cmds[f"{shot}-shot row 3 MTL meta-train"]))
        ht = settings_dict(_parsed(cmds[f"{shot}-shot row 4 MTL+HT meta-train"]))
        diff = {k for k in mtl if mtl[k] != ht[k]}
        assert diff == {"hard_task", "ht_normal_tasks"}  # ht_normal_tasks: None (unused) vs 5
        assert ht["ht_normal_tasks"] == ht["meta_batch_size"] == mtl["meta_batch_size"]
        assert mtl["init_weights"].endswith("pre/glyphs_conv4/max_acc.pth") and not mtl["second_order"]
        scratch = _parsed(cmds[f"{shot}-shot row 5 MTL scratch meta-train"])
        assert scratch.init_weights == "scratch" and scratch.meta_label == "scratch"
        ft = _parsed(cmds[f"{shot}-shot row 1 FT"])
        assert ft.eval_weights == mtl["init_weights"] and ft.eval_classifier == "finetune"
        assert _parsed(cmds[f"{shot}-shot row 2 nearest mean"]).eval_classifier == "centroid"
    # the report looks for the files exactly where those commands write them
    pre = _parsed(cmds["pre-train"])
    files = report.row_files(pre.log_root, pre.dataset, pre.backbone, pre.way, 1)
    assert os.path.dirname(files["ft"]["results"]) == os.path.dirname(ft.eval_weights)
    from config.settings import RunPaths
    meta_dir = lambda name: RunPaths.from_args(_parsed(cmds[name])).meta_dir  # where main.py writes that run
    assert files["mtl_ht"]["log_dir"] == meta_dir("1-shot row 4 MTL+HT meta-train")
    assert files["scratch"]["log_dir"] == meta_dir("1-shot row 5 MTL scratch meta-train")


def test_ablation_smoke_and_scratch_switch(monkeypatch):
    smoke = dict(rx.ablation_commands(smoke=True))
    a = _parsed(smoke["1-shot row 3 MTL meta-train"])
    assert a.log_root.endswith("ablation_smoke") and a.max_epoch == 2
    monkeypatch.setitem(rx.ABLATION, "scratch_row", False)
    assert not any("scratch" in k for k, _ in rx.ablation_commands())


def test_ablation_and_bench_run_the_tools(capsys):
    """ABLATION builds the benchmark with tools.glyphs and ends with tools.report; BENCH runs tools.benchmark; every
    ``-m`` module they name exists."""
    import importlib.util
    cmds = dict(rx.ablation_commands())
    assert cmds["report"][1:3] == ["-m", "tools.report"]
    rx.cli(["BENCH", "--dry_run", "--full"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"$ python -m tools.benchmark --out {os.path.join(rx.LOG_DIR, 'bench')} --full"]
    modules = [c[c.index("-m") + 1] for c in cmds.values() if "-m" in c] + [printed[0].split()[3]]
    assert sorted(set(modules)) == ["tools.benchmark", "tools.glyphs", "tools.report"]
    assert all(importlib.util.find_spec(m) is not None for m in modules)


# ------------------------------------------------------------------ issue 23: the run report, the seed summary
def _panel_std(png: str, rows: int, cols: int) -> list[float]:
    """The grey-level standard deviation of each panel cell of ``png`` (row-major), its title strip excluded."""
    import numpy as np
    from PIL import Image
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    w, h = report.PANEL_PX
    return [float(img[r * h + 40:(r + 1) * h, c * w:(c + 1) * w].std()) for r in range(rows) for c in range(cols)]


def test_run_report_of_a_real_hard_task_run_has_its_four_panels(tmp_path, capsys):
    """A real (tiny) HT meta-train from the committed pre-train fixture, its meta_eval, then python -m tools.report:
    report.png is 2 x 2 panels of PANEL_PX, none blank, and report.md names the files it read."""
    from pathlib import Path

    import main
    from PIL import Image
    root = Path(__file__).resolve().parents[2]
    flags = ["--dataset", "glyphs", "--dataset_dir", str(root / "data" / "glyphs100.npz"), "--quiet", "--device", "cpu",
             "--cache_dir", "none", "--log_root", str(tmp_path), "--num_val_episodes", "10", "--update_step", "3",
             "--base_lr", "0.1", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper", "--hard_task",
             "--seed", "1"]
    pre = str(root / "tests" / "data" / "checkpoints_v1" / "pre_conv4.pth")
    assert main.cli(["--phase", "meta_train", "--max_epoch", "2", "--num_batch", "3", "--train_query", "5",
                     "--init_weights", pre] + flags) == 0
    assert main.cli(["--phase", "meta_eval", "--num_test_episodes", "30", "--val_query", "5"] + flags) == 0
    run = tmp_path / "meta" / "glyphs_conv4_5way1shot_HT_exp1"
    auto = (run / "report.md").read_text()  # the end-of-phase report: markdown only
    assert "`hard_tasks.jsonl`" in auto and not (run / "report.png").exists()
    capsys.readouterr()
    assert report.main([str(run)]) == 0
    assert "panels: training, test episodes, classes, hard tasks" in capsys.readouterr().out
    png = str(run / "report.png")
    assert Image.open(png).size == (2 * report.PANEL_PX[0], 2 * report.PANEL_PX[1])
    assert min(_panel_std(png, 2, 2)) > 10, _panel_std(png, 2, 2)
    md = (run / "report.md").read_text()
    assert "Read from " in md and all(f"`{f}`" in md for f in ("args.json", "trlog.json", "results.json",
                                                                "hard_tasks.jsonl"))
    assert "![" in md and "report.png" in md and "panels: training, test episodes, classes, hard tasks" in md
    ht = [json.loads(line) for line in (run / "hard_tasks.jsonl").read_text().splitlines()]
    assert all(len(r["hard_task_accuracies"]) == 1 and len(r["task_accuracies"]) == 1 for r in ht)
    assert "query accuracy of the hard tasks" in md


def test_run_report_draws_only_what_the_folder_has(tmp_path):
    """A folder with a results file but no training log: two panels side by side (test episodes, classes)."""
    accs = [0.6, 0.8, 0.8, 1.0, 0.4] * 4
    _write(str(tmp_path / "results_pretrained_5way1shot.json"),
           {**_result(72.0, 1, episodes=20), "query": 1, "method": "pretrained", "episode_accs": accs,
            "class_accs": {f"c{i}": {"acc": 50.0 + 5 * i, "episodes": 5} for i in range(8)}})
    run = report.run_report(str(tmp_path))
    assert run["panels"] == ["test episodes", "classes"] and run["files"] == ["results_pretrained_5way1shot.json"]
    from PIL import Image
    assert Image.open(tmp_path / "report.png").size == (2 * report.PANEL_PX[0], report.PANEL_PX[1])
    assert min(_panel_std(str(tmp_path / "report.png"), 1, 2)) > 10
    md = (tmp_path / "report.md").read_text()
    assert "## Training" not in md and "| c0 | 50.00 | 5 | c7 | 85.00 | 5 |" in md


def test_seed_summary_refuses_runs_on_other_episodes(tmp_path):
    for s, seed in ((1, 1), (2, 2)):
        _write(str(tmp_path / f"s{s}" / "results.json"), {**_result(50.0 + s, 1, seed=seed), "settings": {"seed": s}})
    with pytest.raises(ValueError, match="was tested on other episodes"):
        report.seed_summary([str(tmp_path / "s1"), str(tmp_path / "s2")])
