"""One rank for tests/test_training_loops.py's DDP test: a DistributedDataParallel over an
optimized zoo GPT and one over the plain model, on this rank's own batch; writes whether
the averaged gradients agree to ``--json PATH`` (``PATH.rank<r>.json``)."""

import argparse
import copy
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from planner import optimize, zoo
from rank_report import save_rank_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"rank": rank, "ok": False}
    try:
        model, _ = zoo.make("gpt", size="tiny", seed=0)                 # the same weights on every rank
        reference = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(100 + rank)           # each rank its own batch
        stream = torch.randint(128, (2, 33), generator=generator)
        inputs = (stream[:, :-1].contiguous(), stream[:, 1:].contiguous())
        optimized = optimize(model, 0.7, inputs, repeats=1)
        ddp, ddp_reference = DistributedDataParallel(optimized), DistributedDataParallel(reference)
        for module in (ddp, ddp_reference):
            torch.manual_seed(7 + rank)
            module(*inputs).backward()
        differences = {name: float((p.grad - q.grad).abs().max())
                       for (name, p), q in zip(model.named_parameters(), reference.parameters())}
        report.update(ok=max(differences.values()) <= 1e-6, largest_difference=max(differences.values()),
                      recomputed=sum(d.value == "recompute" for d in optimized.plan.decisions.values()))
    except Exception as error:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(error).__name__}: {error}"
    save_rank_report(args.json, report)


if __name__ == "__main__":
    main()
    sys.exit(0)
