"""The benchmark harness runs end to end on the tiny model (its figures are not checked: speed is bench/'s job)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_contenders_run_side_by_side_and_write_their_table(tmp_path):
    names = ["bare", "trl", "ours-1process", "ours-1process@tdpo2"]
    done = subprocess.run([sys.executable, "-m", "bench.contenders", "--model", "tiny", "--steps", "3", "--only",
                           ",".join(names), "--out", "smoke", "--results", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "contenders-tiny-smoke.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["contender"] for r in rows] == names
    for row in rows:
        assert row["steps timed"] == "2"  # 3 steps, the first excluded
        assert float(row["s/step"]) > 0 and float(row["pairs/s"]) > 0 and float(row["peak RSS MB"]) > 100
    assert "| contender |" in (tmp_path / "contenders-tiny-smoke.md").read_text()


def test_an_unknown_contender_is_refused_before_any_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.contenders", "--only", "bare,nope", "--results", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown contenders ['nope']" in done.stderr
    assert not list(tmp_path.iterdir())
