"""The torch-free description of one training step: ops, values, sizes, costs.

A `Graph` is the joint forward+backward graph of a training step as the solvers see it.
It never imports torch: `planner.capture`/`planner.profile` build it from an FX graph,
tests build it by hand or at random.

Memory is modelled at the level of *storages*, not values: a view or alias has
``size_bytes == 0`` and ``alias_of`` names the root value that owns the storage. A storage
is alive while any value that aliases it is alive (docs/design.md, "Memory is counted by
storage").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, Iterable, Mapping

from solvers.errors import PlanFormatError, UnsupportedGraphError

GRAPH_FORMAT = "memsched.graph/1"


class Phase(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class ValueKind(str, Enum):
    PARAMETER = "parameter"    # resident for the whole step
    BUFFER = "buffer"          # resident for the whole step (BatchNorm stats, ...)
    INPUT = "input"            # user input, held by the caller for the whole step
    TANGENT = "tangent"        # gradient of an output, arrives when backward starts
    ACTIVATION = "activation"  # produced by a forward op
    GRADIENT_WORK = "backward"  # produced by a backward op

    @property
    def is_placeholder(self) -> bool:
        return self in (ValueKind.PARAMETER, ValueKind.BUFFER, ValueKind.INPUT, ValueKind.TANGENT)


@dataclass(frozen=True)
class Value:
    """A tensor of the step.

    ``size_bytes`` is the new device storage the value owns; 0 for a view or alias, whose
    storage belongs to ``alias_of`` (the root value, never itself an alias).
    """

    name: str
    size_bytes: int
    kind: ValueKind
    producer: str | None = None        # op name; None for placeholders
    alias_of: str | None = None
    shape: tuple[int, ...] = ()
    dtype: str = ""

    @property
    def root(self) -> str:
        return self.alias_of or self.name

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "size_bytes": self.size_bytes, "kind": self.kind.value}
        if self.producer is not None:
            data["producer"] = self.producer
        if self.alias_of is not None:
            data["alias_of"] = self.alias_of
        data["shape"] = list(self.shape)
        data["dtype"] = self.dtype
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Value":
        return cls(name=data["name"], size_bytes=int(data["size_bytes"]), kind=ValueKind(data["kind"]),
                   producer=data.get("producer"), alias_of=data.get("alias_of"),
                   shape=tuple(int(d) for d in data.get("shape", ())), dtype=data.get("dtype", ""))


@dataclass(frozen=True)
class Op:
    """One operation of the step (an aten op of the FX joint graph).

    ``time_ms`` is its measured run time; ``tmp_bytes`` workspace alive only while it runs.
    ``random`` ops draw random numbers: a recomputation replays the forward's RNG state.
    ``recomputable`` is False for ops with effects that must happen once (buffer updates).
    ``reuses`` names inputs whose storage the op may write its (first, storage-owning)
    output into, as a compiled kernel does in place: where one of them dies at this op in a
    plan's program, `simulate` gives the output that storage instead of a new one. Empty
    for the eager program, which allocates every output; set by the planner for
    ``compile=True`` (`planner.compiled.with_compiled_costs`).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    phase: Phase
    time_ms: float = 0.0
    tmp_bytes: int = 0
    recomputable: bool = True
    random: bool = False
    target: str = ""    # e.g. "aten.addmm.default", for display
    module: str = ""    # nn.Module path the op came from, for display
    reuses: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "phase": self.phase.value, "time_ms": self.time_ms, "tmp_bytes": self.tmp_bytes,
                "recomputable": self.recomputable, "random": self.random,
                "target": self.target, "module": self.module}
        if self.reuses:
            data["reuses"] = list(self.reuses)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Op":
        return cls(name=data["name"], inputs=tuple(data["inputs"]), outputs=tuple(data["outputs"]),
                   phase=Phase(data["phase"]), time_ms=float(data.get("time_ms", 0.0)),
                   tmp_bytes=int(data.get("tmp_bytes", 0)), recomputable=bool(data.get("recomputable", True)),
                   random=bool(data.get("random", False)), target=data.get("target", ""),
                   module=data.get("module", ""), reuses=tuple(data.get("reuses", ())))


@dataclass(frozen=True)
class Transfer:
    """Host<->device copy bandwidth, in bytes per millisecond, and a fixed latency per copy."""

    host_to_device_bytes_per_ms: float = 25e6   # 25 GB/s, PCIe 4 x16 pinned
    device_to_host_bytes_per_ms: float = 25e6
    latency_ms: float = 0.01
    source: str = "nominal"                   # "measured on <device>", "nominal", "target <name>"

    @property
    def real(self) -> bool:
        """Measured on the device, or a named target the user plans for: offload may be
        chosen. A nominal figure (planning on a CPU, where host and device are one memory)
        never makes offload worth it."""
        return self.source.startswith(("measured", "target"))

    def to_json(self) -> dict[str, Any]:
        return {"host_to_device_bytes_per_ms": self.host_to_device_bytes_per_ms,
                "device_to_host_bytes_per_ms": self.device_to_host_bytes_per_ms,
                "latency_ms": self.latency_ms, "source": self.source}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Transfer":
        return cls(**{key: data[key] for key in ("host_to_device_bytes_per_ms", "device_to_host_bytes_per_ms",
                                                 "latency_ms", "source") if key in data})


