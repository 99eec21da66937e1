"""The phase registry (``main.PHASES``): ``--phase`` offers exactly its phases, and adding a phase is one runner and its
registry line, plus its name in ``config.options.PHASES`` (docs/ARCHITECTURE.md, "Add a phase")."""
from __future__ import annotations

import pytest

import main
from config import options
from config.settings import Settings


def test_the_parser_offers_exactly_the_registered_phases_in_order():
    assert tuple(main.PHASES) == options.PHASES
    action = next(a for a in options.build_parser()._actions if a.dest == "phase")
    assert tuple(action.choices) == options.PHASES


def test_a_registered_toy_phase_runs_through_main_with_the_typed_settings(monkeypatch, tmp_path, capsys):
    """A phase defined here (a runner and its registry line, its name among --phase's choices) runs through
    ``main.cli`` like the built-in ones: its preparation sees the parsed flags before the settings are built, its runner
    gets the typed settings and the device, and main.py's header is printed before it."""
    seen = {}

    def prepare(args):
        seen["prepared"] = args.phase
        return ["toy: prepared"]

    def run(settings, device):
        seen["settings"], seen["device"] = settings, device
        return {"ok": True}

    monkeypatch.setattr(options, "PHASES", options.PHASES + ("toy",))
    monkeypatch.setitem(main.PHASES, "toy", main.Phase(run, prepare=prepare))
    rc = main.cli(["--phase", "toy", "--device", "cpu", "--log_root", str(tmp_path), "--seed", "5", "--quiet",
                   "--backbone", "conv4", "--image_size", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and seen["prepared"] == "toy"
    s = seen["settings"]
    assert isinstance(s, Settings) and s.seed == 5 and s.model.backbone == "conv4" and not s.run.progress
    assert str(seen["device"]) == "cpu"
    assert out.index("phase toy  backbone conv4") < out.index("toy: prepared")


def test_an_unknown_phase_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        options.parse_args(["--phase", "train"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --phase: invalid choice: 'train'")
    assert len(err.strip().splitlines()) == 1
