"""The peer comparison script (scripts/peer-offload/compare.py) in its CPU smoke form: `none` and
`ferry` run in their own processes on the tiny sd15 fixture, Ferry's image is bit-identical to
the un-offloaded one, the CUDA-only diffusers modes are listed as skipped, and the JSON and
markdown results are written."""

import json
import subprocess
import sys

import pytest

from conftest import MODELS, REPO

pytest.importorskip("diffusers")

SCRIPT = REPO / "scripts" / "peer-offload" / "compare.py"


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(MODELS / "sd15"), "--device", "cpu",
         "--steps", "2", "--size", "64", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu"
    by_mode = {r["mode"]: r for r in results["results"]}
    assert set(by_mode) == {"none", "model", "sequential", "group_leaf", "ferry"}
    for mode in ("model", "sequential", "group_leaf"):
        assert by_mode[mode]["status"] == "skipped", by_mode[mode]
    for mode in ("none", "ferry"):
        r = by_mode[mode]
        assert r["status"] == "ok", r
        assert r["s_per_step"] > 0 and r["wall_s"] >= r["s_per_step"]
        assert r["peak_rss_bytes"] > 0
        assert r["max_diff_vs_none"] == 0.0, r
    ferry = by_mode["ferry"]
    assert 0 < ferry["budget_bytes"] < ferry["weight_bytes"]
    assert "pass" in (out / "ferry-metrics.txt").read_text()
    md = (out / "results.md").read_text()
    assert "| ferry | ok |" in md and "| sequential | skipped" in md
