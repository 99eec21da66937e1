"""``--amp`` on the CPU (issue #16): which CPUs run bfloat16 natively, what each request resolves to, the one-line
notes. The detection is tested by monkeypatching ``torch.cpu.get_capabilities`` (and the ``/proc/cpuinfo``
fallback), so these tests mean the same on a CPU with avx512_bf16 and on one without."""
from __future__ import annotations

import contextlib
from types import MappingProxyType

import pytest
import torch

from config.options import parse_args
from config.settings import Settings
from utils import gpu_tools
from utils.gpu_tools import amp_dtype, amp_mode, autocast, cpu_bf16_feature

CPU = torch.device("cpu")
AVX2 = {"avx": True, "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False,
        "architecture": "x86_64", "num_physical_cores": 2}


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(gpu_tools, "_noted", set())


def caps(monkeypatch, **flags):
    c = MappingProxyType({**AVX2, **flags})
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: c)


@pytest.mark.parametrize("flags, feature", [
    ({}, None),                                          # this project's 2-core EPYC: avx2 only
    ({"avx512_f": True, "avx512_bw": True}, None),       # plain avx512: bf16 still emulated
    ({"avx512_bf16": True}, "avx512_bf16"),              # Cooper Lake, Zen 4
    ({"amx_bf16": True, "avx512_bf16": True}, "avx512_bf16"),
    ({"amx_bf16": True}, "amx_bf16"),
    ({"architecture": "arm64", "bf16": True}, "bf16"),   # arm64 (Graviton 3, Apple M2)
    ({"architecture": "arm64", "sve_bf16": True}, "sve_bf16"),
])
def test_native_bf16_feature_from_capabilities(monkeypatch, flags, feature):
    caps(monkeypatch, **flags)
    assert cpu_bf16_feature() == feature


def test_vector_length_counts_are_not_features(monkeypatch):
    caps(monkeypatch, sve_max_length=256)  # integers in the mapping are properties, not flags
    assert cpu_bf16_feature() is None


@pytest.mark.parametrize("line, feature", [
    ("flags\t\t: fpu sse sse2 avx avx2 fma\n", None),
    ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n", "avx512_bf16"),
    ("Features\t: fp asimd bf16 i8mm\n", "bf16"),
])
def test_cpuinfo_fallback_without_torch_capabilities(monkeypatch, tmp_path, line, feature):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Test\n" + line)
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(gpu_tools, "CPUINFO", str(info))
    assert cpu_bf16_feature() == feature


def test_cpuinfo_reader_on_a_missing_file(tmp_path):
    assert gpu_tools._cpuinfo_flags(str(tmp_path / "absent")) == set()


def test_the_real_cpu_is_detected_consistently():
    """On this machine: the answer agrees with the capabilities torch reports (whatever the CPU)."""
    c = torch.cpu.get_capabilities()
    native = any(c.get(f) is True for f in gpu_tools.NATIVE_BF16_FEATURES)
    assert (cpu_bf16_feature() is not None) == native


# ------------------------------------------------------------------------------------------- requests
def test_amp_mode_from_the_flags():
    assert amp_mode(False) == "off" and amp_mode(False, "bfloat16") == "off"
    assert amp_mode(True) == "auto" and amp_mode(True, "bfloat16") == "bfloat16"
    with pytest.raises(ValueError):
        amp_mode(True, "float16")


@pytest.mark.parametrize("native", [False, True])
def test_off_is_float32_everywhere(monkeypatch, capsys, native):
    caps(monkeypatch, avx512_bf16=native)
    assert amp_dtype(CPU, False) is None and amp_dtype(CPU, "off") is None
    assert isinstance(autocast(CPU, False), contextlib.nullcontext)
    assert capsys.readouterr().out == ""


def test_amp_on_a_cpu_without_native_bf16_is_float32_with_one_line(monkeypatch, capsys):
    caps(monkeypatch)
    for _ in range(3):
        assert amp_dtype(CPU, True) is None
        assert amp_dtype(CPU, "auto") is None
        with autocast(CPU, True):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["note: --amp: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16); running in float32 "
                     "(--amp_dtype bfloat16 runs emulated bfloat16, slower)"]


def test_forced_bf16_on_a_cpu_without_native_bf16_is_emulated_with_one_line(monkeypatch, capsys):
    caps(monkeypatch)
    for _ in range(2):
        assert amp_dtype(CPU, "bfloat16") is torch.bfloat16
        with autocast(CPU, "bfloat16"):
            assert torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("note: --amp_dtype bfloat16: this CPU has no native bfloat16")
    assert "emulated, slower than float32" in out[0]


@pytest.mark.parametrize("request_", [True, "auto", "bfloat16"])
def test_amp_on_a_cpu_with_native_bf16_is_bf16(monkeypatch, capsys, request_):
    caps(monkeypatch, avx512_bf16=True)
    assert amp_dtype(CPU, request_) is torch.bfloat16
    with autocast(CPU, request_):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert capsys.readouterr().out == "note: --amp: bfloat16 autocast on the CPU (avx512_bf16)\n"


def test_a_bad_request_is_a_programming_error():
    with pytest.raises(ValueError):
        amp_dtype(CPU, "fp16")


def test_cuda_without_bf16_stays_float32_with_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(torch.device("cuda"), True) is None
    assert amp_dtype(torch.device("cuda"), "bfloat16") is None
    assert capsys.readouterr().out == "warning: --amp needs a GPU with bf16 support; running in fp32\n"


def test_cuda_with_bf16(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(torch.device("cuda"), True) is torch.bfloat16
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------- flags and settings
def test_flags_reach_the_typed_settings():
    s = Settings.from_args(parse_args([]))
    assert s.run.amp == "off" and s.test.amp == "off" and s.meta_val.amp == "off" and s.pre_val.amp == "off"
    s = Settings.from_args(parse_args(["--amp"]))
    assert s.run.amp == "auto" and s.test.amp == "auto"
    s = Settings.from_args(parse_args(["--amp", "--amp_dtype", "bfloat16"]))
    assert s.run.amp == "bfloat16" and s.test.amp == s.meta_val.amp == s.pre_val.amp == "bfloat16"


def test_amp_flags_may_change_on_resume():
    from config.options import resume_may_differ
    assert {"amp", "amp_dtype"} <= resume_may_differ()


def test_help_says_what_happens_without_native_bf16(capsys):
    from config.options import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "on a CPU without it, one line says so and the run is float32" in text
    assert "bfloat16 = bfloat16 even where the CPU emulates it" in text
