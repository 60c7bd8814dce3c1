"""Built-in models for tests, the demo and the experiments: plain ``torch.nn``, no other
dependency, each traceable by ``make_fx`` (no data-dependent Python control flow, no
``.item()``, no in-place update of an input).

    model, inputs = zoo.make("gpt", size="small", seed=0)
    model(*inputs).backward()          # the GPT returns its loss

Every factory in `ZOO` takes ``size`` (``"tiny"`` or ``"small"``) and ``device`` and
returns ``(model, example_inputs)``, the model in training mode and ``example_inputs`` a
tuple of the positional arguments of one forward. Factories draw from the global RNG, so
their result is fixed by a preceding ``torch.manual_seed``; `make` seeds for you and
leaves the global RNG as it found it.

Sizes:

- ``"tiny"``: unit tests; one forward + backward takes a few milliseconds on a CPU and
  keeps at most a few MB of activations.
- ``"small"``: the demo and experiments; one step takes roughly 0.1-0.5 s on 2 CPU cores.

Models other than the GPT return their natural output (logits or images); their training
step is ``loss_fn(model(*inputs)).backward()`` for a loss of the caller's choosing (the
tests and ``planner.benchmark.training_loss`` use the mean of the output).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from planner.errors import ModelInputError, OptionError

SIZES = ("tiny", "small")


def _preset(presets: Mapping[str, Mapping[str, Any]], size: str, model_name: str) -> dict[str, Any]:
    """A copy of ``presets[size]``; an unknown size fails with the known ones."""
    if size not in presets:
        raise OptionError(f"unknown size {size!r} for zoo model {model_name!r}; choose one of {sorted(presets)}")
    return dict(presets[size])


def _check_sequence_length(model: nn.Module, seq: int) -> None:
    """A token model's input fits its position embedding; `ModelInputError` otherwise."""
    if seq > model.seq_len:
        raise ModelInputError(f"{type(model).__name__}: a sequence of {seq} tokens is longer than the model's "
                              f"seq_len={model.seq_len}; pass at most {model.seq_len} tokens or build the model "
                              f"with seq_len >= {seq}")


# ---------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """``n_layer`` blocks of Linear + GELU, then a linear head.

    forward: ``x`` (batch, in_features) float -> logits (batch, out_features).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, n_layer: int = 6) -> None:
        super().__init__()
        if n_layer < 1:
            raise OptionError(f"MLP needs at least one block, got n_layer={n_layer}; pass n_layer >= 1")
        widths = [in_features] + [hidden_features] * n_layer
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width_in, width_out), nn.GELU())
            for width_in, width_out in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


_MLP_PRESETS = {
    "tiny": dict(batch_size=128, in_features=64, hidden_features=64, out_features=10, n_layer=6),
    "small": dict(batch_size=1024, in_features=512, hidden_features=1024, out_features=100, n_layer=6),
}


