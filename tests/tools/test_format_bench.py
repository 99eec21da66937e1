"""tools/format_bench.py: the streaming conversion benchmark runs, reports its numbers and cleans up."""
import glob
import json
import tempfile

import pytest

from tools import format_bench


@pytest.mark.parametrize("variant", ["png", "npz"])
def test_format_bench_small(variant, tmp_path, monkeypatch):
    # its own temporary folder: another process's benchmark in the shared /tmp must not look like a leftover
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = set(glob.glob(f"{tempfile.gettempdir()}/format_bench_*"))
    out = tmp_path / "bench.json"
    res = format_bench.main(["--images", "1500", "--classes", "30", "--variant", variant, "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["images"] == 1500 and res["classes"] == 30 and res["stored_size"] == 84
    assert res["output_array_mb"] == round(1500 * 84 * 84 * 3 / 2 ** 20, 1)
    assert res["images_per_s"] > 0 and res["seconds"] > 0
    # streaming: the conversion holds far less than the 30 MB output array beyond what it started with
    assert 0 <= res["peak_anon_beyond_start_mb"] < 20, res
    assert set(glob.glob(f"{tempfile.gettempdir()}/format_bench_*")) == before  # source and cache deleted
