"""``benchmarks/datastore.py`` runs on a tiny datastore and prints one row per index."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "datastore.py"


def test_datastore_benchmark_prints_a_row_per_index() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", "2000", "--ivf", "IVF4,PQ8x4", "--repeats", "1",
         "--batch", "32", "--recall-queries", "32", "--extrapolate", "100000"],
        capture_output=True, text=True, check=True, timeout=120,
        # Spinning OpenMP threads on a busy machine make faiss' training take seconds.
        env={**os.environ, "OMP_WAIT_POLICY": "passive"},
    ).stdout  # fmt: skip
    assert "CPU: " in out and "Gaussian mixture" in out
    rows: dict[str, str] = {}
    for line in out.split("Extrapolated")[0].splitlines():  # the measured table
        if line.startswith("|"):
            rows[line.split("|")[1].strip()] = line
    assert rows["Flat (faiss)"].rstrip(" |").endswith("1 (exact)")
    hnsw = rows["HNSW32 (efSearch=64)"]
    assert 0.9 <= float(hnsw.split("|")[-2]) <= 1.0  # 2,000 keys: HNSW is near exact
    assert "IVF4,PQ8x4 (nprobe=16)" in rows
    assert "Extrapolated to N=100,000" in out