def write_json_file(path: str, data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as indented JSON (graphs and plans are JSON, never pickle)."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1, sort_keys=sort_keys)


def read_json_file(path: str) -> Any:
    """The JSON in ``path``; `PlanFormatError` naming the file when it cannot be read or is not JSON."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlanFormatError(f"{path}: not valid JSON ({error}); was the file truncated?") from error
    except OSError as error:
        raise PlanFormatError(f"{path}: cannot read it ({error.strerror}); pass the path of a file written by "
                              "Plan.save() or Graph.save()") from error


# Named transfer profiles for planning away from the device (``optimize(..., target=...)``):
# practical pinned-copy bandwidth per direction, bytes per ms (1e6 B/ms = 1 GB/s).
TARGETS: dict[str, Transfer] = {
    "h100-pcie5": Transfer(50e6, 50e6, 0.01, "target h100-pcie5 (PCIe 5 x16, ~50 GB/s per direction)"),
    "h100-pcie4": Transfer(25e6, 25e6, 0.01, "target h100-pcie4 (PCIe 4 x16, ~25 GB/s per direction)"),
    "a100-pcie4": Transfer(25e6, 25e6, 0.01, "target a100-pcie4 (PCIe 4 x16, ~25 GB/s per direction)"),
    "pcie3": Transfer(12e6, 12e6, 0.01, "target pcie3 (PCIe 3 x16, ~12 GB/s per direction)"),
}


@dataclass(frozen=True)
class Graph:
    """Joint forward+backward graph of one training step, ops in a valid execution order.

    ``placeholders`` are the values that exist before the step (parameters, buffers,
    inputs) or arrive with the backward (tangents). ``forward_outputs`` are returned to the
    user and stay alive until the step ends, except ``released_outputs``, which the caller
    drops before the backward (the runtime checks it); ``gradients`` are the backward's results
    (parameter and input gradients) and stay alive too.
    """

    ops: tuple[Op, ...]
    values: tuple[Value, ...]
    placeholders: tuple[str, ...]
    forward_outputs: tuple[str, ...]
    gradients: tuple[str, ...]
    transfer: Transfer = field(default_factory=Transfer)
    device: str = "cpu"
    name: str = ""
    caller_bytes: int = 0   # what the caller allocates around the step from the backward on:
                            # the loss reduction of non-scalar outputs and autograd's seed gradient
    rng_state_bytes: int = 0   # device bytes of one saved generator state (CPU: a 5,056 B tensor
                               # made outside the dispatcher; CUDA: host memory, 0): `simulate`
                               # counts one per random op the plan re-runs, and one during a replay
    released_outputs: tuple[str, ...] = ()   # forward outputs the caller drops before the backward
                                             # (``loss = model(x).loss``): held to the forward's end only

    def __post_init__(self) -> None:
        self.validate()

    # -- lookups -----------------------------------------------------------------------
    @cached_property
    def op_by_name(self) -> dict[str, Op]:
        return {op.name: op for op in self.ops}

    @cached_property
    def value_by_name(self) -> dict[str, Value]:
        return {value.name: value for value in self.values}

    def op(self, name: str) -> Op:
        return self.op_by_name[name]

    def value(self, name: str) -> Value:
        return self.value_by_name[name]

    @cached_property
    def forward_ops(self) -> tuple[Op, ...]:
        return tuple(op for op in self.ops if op.phase is Phase.FORWARD)

    @cached_property
    def backward_ops(self) -> tuple[Op, ...]:
        return tuple(op for op in self.ops if op.phase is Phase.BACKWARD)

    @cached_property
    def consumers(self) -> dict[str, tuple[str, ...]]:
        """Value name -> names of the ops that read it, in graph order."""
        readers: dict[str, list[str]] = {value.name: [] for value in self.values}
        for op in self.ops:
            for name in dict.fromkeys(op.inputs):
                readers[name].append(op.name)
        return {name: tuple(ops) for name, ops in readers.items()}

    @cached_property
    def random_forward_ops(self) -> frozenset[str]:
        """Names of the forward ops that draw random numbers."""
        return frozenset(op.name for op in self.forward_ops if op.random)

    @cached_property
    def distinct_inputs(self) -> dict[str, tuple[str, ...]]:
        """Op name -> the values it reads, each once, in order."""
        return {op.name: tuple(dict.fromkeys(op.inputs)) for op in self.ops}

    @cached_property
    def read_names_by_root(self) -> dict[str, tuple[str, ...]]:
        """Activation storage root -> its names (the root and its views) that some op reads."""
        names: dict[str, list[str]] = {}
        for value in self.values:
            if value.kind is ValueKind.ACTIVATION and self.consumers[value.name]:
                names.setdefault(value.root, []).append(value.name)
        return {root: tuple(found) for root, found in names.items()}

    @cached_property
    def pinned_values(self) -> frozenset[str]:
        """Values whose storage the caller or autograd holds for the whole step (or the
        whole backward, for tangents); freeing our reference releases nothing."""
        return frozenset(self.placeholders) | frozenset(self.forward_outputs) | frozenset(self.gradients)

    @cached_property
    def saved_candidates(self) -> tuple[str, ...]:
        """Forward values that the backward reads: what autograd would save."""
        names = []
        for value in self.values:
            if value.kind is not ValueKind.ACTIVATION:
                continue
            if any(self.op(reader).phase is Phase.BACKWARD for reader in self.consumers[value.name]):
                names.append(value.name)
        return tuple(names)

    def resident_bytes(self, kinds: Iterable[ValueKind] = (ValueKind.PARAMETER, ValueKind.BUFFER,
                                                            ValueKind.INPUT)) -> int:
        """Bytes of the distinct storages of the placeholders of the given kinds."""
        kinds = set(kinds)
        return sum(self.value(name).size_bytes for name in self.placeholders
                   if self.value(name).kind in kinds)

    def gradient_bytes(self) -> int:
        return sum(self.value(self.value(name).root).size_bytes
                   for name in dict.fromkeys(self.value(g).root for g in self.gradients))

    @property
    def total_time_ms(self) -> float:
        return sum(op.time_ms for op in self.ops)

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `UnsupportedGraphError` unless names are unique, every value has one
        producer or is a placeholder, ops read only values defined before them, forward
        ops never read backward values, and alias roots own their storage."""
        values = {}
        for value in self.values:
            if value.name in values:
                raise UnsupportedGraphError(f"graph {self.name!r}: value {value.name!r} is defined twice")
            values[value.name] = value
        defined = set()
        for name in self.placeholders:
            if name not in values:
                raise UnsupportedGraphError(f"graph {self.name!r}: placeholder {name!r} has no Value")
            if not values[name].kind.is_placeholder:
                raise UnsupportedGraphError(f"graph {self.name!r}: placeholder {name!r} has kind {values[name].kind}")
            defined.add(name)
        op_names = set()
        for op in self.ops:
            if op.name in op_names:
                raise UnsupportedGraphError(f"graph {self.name!r}: op {op.name!r} is defined twice")
            op_names.add(op.name)
            for name in op.inputs:
                if name not in defined:
                    raise UnsupportedGraphError(
                        f"graph {self.name!r}: op {op.name!r} reads {name!r} before it is defined; "
                        "ops must be listed in an execution order")
                if op.phase is Phase.FORWARD and values[name].kind in (ValueKind.TANGENT, ValueKind.GRADIENT_WORK):
                    raise UnsupportedGraphError(
                        f"graph {self.name!r}: forward op {op.name!r} reads backward value {name!r}")
            for name in op.reuses:
                if name not in op.inputs:
                    raise UnsupportedGraphError(
                        f"graph {self.name!r}: op {op.name!r} reuses {name!r}, which it does not read")
            for name in op.outputs:
                if name not in values or values[name].producer != op.name:
                    raise UnsupportedGraphError(
                        f"graph {self.name!r}: output {name!r} of op {op.name!r} has no Value produced by it")
                if name in defined:
                    raise UnsupportedGraphError(f"graph {self.name!r}: value {name!r} is produced twice")
                defined.add(name)
        for value in self.values:
            if value.name not in defined:
                raise UnsupportedGraphError(f"graph {self.name!r}: value {value.name!r} is never produced")
            if value.alias_of is not None:
                root = values.get(value.alias_of)
                if root is None or root.alias_of is not None:
                    raise UnsupportedGraphError(
                        f"graph {self.name!r}: {value.name!r} aliases {value.alias_of!r}, which is not a root value")
                if value.size_bytes != 0:
                    raise UnsupportedGraphError(f"graph {self.name!r}: alias {value.name!r} must have size_bytes 0")
        for name in self.forward_outputs:
            if name not in values or values[name].kind in (ValueKind.TANGENT, ValueKind.GRADIENT_WORK):
                raise UnsupportedGraphError(f"graph {self.name!r}: forward output {name!r} is not a forward value")
        for name in self.gradients:
            if name not in values:
                raise UnsupportedGraphError(f"graph {self.name!r}: gradient {name!r} is not a value")
        for name in self.released_outputs:
            if name not in self.forward_outputs:
                raise UnsupportedGraphError(f"graph {self.name!r}: released output {name!r} is not a forward output")

    # -- identity and JSON ---------------------------------------------------------------
    def structure_json(self) -> dict[str, Any]:
        """What the hash covers: names, dataflow, sizes, shapes; not timings or bandwidth,
        which change from one profiling run to the next."""
        return {
            # ``reuses`` only where set: the graphs of eager plans keep their hashes
            "ops": [[op.name, list(op.inputs), list(op.outputs), op.phase.value, op.recomputable, op.random,
                     op.target] + ([list(op.reuses)] if op.reuses else []) for op in self.ops],
            "values": [[v.name, v.size_bytes, v.kind.value, v.alias_of, list(v.shape), v.dtype] for v in self.values],
            "placeholders": list(self.placeholders),
            "forward_outputs": list(self.forward_outputs),
            "gradients": list(self.gradients),
            "caller_bytes": self.caller_bytes,
            "rng_state_bytes": self.rng_state_bytes,
            **({"released_outputs": list(self.released_outputs)} if self.released_outputs else {}),
        }

    @cached_property
    def hash(self) -> str:
        text = json.dumps(self.structure_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"format": GRAPH_FORMAT, "name": self.name, "device": self.device, "hash": self.hash,
                "caller_bytes": self.caller_bytes, "rng_state_bytes": self.rng_state_bytes,
                "transfer": self.transfer.to_json(),
                "placeholders": list(self.placeholders), "forward_outputs": list(self.forward_outputs),
                "gradients": list(self.gradients), "released_outputs": list(self.released_outputs),
                "values": [v.to_json() for v in self.values], "ops": [op.to_json() for op in self.ops]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Graph":
        if not isinstance(data, Mapping) or data.get("format") != GRAPH_FORMAT:
            raise PlanFormatError(f"not a memsched graph (expected format {GRAPH_FORMAT!r})")
        try:
            graph = cls(ops=tuple(Op.from_json(op) for op in data["ops"]),
                        values=tuple(Value.from_json(v) for v in data["values"]),
                        placeholders=tuple(data["placeholders"]), forward_outputs=tuple(data["forward_outputs"]),
                        gradients=tuple(data["gradients"]), transfer=Transfer.from_json(data.get("transfer", {})),
                        device=data.get("device", "cpu"), name=data.get("name", ""),
                        caller_bytes=int(data.get("caller_bytes", 0)),
                        rng_state_bytes=int(data.get("rng_state_bytes", 0)),
                        released_outputs=tuple(data.get("released_outputs", ())))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PlanFormatError(f"corrupt memsched graph: {error!r}") from error
        except UnsupportedGraphError as error:
            raise PlanFormatError(f"invalid memsched graph: {error}") from error
        if "hash" in data and data["hash"] != graph.hash:
            raise PlanFormatError(f"graph file hash {data['hash']} does not match its content ({graph.hash}); "
                                  "the file was edited or truncated")
        return graph

    def save(self, path: str) -> None:
        write_json_file(path, self.to_json(), sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "Graph":
        return cls.from_json(read_json_file(path))



def backward_as_late_as_possible(ops: Iterable[Op], tangents: Iterable[str]) -> tuple[Op, ...]:
    """The same ops with the backward reordered: the ops that carry gradients (read a
    tangent, directly or through other backward ops) keep their order, and each op that
    reads only forward values (the ``detach`` of a saved tensor, a BatchNorm statistic's
    ``squeeze``) moves to just before its first consumer. Left at the start of the
    backward, such ops would force every dropped value to be recomputed at once. Forward
    order is unchanged; the result is a valid execution order. O(ops + edges).
    """
    ops = tuple(ops)
    backward = [op for op in ops if op.phase is Phase.BACKWARD]
    producer = {name: op for op in backward for name in op.outputs}
    carries_gradient = set(tangents)
    for op in backward:
        if any(name in carries_gradient for name in op.inputs):
            carries_gradient.update(op.outputs)
    emitted: set[str] = set()
    order: list[Op] = [op for op in ops if op.phase is Phase.FORWARD]

    def emit(op: Op) -> None:
        stack: list[tuple[Op, bool]] = [(op, False)]
        while stack:
            current, inputs_emitted = stack.pop()
            if current.name in emitted:
                continue
            if inputs_emitted:
                emitted.add(current.name)
                order.append(current)
                continue
            stack.append((current, True))
            for name in reversed(current.inputs):
                dependency = producer.get(name)
                if dependency is not None and dependency.name not in emitted:
                    stack.append((dependency, False))

    for op in backward:
        if any(name in carries_gradient for name in op.outputs):
            emit(op)
    for op in backward:
        emit(op)
    return tuple(order)
