"""Run a test worker under torchrun and read what each rank reported (`rank_report`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from planner.pipeline_demo import free_port

ROOT = Path(__file__).resolve().parent.parent


def rank_reports(worker: Path, tmp_path: Path, *arguments: str, ranks: int = 2, timeout_s: int = 300) -> list[dict]:
    """``worker`` on ``ranks`` CPU processes (gloo, one thread each); every rank's JSON
    report, in rank order. A rank that wrote none fails the test with torchrun's stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", str(worker), "--json", str(tmp_path / "report"), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment, cwd=ROOT)
    reports = []
    for rank in range(ranks):
        path = tmp_path / f"report.rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report; torchrun said:\n{finished.stderr[-4000:]}"
        reports.append(json.loads(path.read_text()))
    return reports