def make_mlp(size: str = "tiny", *, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """`MLP` and an input batch ``x`` (batch, in_features).

    Training step: ``loss_fn(model(x)).backward()``, e.g. cross-entropy against class labels.
    """
    config = _preset(_MLP_PRESETS, size, "mlp")
    batch_size = config.pop("batch_size")
    model = MLP(**config)
    x = torch.randn(batch_size, config["in_features"])
    return model.to(device), (x.to(device),)


# ---------------------------------------------------------------------------------------
# ResNet


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN stages and a residual connection, then ReLU (ResNet-18's block).

    With ``stride > 1`` or a change of width the shortcut is a strided 1x1 Conv + BN.
    forward: (batch, in_channels, H, W) -> (batch, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet for small images: a 3x3 Conv-BN-ReLU stem, one stage of `BasicBlock` per
    entry of ``widths`` (every stage after the first halves the resolution), global
    average pooling and a linear head.

    forward: ``images`` (batch, in_channels, H, W) float -> logits (batch, num_classes).
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32), blocks_per_stage: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        if not widths or blocks_per_stage < 1:
            raise OptionError(f"ResNet needs at least one stage and one block per stage, got widths={widths}, "
                              f"blocks_per_stage={blocks_per_stage}; pass a non-empty widths and blocks_per_stage >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        width_in = widths[0]
        for stage_index, width in enumerate(widths):
            stride = 1 if stage_index == 0 else 2
            blocks = [BasicBlock(width_in, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            width_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(images))
        pooled = features.mean(dim=(2, 3))
        return self.head(pooled)


_RESNET_PRESETS = {
    "tiny": dict(batch_size=4, image_size=16, in_channels=3, widths=(8, 16), blocks_per_stage=2, num_classes=10),
    "small": dict(batch_size=32, image_size=32, in_channels=3, widths=(32, 64, 128), blocks_per_stage=2,
                  num_classes=10),
}


def _image_model(model_class: type[nn.Module], config: dict, device: str | torch.device
                 ) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """An image model from a preset and a random (batch, channels, size, size) batch."""
    batch_size, image_size = config.pop("batch_size"), config.pop("image_size")
    model = model_class(**config)
    images = torch.randn(batch_size, config["in_channels"], image_size, image_size)
    return model.to(device), (images.to(device),)


def make_resnet(size: str = "tiny", *, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """`ResNet` and an image batch (batch, 3, image_size, image_size).

    Training step: ``loss_fn(model(images)).backward()``, e.g. cross-entropy against labels.
    """
    return _image_model(ResNet, _preset(_RESNET_PRESETS, size, "resnet"), device)


# ---------------------------------------------------------------------------------------
# GPT (after nanoGPT)


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal (GPT) or bidirectional over unpadded keys (BERT).

    forward: ``x`` (batch, seq, d_model) and, when not causal, ``key_mask`` (batch, 1, 1, seq)
    bool, True where a key may be attended -> (batch, seq, d_model).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if d_model % n_head:
            raise OptionError(f"d_model={d_model} is not a multiple of n_head={n_head}; choose n_head dividing d_model")
        self.n_head = n_head
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=2)
        # (batch, seq, d_model) -> (batch, n_head, seq, head_dim)
        q, k, v = (t.view(batch, seq, self.n_head, d_model // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(batch, seq, d_model)
        return self.dropout(self.proj(y))


class FeedForward(nn.Module):
    """Linear (4x wider) + GELU + Linear + Dropout; (..., d_model) -> (..., d_model)."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class GPTBlock(nn.Module):
    """Pre-LN transformer decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, dropout, causal=True)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """nanoGPT-style decoder-only language model that returns its own loss.

    Token + position embeddings (with dropout), ``n_layer`` `GPTBlock`, a final LayerNorm
    and an untied LM head.

    forward: ``idx`` (batch, seq) int64 token ids and ``targets`` (batch, seq) int64 next
    tokens, with seq <= ``seq_len`` -> the mean cross-entropy, a scalar.
    Training step: ``model(idx, targets).backward()``.
    """

    def __init__(self, n_layer: int = 4, n_head: int = 4, d_model: int = 256, seq_len: int = 128,
                 vocab_size: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_final = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(_init_transformer_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, parameter in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, seq = idx.shape
        _check_sequence_length(self, seq)
        positions = torch.arange(seq, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _init_transformer_weights(module: nn.Module) -> None:
    """GPT-2/BERT initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


_GPT_PRESETS = {
    "tiny": dict(batch_size=2, n_layer=2, n_head=2, d_model=64, seq_len=32, vocab_size=128, dropout=0.1),
    # the reference configuration of our baselines
    "small": dict(batch_size=8, n_layer=4, n_head=4, d_model=256, seq_len=128, vocab_size=1024, dropout=0.1),
}


def make_gpt(size: str = "tiny", *,
             device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """`GPT` and ``(idx, targets)``, random token ids of shape (batch, seq_len) with
    ``targets`` the next token of ``idx`` (one longer random stream, shifted by one).

    Training step: ``model(idx, targets).backward()``.
    """
    config = _preset(_GPT_PRESETS, size, "gpt")
    batch_size = config.pop("batch_size")
    model = GPT(**config)
    stream = torch.randint(config["vocab_size"], (batch_size, config["seq_len"] + 1))
    idx, targets = stream[:, :-1].contiguous(), stream[:, 1:].contiguous()
    return model.to(device), (idx.to(device), targets.to(device))


# ---------------------------------------------------------------------------------------
# U-Net


class DoubleConv(nn.Module):
    """(3x3 Conv + BN + ReLU) twice; (batch, in_channels, H, W) -> (batch, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class UNet(nn.Module):
    """A U-Net (Ronneberger et al., 2015) with ``depth`` resolution levels.

    Encoder: `DoubleConv` then 2x2 max-pooling at each level, widths ``base_channels * 2**level``;
    a bottleneck `DoubleConv`; decoder: 2x2 stride-2 ConvTranspose2d up, concatenation with
    the encoder features of that level (the long skip), `DoubleConv`; a 1x1 output conv.
    Each encoder feature map stays alive from its level of the encoder until the matching
    level of the decoder.

    forward: ``images`` (batch, in_channels, H, W) float, H and W multiples of 2**depth
    -> per-pixel logits (batch, out_channels, H, W).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base_channels: int = 16, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise OptionError(f"UNet needs depth >= 1, got depth={depth}; pass depth >= 1")
        widths = [base_channels * 2 ** level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        width_in = in_channels
        for width in widths[:-1]:
            self.encoders.append(DoubleConv(width_in, width))
            width_in = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width_below, width in zip(reversed(widths[1:]), reversed(widths[:-1])):
            self.upsamplers.append(nn.ConvTranspose2d(width_below, width, 2, stride=2))
            self.decoders.append(DoubleConv(2 * width, width))
        self.output = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        x = images
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.output(x)


_UNET_PRESETS = {
    "tiny": dict(batch_size=4, image_size=16, in_channels=3, out_channels=2, base_channels=8, depth=2),
    "small": dict(batch_size=16, image_size=64, in_channels=3, out_channels=2, base_channels=16, depth=3),
}


def make_unet(size: str = "tiny", *, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """`UNet` and an image batch (batch, 3, image_size, image_size).

    Training step: ``loss_fn(model(images)).backward()``, e.g. per-pixel cross-entropy
    against a (batch, image_size, image_size) mask of class ids.
    """
    return _image_model(UNet, _preset(_UNET_PRESETS, size, "unet"), device)


# ---------------------------------------------------------------------------------------
# BERT-style encoder


class EncoderBlock(nn.Module):
    """Post-LN transformer encoder block (BERT): x = ln(x + attn(x)), then x = ln(x + mlp(x))."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, n_head, dropout, causal=False)
        self.ln_attn = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.ln_attn(x + self.attn(x, key_mask))
        return self.ln_mlp(x + self.mlp(x))


class Encoder(nn.Module):
    """BERT-style sequence classifier.

    Token + position embeddings, LayerNorm and dropout; ``n_layer`` `EncoderBlock`; a
    pooler (Linear + tanh on the first token, the [CLS] position) and, after dropout, a
    linear classifier.

    forward: ``idx`` (batch, seq) int64 token ids and ``attention_mask`` (batch, seq) bool,
    True on real tokens and False on padding (the first token of every row must be real),
    seq <= ``seq_len`` -> logits (batch, num_classes).
    Training step: ``loss_fn(model(idx, attention_mask)).backward()``, e.g. cross-entropy
    against (batch,) labels.
    """

    def __init__(self, n_layer: int = 4, n_head: int = 4, d_model: int = 256, seq_len: int = 128,
                 vocab_size: int = 1024, num_classes: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.ln_embedding = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_head, dropout) for _ in range(n_layer))
        self.pooler = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, num_classes)
        self.apply(_init_transformer_weights)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, seq = idx.shape
        _check_sequence_length(self, seq)
        positions = torch.arange(seq, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)
        x = self.dropout(self.ln_embedding(x))
        key_mask = attention_mask.view(batch, 1, 1, seq)    # broadcast over heads and queries
        for block in self.blocks:
            x = block(x, key_mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(self.dropout(pooled))


_ENCODER_PRESETS = {
    "tiny": dict(batch_size=2, n_layer=2, n_head=2, d_model=64, seq_len=32, vocab_size=128, num_classes=4,
                 dropout=0.1),
    "small": dict(batch_size=8, n_layer=4, n_head=4, d_model=256, seq_len=128, vocab_size=1024, num_classes=8,
                  dropout=0.1),
}


def make_encoder(size: str = "tiny", *,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """`Encoder` and ``(idx, attention_mask)``, both (batch, seq_len): random token ids, and
    a mask whose rows hold from all of ``seq_len`` down to half of it real tokens, the rest
    padding.

    Training step: ``loss_fn(model(idx, attention_mask)).backward()``.
    """
    config = _preset(_ENCODER_PRESETS, size, "encoder")
    batch_size = config.pop("batch_size")
    seq_len = config["seq_len"]
    model = Encoder(**config)
    idx = torch.randint(config["vocab_size"], (batch_size, seq_len))
    lengths = torch.linspace(seq_len, seq_len // 2, batch_size).round().long()
    attention_mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    return model.to(device), (idx.to(device), attention_mask.to(device))


# ---------------------------------------------------------------------------------------

ZOO: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "mlp": make_mlp,
    "resnet": make_resnet,
    "gpt": make_gpt,
    "unet": make_unet,
    "encoder": make_encoder,
}


def make(name: str, size: str = "tiny", seed: int = 0, *,
         device: str | torch.device = "cpu") -> tuple[nn.Module, tuple]:
    """``ZOO[name](size, device=device)`` under ``torch.manual_seed(seed)``: the same weights
    and inputs for the same arguments. The caller's global RNG state is restored after.

    Models and inputs are built on the CPU and then moved, so they do not depend on ``device``.
    """
    if name not in ZOO:
        raise OptionError(f"unknown zoo model {name!r}; choose one of {sorted(ZOO)}")
    if size not in SIZES:
        raise OptionError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, inputs = ZOO[name](size)
    return model.to(device), tuple(t.to(device) for t in inputs)
