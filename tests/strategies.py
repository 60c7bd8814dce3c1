"""Hypothesis strategies for the torch-free solver core: random valid `Graph`s and budgets.

Times are multiples of 0.25 ms, so sums of op times are exact in floating point and
tests may compare simulated times with ``==``.
"""

from __future__ import annotations

from hypothesis import strategies as st

from solvers import Graph, Op, Phase, Value, ValueKind, least_feasible_lower_bound, simulate, solve

KEEP_ALL_BUDGET_BYTES = 10**18

value_sizes = st.integers(1, 32).map(lambda units: units * 16)
op_times = st.integers(1, 16).map(lambda quarters: quarters / 4)
workspace_sizes = st.sampled_from((0, 0, 0, 16, 64, 256))


@st.composite
def small_graphs(draw: st.DrawFn, max_forward_ops: int = 8) -> Graph:
    """A random joint forward+backward graph with at most ``max_forward_ops`` forward ops.

    Parameters, an input and maybe a buffer; forward ops with one or two outputs, some
    views (``size_bytes == 0``, ``alias_of`` the root), some random ops, some buffer
    updates (not recomputable, their result may be read later); a tangent per forward
    output; backward ops that read a tangent or an earlier backward value, saved forward
    values, and produce the gradients; sometimes ``caller_bytes``.
    """
    values: list[Value] = []
    ops: list[Op] = []
    by_name: dict[str, Value] = {}

    def add(value: Value) -> str:
        values.append(value)
        by_name[value.name] = value
        return value.name

    def root(name: str) -> str:
        return by_name[name].root

    param_count = draw(st.integers(1, 3))
    params = [add(Value(f"w{i}", draw(value_sizes), ValueKind.PARAMETER)) for i in range(param_count)]
    placeholders = params + [add(Value("x", draw(value_sizes), ValueKind.INPUT))]
    buffer = add(Value("running_stat", 16, ValueKind.BUFFER)) if draw(st.booleans()) else None
    if buffer is not None:
        placeholders.append(buffer)

    forward_pool = [name for name in placeholders if name != buffer]   # what forward ops may read
    activations: list[str] = []
    op_kinds = ("compute", "compute", "compute", "view") + (("update",) if buffer is not None else ())
    for index in range(draw(st.integers(1, max_forward_ops))):
        kind = draw(st.sampled_from(op_kinds)) if activations else "compute"
        name = f"f{index}"
        if kind == "view":
            source = draw(st.sampled_from(forward_pool))
            outputs = (add(Value(f"v{index}", 0, ValueKind.ACTIVATION, producer=name, alias_of=root(source))),)
            ops.append(Op(name, (source,), outputs, Phase.FORWARD, 0.0, target="aten.view.default"))
        elif kind == "update":
            source = draw(st.sampled_from(activations))
            outputs = (add(Value(f"s{index}", 16, ValueKind.ACTIVATION, producer=name)),)
            ops.append(Op(name, (buffer, source), outputs, Phase.FORWARD, draw(op_times), recomputable=False,
                          target="aten.add_.Tensor"))
        else:
            inputs = tuple(draw(st.lists(st.sampled_from(forward_pool[-4:]), min_size=1, max_size=2)))
            outputs = tuple(add(Value(f"a{index}_{j}", draw(value_sizes), ValueKind.ACTIVATION, producer=name))
                            for j in range(draw(st.integers(1, 2))))
            ops.append(Op(name, inputs, outputs, Phase.FORWARD, draw(op_times), tmp_bytes=draw(workspace_sizes),
                          random=draw(st.integers(0, 4)) == 0, target="aten.mm.default"))
        forward_pool.extend(outputs)
        activations.extend(outputs)

    forward_outputs = [ops[-1].outputs[0]]
    extra_output = draw(st.sampled_from(activations))
    if extra_output not in forward_outputs and draw(st.booleans()):
        forward_outputs.append(extra_output)
    tangents = [add(Value(f"tangent{i}", max(16, by_name[root(out)].size_bytes), ValueKind.TANGENT))
                for i, out in enumerate(forward_outputs)]
    placeholders.extend(tangents)

    backward_pool = list(tangents)     # gradients flowing backward
    backward_values: list[str] = []
    for index in range(draw(st.integers(1, len(ops) + 2))):
        name = f"b{index}"
        if backward_values and draw(st.integers(0, 5)) == 0:
            source = draw(st.sampled_from(backward_values))
            outputs = (add(Value(f"gv{index}", 0, ValueKind.GRADIENT_WORK, producer=name, alias_of=root(source))),)
            ops.append(Op(name, (source,), outputs, Phase.BACKWARD, 0.0, target="aten.view.default"))
        else:
            incoming = draw(st.sampled_from(backward_pool[-3:]))
            saved = draw(st.lists(st.sampled_from(forward_pool), max_size=2))
            more = draw(st.lists(st.sampled_from(backward_pool), max_size=1))
            outputs = tuple(add(Value(f"g{index}_{j}", draw(value_sizes), ValueKind.GRADIENT_WORK, producer=name))
                            for j in range(draw(st.integers(1, 2))))
            ops.append(Op(name, (incoming, *saved, *more), outputs, Phase.BACKWARD, draw(op_times),
                          tmp_bytes=draw(workspace_sizes), target="aten.mm.default"))
        backward_pool.extend(outputs)
        backward_values.extend(outputs)
    gradients = draw(st.lists(st.sampled_from(backward_values), min_size=1, max_size=param_count, unique=True))
    return Graph(ops=tuple(ops), values=tuple(values), placeholders=tuple(placeholders),
                 forward_outputs=tuple(forward_outputs), gradients=tuple(gradients), name="random",
                 caller_bytes=draw(st.sampled_from((0, 0, 16))))


