"""Model builders for `memsched-estimate`'s ``module:function`` argument in the tests."""

from __future__ import annotations

import torch

from planner.zoo import GPT


def tiny_gpt(batch_size: int, seq_len: int):
    """A 2-block GPT (d=64) on the meta device, ``batch_size`` x ``seq_len`` tokens."""
    with torch.device("meta"):
        model = GPT(n_layer=2, n_head=2, d_model=64, seq_len=max(seq_len, 32), vocab_size=128, dropout=0.1)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
    return model, (idx, idx)
