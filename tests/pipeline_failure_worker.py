"""One rank for tests/test_pipeline_runtime.py's failure cases: ``optimize(..., stages=2)``
where one rank (or rank 0's planning) fails; writes the error it raised to
``--json PATH`` (``PATH.rank<r>.json``)."""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from planner import optimize, zoo
from rank_report import save_rank_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["infeasible", "mismatch", "model_fails"], required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, (idx, targets) = zoo.make("gpt", size="tiny", seed=0)
    budget = 1000 if args.case == "infeasible" else 10**9
    if rank == 1 and args.case == "mismatch":            # another input shape on one rank
        idx, targets = idx[:, :16].contiguous(), targets[:, :16].contiguous()
    if rank == 1 and args.case == "model_fails":         # the model cannot take these inputs
        idx = idx.float()
    report = {"rank": rank, "error": None}
    try:
        optimize(model, budget, (idx, targets), stages=2, microbatches=2, repeats=1)
    except Exception as error:  # noqa: BLE001 - reported to the test
        report.update(error=type(error).__name__, message=str(error).splitlines()[0])
    save_rank_report(args.json, report)


if __name__ == "__main__":
    main()
    sys.exit(0)
