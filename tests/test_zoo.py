"""planner.zoo at size "tiny": each model trains, is reproducible under a seed, is fast
enough for unit tests, and traces with fake tensors (what `planner.capture` needs)."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functional_call

from planner import zoo

MODELS = sorted(zoo.ZOO)
MODELS_WITH_DROPOUT = ("encoder", "gpt")


def scalar_loss(output: torch.Tensor) -> torch.Tensor:
    """The GPT's own loss, or the mean of another model's logits / images."""
    return output if output.ndim == 0 else output.mean()


def seeded_step(model: nn.Module, inputs: tuple, forward_seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one forward + backward, the forward's randomness seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(forward_seed)
    loss = scalar_loss(model(*inputs))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_finite_nonzero_gradient(name: str) -> None:
    model, inputs = zoo.make(name, size="tiny", seed=0)
    inputs_before = [t.clone() for t in inputs]
    assert model.training
    loss = scalar_loss(model(*inputs))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for param_name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}: {param_name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}: {param_name} has an all-zero gradient"
    for before, after in zip(inputs_before, inputs):
        assert torch.equal(before, after), f"{name} modified its input"


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_model_inputs_loss_and_gradients(name: str) -> None:
    model_a, inputs_a = zoo.make(name, size="tiny", seed=3)
    model_b, inputs_b = zoo.make(name, size="tiny", seed=3)
    for a, b in zip(inputs_a, inputs_b):
        assert torch.equal(a, b)
    for (param_name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), param_name
    loss_a, grads_a = seeded_step(model_a, inputs_a, forward_seed=11)
    loss_b, grads_b = seeded_step(model_b, inputs_b, forward_seed=11)
    assert torch.equal(loss_a, loss_b)
    for param_name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[param_name]), f"{name}: {param_name}"


@pytest.mark.parametrize("name", MODELS)
def test_different_seeds_give_different_weights(name: str) -> None:
    model_a, _ = zoo.make(name, size="tiny", seed=0)
    model_b, _ = zoo.make(name, size="tiny", seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("name", MODELS_WITH_DROPOUT)
def test_dropout_is_active_in_training_mode(name: str) -> None:
    """The forward seed matters in training mode (so the seeded test above tests dropout)
    and does not in eval mode."""
    model, inputs = zoo.make(name, size="tiny", seed=0)
    loss_1, _ = seeded_step(model, inputs, forward_seed=1)
    loss_2, _ = seeded_step(model, inputs, forward_seed=2)
    assert not torch.equal(loss_1, loss_2)
    model.eval()
    loss_1, _ = seeded_step(model, inputs, forward_seed=1)
    loss_2, _ = seeded_step(model, inputs, forward_seed=2)
    assert torch.equal(loss_1, loss_2)


def test_make_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    state_before = torch.get_rng_state()
    zoo.make("gpt", size="tiny", seed=0)
    assert torch.equal(torch.get_rng_state(), state_before)


@pytest.mark.parametrize("name", MODELS)
def test_forward_traces_with_fake_tensors(name: str) -> None:
    """make_fx in fake mode, parameters and buffers passed as inputs as `planner.capture`
    does: no data-dependent control flow, no .item(); the traced output has the real shape."""
    model, inputs = zoo.make(name, size="tiny", seed=0)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = list(state)

    def forward(*flat: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, flat[:len(names)])), tuple(flat[len(names):]))

    state_before = {key: value.clone() for key, value in model.state_dict().items()}
    traced = make_fx(forward, tracing_mode="fake")(*state.values(), *inputs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), f"{name}: tracing changed {key}"
    output_node = next(node for node in traced.graph.nodes if node.op == "output")
    traced_output = output_node.args[0][0] if isinstance(output_node.args[0], (tuple, list)) else output_node.args[0]
    assert traced_output.meta["val"].shape == model(*inputs).shape
    assert sum(node.op == "call_function" for node in traced.graph.nodes) > 10


@pytest.mark.parametrize("bad_call, message", [
    (lambda: zoo.make("vgg"), "unknown zoo model 'vgg'"),
    (lambda: zoo.make("gpt", size="huge"), "unknown size 'huge'"),
    (lambda: zoo.make_unet("medium"), "unknown size 'medium' for zoo model 'unet'"),
])
def test_unknown_names_fail_with_the_choices(bad_call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bad_call()
