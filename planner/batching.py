"""Pad variable-length batches to a few bucket lengths, so that a whole epoch needs a
handful of plans (one per bucket and batch size) instead of one per batch.

    from planner.batching import pad_to_bucket
    batch = pad_to_bucket(batch, buckets=(64, 128, 256), pad_values={"labels": -100})

Padding the labels with the loss's ``ignore_index`` (-100 for ``F.cross_entropy`` and
transformers) and the attention mask with 0 leaves the loss and every gradient as they
were, at the cost of the padded positions' compute.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from planner.errors import OptionError


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length``."""
    fitting = [bucket for bucket in sorted(buckets) if bucket >= length]
    if not fitting:
        raise OptionError(f"a sequence of {length} is longer than the largest bucket {max(buckets)}; "
                          f"add a bucket of at least {length} or truncate the batch")
    return fitting[0]


def pad_to_bucket(batch: Any, buckets: Sequence[int], *, dim: int = 1,
                  pad_values: Mapping[str, float] | None = None, default_pad: float = 0) -> Any:
    """``batch`` (a tensor, or a dict / tuple / list of them, nested) with every tensor
    whose size along ``dim`` is the batch's sequence length padded at the end of that
    dimension to `bucket_length`. The sequence length is the largest size along ``dim``
    among the tensors that have it; other tensors (per-example labels) are left alone.
    A dict entry is padded with ``pad_values[key]`` when given, else ``default_pad``.
    O(batch bytes)."""
    if not buckets:
        raise OptionError("pad_to_bucket needs at least one bucket length")
    pad_values = dict(pad_values or {})
    leaves = [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.dim() > dim]
    if not leaves:
        return batch
    length = max(leaf.shape[dim] for leaf in leaves)
    target = bucket_length(length, buckets)

    def pad(tensor: torch.Tensor, value: float) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim or tensor.shape[dim] != length \
                or target == length:
            return tensor
        # F.pad lists (before, after) pairs from the last dimension backwards
        widths = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [0, target - length]
        return F.pad(tensor, widths, value=value)

    if isinstance(batch, Mapping):
        return type(batch)({key: pytree.tree_map(lambda t, key=key: pad(t, pad_values.get(key, default_pad)), value)
                            for key, value in batch.items()})
    return pytree.tree_map(lambda t: pad(t, default_pad), batch)