@st.composite
def chain_graphs(draw: st.DrawFn, length: int) -> Graph:
    """A chain of ``length`` layers ``a_i = f_i(a_{i-1}, w_i)`` (``a_0`` the input), its
    backward ``b_i: (grad_a_i, a_{i-1}, w_i) -> (grad_a_{i-1}, grad_w_i)`` in reverse,
    random sizes and times. ``st.integers(1, 8).flatmap(chain_graphs)`` varies the length."""
    values = [Value("a0", draw(value_sizes), ValueKind.INPUT)]
    ops: list[Op] = []
    for i in range(1, length + 1):
        values += [Value(f"w{i}", draw(value_sizes), ValueKind.PARAMETER),
                   Value(f"a{i}", draw(value_sizes), ValueKind.ACTIVATION, producer=f"f{i}")]
        ops.append(Op(f"f{i}", (f"a{i - 1}", f"w{i}"), (f"a{i}",), Phase.FORWARD, draw(op_times),
                      tmp_bytes=draw(workspace_sizes), target="aten.mm.default"))
    values.append(Value(f"grad_a{length}", values[-1].size_bytes, ValueKind.TANGENT))
    for i in range(length, 0, -1):
        outputs = (f"grad_w{i}",) + ((f"grad_a{i - 1}",) if i > 1 else ())
        values += [Value(f"grad_w{i}", next(v.size_bytes for v in values if v.name == f"w{i}"),
                         ValueKind.GRADIENT_WORK, producer=f"b{i}")]
        if i > 1:
            values.append(Value(f"grad_a{i - 1}", next(v.size_bytes for v in values if v.name == f"a{i - 1}"),
                                ValueKind.GRADIENT_WORK, producer=f"b{i}"))
        ops.append(Op(f"b{i}", (f"grad_a{i}", f"a{i - 1}", f"w{i}"), outputs, Phase.BACKWARD, draw(op_times),
                      tmp_bytes=draw(workspace_sizes), target="aten.mm.default"))
    placeholders = ("a0",) + tuple(f"w{i}" for i in range(1, length + 1)) + (f"grad_a{length}",)
    return Graph(ops=tuple(ops), values=tuple(values), placeholders=placeholders,
                 forward_outputs=(f"a{length}",), gradients=tuple(f"grad_w{i}" for i in range(1, length + 1)),
                 name=f"chain{length}")


def keep_all_peak_bytes(graph: Graph) -> int:
    """Simulated peak of the keep-all plan: what autograd alone would use."""
    return simulate(graph, solve(graph, KEEP_ALL_BUDGET_BYTES, "none")).peak_bytes


def budget_between(graph: Graph, frac: float) -> int:
    """``frac`` 0 -> the lower bound every solver respects, 1 -> the keep-all peak, linear
    between them and beyond (``frac`` in [0, 1.2])."""
    lower_bytes = least_feasible_lower_bound(graph).total
    upper_bytes = keep_all_peak_bytes(graph)
    return lower_bytes + int(round(frac * (upper_bytes - lower_bytes)))
