"""One rank for tests/test_fsdp.py: FSDP2 (``fully_shard`` on each block and the root, gloo)
over a GPT whose blocks memsched planned one by one under a per-rank budget
(`planner.fsdp.optimize_blocks`), and over the plain GPT, each rank on its own batch. Writes
the gradients' largest difference, this rank's measured peak, the plain model's and the
budget to ``--json PATH`` (``PATH.rank<r>.json``)."""

import argparse
import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from planner import UnsupportedModelError, optimize, zoo
from planner.fsdp import optimize_blocks, rank_step_peak
from rank_report import save_rank_report

BUDGET_BYTES = 9_000_000      # per rank; plain FSDP2 peaks at about 12.3 MB on this model and batch


def shard(model: torch.nn.Module, mesh) -> None:
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def step(model: torch.nn.Module, inputs, seed: int, optimizer=None, measure: bool = False):
    torch.manual_seed(seed)                        # the same dropout masks in both models
    if measure:
        return rank_step_peak(model, inputs)
    model(*inputs).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "ok": False, "budget": BUDGET_BYTES}
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)                                              # the same weights on every rank
        model = zoo.GPT(n_layer=4, n_head=4, d_model=64, seq_len=128, vocab_size=256, dropout=0.1)
        reference = copy.deepcopy(model)
        stream = torch.randint(256, (4, 129), generator=torch.Generator().manual_seed(100 + rank))
        inputs = (stream[:, :-1].contiguous(), stream[:, 1:].contiguous())  # each rank its own batch

        plans = optimize_blocks(model, BUDGET_BYTES, inputs, blocks=model.blocks, solver="hierarchical", repeats=1)
        shard(model, mesh)
        shard(reference, mesh)
        try:
            optimize(reference, 0.5, inputs)
        except UnsupportedModelError as error:
            report["refused_sharded"] = "optimize_blocks" in str(error)

        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
        for module, optimizer in zip((model, reference), optimizers):      # FSDP2 allocates some state lazily
            step(module, inputs, 7 + rank, optimizer)
        (loss, peak), (reference_loss, plain_peak) = (step(m, inputs, 11 + rank, measure=True)
                                                     for m in (model, reference))
        names = [name.replace(".module.", ".") for name, _ in model.named_parameters()]
        differences = [float((p.grad.full_tensor() - q.grad.full_tensor()).abs().max())
                       for p, q in zip(model.parameters(), reference.parameters())]
        state = model.state_dict()
        model.load_state_dict(reference.state_dict())
        report.update(
            largest_difference=max(differences), loss_difference=abs(float(loss - reference_loss)),
            names_match=names == [name for name, _ in reference.named_parameters()],
            state_dict_keys_match=sorted(state) == sorted(reference.state_dict()),
            peak=peak, plain_peak=plain_peak, predicted=plans.predicted_peak_bytes, fraction=plans.fraction,
            recomputed=plans.recomputed, block_budgets=[block.budget_bytes for block in plans.blocks],
            unsharded_block_params=[block.unsharded_param_bytes for block in plans.blocks])
        report["ok"] = report["largest_difference"] <= 1e-6 and peak <= BUDGET_BYTES
    except Exception as error:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(error).__name__}: {error}"
    save_rank_report(args.json, report)


if __name__ == "__main__":
    main()
    sys.exit(0)
