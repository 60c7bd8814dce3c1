"""What every torchrun worker of the tests does last: write its rank's report where the test
reads it (``PREFIX.rank<r>.json``) and leave the process group."""

import json

import torch.distributed as dist


def save_rank_report(prefix: str, report: dict) -> None:
    with open(f"{prefix}.rank{dist.get_rank()}.json", "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()
