"""tools/cache_bench.py: the cache checksum benchmark runs through the real cache code, reports and cleans up."""
import glob
import json
import tempfile

from tools import cache_bench


def test_cache_bench_small(tmp_path):
    before = set(glob.glob(f"{tempfile.gettempdir()}/cache_bench_*"))
    out = tmp_path / "bench.json"
    res = cache_bench.main(["--images", "300", "--size", "16", "--repeat", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["images"] == 300 and res["entry_mb"] == round(300 * 16 * 16 * 3 / 1e6, 1)
    for k in ("write_s", "fill_s", "verify_warm_s", "verify_cold_s"):
        assert res[k] > 0 and len(res["all_runs"][k]) == 2
    assert res["write_s"] >= res["fill_s"]
    assert set(res["hashes_mb_per_s"]) >= {"sha1", "blake2b-8", "sha256"}
    assert res["machine"]["usable_cpus"] >= 1 and len(res["load_avg_1_5_15_before"]) == 3
    assert set(glob.glob(f"{tempfile.gettempdir()}/cache_bench_*")) == before  # the entry was removed
