"""planner.memory: the step memory tracker, checked against hand counts, the autograd engine
and torch.profiler's allocator events.

All byte counts below are float32 (4 bytes) unless stated; F = 4.
"""

from __future__ import annotations

import bisect
import itertools
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from planner import memory
from planner.memory import (CUDA_ALLOCATOR, STORAGE_TRACKER, MemoryReport, StepMemoryTracker, mark_host,
                            measure_step_memory)

F = 4  # bytes per float32


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.randn(4, 8)


# --------------------------------------------------------------------------- hand count


def test_hand_counted_mlp_step_is_exact() -> None:
    """Linear(8,16) -> ReLU -> Linear(16,2) on x[4,8], loss = sum; x needs no grad.

    Resident (counted from the start):
        W1 16x8 = 512 B, b1 16 = 64 B, W2 2x16 = 128 B, b2 2 = 8 B, x 4x8 = 128 B   -> 840 B
    Forward (Sequential drops each intermediate as soon as the next layer returned):
        addmm  h = x W1^T + b1        4x16  256   live 1096
        relu   a = relu(h)            4x16  256   live 1352  <- forward peak (h, a)
               h dies (ReLU saves its output a, addmm #1 saves x and W1^T, both resident)
        addmm  y = a W2^T + b2        4x2    32   live 1128
        sum    loss                   1       4   live 1132
               y dies (SumBackward saves only the shape)                        live 1100
    Backward (the engine's GraphRoot holds the seed gradient until the end of backward):
        ones_like  g_loss             1       4   live 1104   (expand: a view, 0 B)
        AddmmBackward #2: mm  g_a = g_y W2            4x16  256  live 1360
                          mm  a^T g_y  -> W2.grad    16x2   128  live 1488  (t(): a view)
                          sum g_y over 0 -> b2.grad   1x2     8  live 1496  (view: 0 B)
        ReluBackward: threshold_backward  g_h        4x16  256  live 1752
               then a (saved) and g_a die                          live 1240
        AddmmBackward #1 (x needs no grad, so no mm for it):
                          mm  x^T g_h  -> W1.grad     8x16  512  live 1752
                          sum g_h over 0 -> b1.grad   1x16   64  live 1816  <- step peak
               g_h dies; at the end of backward the seed g_loss dies     live 1556
    End: resident 840 + loss 4 + grads (512 + 64 + 128 + 8) = 1556.
    """
    model, x = _mlp()
    resident = list(model.parameters()) + [x]
    with StepMemoryTracker("cpu", resident) as tracker:
        loss = model(x).sum()
        forward_peak_bytes = tracker.peak_bytes
        loss.backward()
    report = tracker.report()

    resident_bytes = (16 * 8 + 16 + 2 * 16 + 2 + 4 * 8) * F
    grad_bytes = (16 * 8 + 16 + 2 * 16 + 2) * F
    loss_bytes = seed_bytes = 1 * F
    assert report.start_bytes == resident_bytes == 840
    assert forward_peak_bytes == resident_bytes + 2 * (4 * 16 * F) == 1352
    # peak: loss, seed, W2.grad, b2.grad, g_h, W1.grad, b1.grad all alive in AddmmBackward #1
    assert report.peak_bytes == resident_bytes + loss_bytes + seed_bytes + grad_bytes + 4 * 16 * F == 1816
    assert report.end_bytes == resident_bytes + loss_bytes + grad_bytes == 1556
    assert report.host_peak_bytes == 0
    assert (report.device, report.method) == ("cpu", STORAGE_TRACKER)


# --------------------------------------------------------------------------- backward


class _BackwardScratch(torch.autograd.Function):
    """Identity whose backward allocates a scratch tensor and records where it ran."""

    scratch_elements = 256 * 1024            # 1 MiB of float32
    seen: dict[str, object] = {}

    @staticmethod
    def forward(ctx, tensor):  # noqa: ANN001, ANN205
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        _BackwardScratch.seen["thread"] = threading.get_ident()
        _BackwardScratch.seen["modes"] = list(_get_current_dispatch_mode_stack())
        scratch = torch.ones(_BackwardScratch.scratch_elements)
        return grad * scratch[0]


def test_backward_runs_on_calling_thread_and_its_allocations_count() -> None:
    """On CPU the autograd engine runs backward on the thread that called .backward(),
    where the tracker's dispatch mode is active, so a backward-only allocation shows in the peak."""
    x = torch.randn(16, requires_grad=True)
    with StepMemoryTracker("cpu", [x]) as tracker:
        loss = _BackwardScratch.apply(x).sum()
        before_backward_peak_bytes = tracker.peak_bytes
        loss.backward()
    report = tracker.report()
    scratch_bytes = _BackwardScratch.scratch_elements * F
    assert before_backward_peak_bytes < scratch_bytes
    assert _BackwardScratch.seen["thread"] == threading.get_ident()
    assert tracker._mode in _BackwardScratch.seen["modes"]
    assert report.peak_bytes >= report.start_bytes + scratch_bytes
    # the scratch died inside backward; what stays is x.grad (16 F) and the loss (F)
    assert report.end_bytes == report.start_bytes + 16 * F + F


def test_every_op_of_backward_is_seen_on_the_calling_thread() -> None:
    seen: list[tuple[str, int]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            seen.append((str(func), threading.get_ident()))
            return func(*args, **(kwargs or {}))

    model, x = _mlp()
    with StepMemoryTracker("cpu", list(model.parameters()) + [x]), Recorder():
        model(x).sum().backward()
    names = [name for name, _ in seen]
    assert "aten.threshold_backward.default" in names and names.count("aten.mm.default") == 3
    assert {ident for _, ident in seen} == {threading.get_ident()}


# --------------------------------------------------------------------------- storages, not tensors


def test_views_and_shared_storage_are_counted_once() -> None:
    with StepMemoryTracker("cpu") as tracker:
        base = torch.empty(100)                                # 400 B
        views = [base.view(10, 10), base[::2], base.view(10, 10).t(), base.unsqueeze(0), base.detach()]
        pieces = torch.split(base, 10)                          # a tuple of views
        chunks = list(base.chunk(4))
        reshaped = base.reshape(4, 25)                          # a view (contiguous)
        assert tracker.current_bytes == 100 * F
        copy = base.view(10, 10).t().contiguous()               # not contiguous: a new storage
        assert tracker.current_bytes == 200 * F
        del base, pieces, chunks, copy
        assert tracker.current_bytes == 100 * F                 # the views keep the storage alive
        del views
        assert tracker.current_bytes == 100 * F
        del reshaped
        assert tracker.current_bytes == 0
    assert tracker.report().peak_bytes == 200 * F


def test_outputs_in_tuples_and_lists_are_counted() -> None:
    x = torch.randn(50)
    with StepMemoryTracker("cpu", [x]) as tracker:
        values, indices = torch.sort(x)                         # 50 F + 50 int64
        assert tracker.current_bytes == 50 * F + 50 * F + 50 * 8
        summed = torch._foreach_add([x, x], 1.0)                # a list of two new tensors
        assert tracker.current_bytes == 50 * F + 50 * F + 50 * 8 + 2 * 50 * F
        del values, indices, summed
    assert tracker.report().end_bytes == 50 * F


def test_in_place_out_and_resize_follow_the_storage() -> None:
    with StepMemoryTracker("cpu") as tracker:
        a = torch.zeros(100)
        a.add_(1).mul_(2)                                       # in place: nothing new
        assert tracker.current_bytes == 100 * F
        out = torch.empty(0)                                    # 0 B
        torch.add(a, 1, out=out)                                # out= resizes it to 400 B
        assert tracker.current_bytes == 200 * F
        out.resize_(300)                                        # growth through Tensor.resize_
        assert tracker.current_bytes == 400 * F
        del out
        assert tracker.current_bytes == 100 * F
    # the resize copied the 100 F of `out` into a new 300 F block before freeing the old
    # one: the allocator held 100 (a) + 100 + 300 F at once, and its events (OpScratch) show it
    assert tracker.report().peak_bytes == 500 * F


def test_zero_size_tensors() -> None:
    with StepMemoryTracker("cpu") as tracker:
        empties = [torch.empty(0), torch.zeros(0, 5), torch.ones(3, 0).t(), torch.randn(0).sum()]
        assert tracker.current_bytes == F                       # only the sum, a 1-element tensor
        del empties
    report = tracker.report()
    assert (report.peak_bytes, report.end_bytes) == (F, 0)


def test_sparse_tensors_count_their_components() -> None:
    dense = torch.zeros(5, 5)
    dense[0, 1], dense[2, 3] = 1.0, 2.0
    with StepMemoryTracker("cpu", [dense]) as tracker:
        sparse = dense.to_sparse()                              # indices 2x2 int64 + values 2 F
        assert tracker.current_bytes == 25 * F + 2 * 2 * 8 + 2 * F
        del sparse
        assert tracker.current_bytes == 25 * F


# --------------------------------------------------------------------------- what counts


def test_resident_tensors_count_from_the_start_once_per_storage() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight                              # tied: one storage
    tokens = torch.randint(0, 10, (3,))
    resident = [embedding.weight, head.weight, embedding.weight[0], tokens]
    with StepMemoryTracker("cpu", resident) as tracker:
        assert tracker.current_bytes == 10 * 4 * F + 3 * 8
    assert tracker.report().start_bytes == 10 * 4 * F + 3 * 8


def test_tensors_from_before_tracking_are_not_counted() -> None:
    outside = torch.zeros(1000)
    with StepMemoryTracker("cpu") as tracker:
        outside.add_(1)                                         # in place on an uncounted storage
        view = outside[:10]
        assert tracker.current_bytes == 0
        doubled = outside * 2                                   # but what the step makes counts
        assert tracker.current_bytes == 1000 * F
        del view, doubled
    del outside                                                 # after exit: no callback, no change
    assert tracker.report().end_bytes == 0 and tracker.current_bytes == 0


def test_freed_storages_return_their_bytes_and_saved_tensors_die_in_backward() -> None:
    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with StepMemoryTracker("cpu", [weight, x]) as tracker:
        temporary = torch.randn(1000)
        del temporary
        assert tracker.current_bytes == tracker.report().start_bytes
        hidden = torch.tanh(x @ weight)       # mm saves x and weight (resident), tanh its output;
        loss = hidden.sum()                   # the mm result died as soon as tanh returned
        del hidden
        assert tracker.current_bytes - tracker.report().start_bytes == 32 * 64 * F + F
        loss.backward()
    report = tracker.report()
    assert report.peak_bytes > report.start_bytes + 1000 * F
    assert report.end_bytes == report.start_bytes + F + 64 * 64 * F       # loss + weight.grad


def test_the_tracker_changes_no_result() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 3))
    x = torch.randn(16, 8)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = nn.functional.cross_entropy(model(x), torch.arange(16) % 3)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = step()
    (tracked_loss, tracked_grads), report = measure_step_memory(step, "cpu", list(model.parameters()) + [x])
    assert torch.equal(plain_loss, tracked_loss)
    assert all(torch.equal(p, q) for p, q in zip(plain_grads, tracked_grads))
    assert report.peak_bytes > report.start_bytes


# --------------------------------------------------------------------------- host copies


def test_mark_host_keeps_offloaded_copies_out_of_the_device_peak() -> None:
    """An offload/prefetch round trip: the device never holds two copies at once."""
    size = 1000
    with StepMemoryTracker("cpu") as tracker:
        activation = torch.randn(size)                           # device: 1000 F
        host_copy = activation.to("cpu", copy=True)              # counted as device until marked
        tracker.mark_host(host_copy)                             # retroactive: out of the peak
        assert (tracker.current_bytes, tracker.host_bytes) == (size * F, size * F)
        del activation                                           # offloaded: device free
        assert tracker.current_bytes == 0
        prefetched = host_copy.clone()                           # back on the device
        del host_copy
        assert (tracker.current_bytes, tracker.host_bytes) == (size * F, 0)
        del prefetched
    report = tracker.report()
    assert report.peak_bytes == size * F
    assert report.host_peak_bytes == size * F
    assert report.end_bytes == 0


def test_module_level_mark_host_reaches_nested_trackers_and_is_a_no_op_outside() -> None:
    with StepMemoryTracker("cpu") as outer, StepMemoryTracker("cpu") as inner:
        copy = torch.randn(100)
        mark_host(copy)
        assert outer.current_bytes == inner.current_bytes == 0
        assert outer.host_bytes == inner.host_bytes == 100 * F
    mark_host(torch.randn(3))                                   # nothing active: nothing happens
    assert outer.report().peak_bytes == inner.report().peak_bytes == 0


def test_mark_host_rejects_a_tensor_not_in_cpu_memory() -> None:
    with StepMemoryTracker("cpu") as tracker:
        with pytest.raises(ValueError, match="host copy"):
            tracker.mark_host(torch.empty(4, device="meta"))


# --------------------------------------------------------------------------- against torch.profiler


class _SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.norm(self.conv1(x)))
        hidden = hidden + torch.relu(self.conv2(hidden))        # residual
        hidden = nn.functional.max_pool2d(hidden, 2)
        return self.head(hidden.mean((2, 3)))


def test_agrees_with_profiler_allocator_events_on_a_conv_net() -> None:
    """torch.profiler records every CPU allocator call. Sampled at the end of every op the
    tracker's dispatch mode sees (the profiler shows them as 'PythonDispatchMode' events), the
    profiler's live bytes are what the tracker counts; between op ends, kernels also use
    workspace the tracker cannot see (oneDNN convolution scratch), so the profiler's raw
    maximum is higher. Tolerance 1 %: an allocation stamped in the same nanosecond as an op's
    end can fall on either side of the sample."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = _SmallConvNet()
    x = torch.randn(4, 3, 16, 16)
    target = torch.randint(0, 10, (4,))

    def step() -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), target)
        loss.backward()
        return loss.detach()

    step()                                                      # warm up lazy initialisation
    net.zero_grad(set_to_none=True)
    resident = list(net.parameters()) + list(net.buffers()) + [x, target]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, report = measure_step_memory(step, "cpu", resident)

    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    stamps = [stamp for stamp, _ in allocations]
    live_bytes = list(itertools.accumulate(nbytes for _, nbytes in allocations))
    op_ends = [e.end_ns() for e in events if e.name() == "PythonDispatchMode"]
    assert len(op_ends) > 20, "the profiler did not show the tracker's dispatch mode"

    def live_at(stamp: int) -> int:
        index = bisect.bisect_right(stamps, stamp)
        return live_bytes[index - 1] if index else 0

    profiler_peak_bytes = max(live_at(stamp) for stamp in op_ends)
    tracker_step_bytes = report.peak_bytes - report.start_bytes
    assert abs(profiler_peak_bytes - tracker_step_bytes) <= 0.01 * tracker_step_bytes
    assert max(live_bytes) >= tracker_step_bytes                # the allocator also saw workspace
    assert live_bytes[-1] == report.end_bytes - report.start_bytes   # loss + gradients, exactly


# --------------------------------------------------------------------------- the context manager


def test_exit_restores_the_dispatch_mode_stack_even_on_exception() -> None:
    stack_before = list(_get_current_dispatch_mode_stack())
    with pytest.raises(KeyError, match="step failed"):
        with StepMemoryTracker("cpu") as outer:
            kept = torch.ones(10)
            with StepMemoryTracker("cpu") as inner:
                assert len(_get_current_dispatch_mode_stack()) == len(stack_before) + 2
                torch.ones(25)                                  # made and freed inside both
                raise KeyError("step failed")
    assert list(_get_current_dispatch_mode_stack()) == stack_before
    assert memory._ACTIVE_TRACKERS == []
    assert inner.report().peak_bytes == 25 * F
    assert outer.report().peak_bytes == 35 * F and outer.report().end_bytes == 10 * F
    del kept


def test_a_tracker_is_used_once_and_reports_only_after_starting() -> None:
    tracker = StepMemoryTracker("cpu")
    with pytest.raises(RuntimeError, match="not started"):
        tracker.report()
    with tracker:
        pass
    with pytest.raises(RuntimeError, match="used once"):
        with tracker:
            pass
    with pytest.raises(RuntimeError, match="inside the tracked block"):
        tracker.mark_host(torch.ones(1))


def test_report_round_trips_through_json() -> None:
    report = MemoryReport(peak_bytes=10, start_bytes=4, end_bytes=6, host_peak_bytes=2, device="cpu",
                          method=STORAGE_TRACKER)
    assert MemoryReport.from_json(report.to_json()) == report
    assert report.step_peak_bytes == 6


# --------------------------------------------------------------------------- CUDA


class _FakeCudaAllocator:
    """Stands in for torch.cuda's statistics so that the CUDA path's bookkeeping (absolute
    peak, nested trackers resetting the peak statistic) is tested without a GPU."""

    def __init__(self) -> None:
        self.allocated_bytes = 0
        self.max_allocated_bytes = 0
        self.resets = 0

    def allocate(self, nbytes: int) -> None:
        self.allocated_bytes += nbytes
        self.max_allocated_bytes = max(self.max_allocated_bytes, self.allocated_bytes)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated_bytes)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.max_allocated_bytes)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)

    def _reset(self, device=None) -> None:  # noqa: ANN001
        self.resets += 1
        self.max_allocated_bytes = self.allocated_bytes


def test_cuda_path_bookkeeping_with_a_fake_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    allocator = _FakeCudaAllocator()
    allocator.install(monkeypatch)
    allocator.allocate(100)                                     # resident before the step
    with StepMemoryTracker("cuda") as outer:
        allocator.allocate(800)
        allocator.allocate(-800)
        with StepMemoryTracker("cuda:0") as inner:              # resets the peak statistic
            allocator.allocate(200)
            assert (inner.peak_bytes, outer.peak_bytes) == (300, 900)
            inner.mark_host(torch.ones(3))                      # a CPU tensor: nothing to count
            allocator.allocate(-200)
        allocator.allocate(50)
    assert allocator.resets == 2
    assert inner.report() == MemoryReport(peak_bytes=300, start_bytes=100, end_bytes=100, host_peak_bytes=0,
                                          device="cuda:0", method=CUDA_ALLOCATOR)
    assert outer.report() == MemoryReport(peak_bytes=900, start_bytes=100, end_bytes=150, host_peak_bytes=0,
                                          device="cuda:0", method=CUDA_ALLOCATOR)
    assert memory._ACTIVE_CUDA_PEAKS[0] == []



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_nested_and_host_copies() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    mib = 1 << 20
    resident = torch.empty(mib, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    with StepMemoryTracker(device, [resident]) as outer:
        big = torch.empty(8 * mib, dtype=torch.uint8, device=device)
        del big
        with StepMemoryTracker(device) as inner:                # resets the peak statistic
            small = torch.empty(2 * mib, dtype=torch.uint8, device=device)
            host_copy = small.to("cpu")
            inner.mark_host(host_copy)                          # host memory: not on the device
            with pytest.raises(ValueError, match="mark_host: the tensor lives on"):
                inner.mark_host(small)
            del small
    outer_report, inner_report = outer.report(), inner.report()
    assert outer_report.method == inner_report.method == CUDA_ALLOCATOR
    assert outer_report.device == str(device)
    assert outer_report.start_bytes >= mib
    assert outer_report.peak_bytes >= outer_report.start_bytes + 8 * mib    # survived the inner reset
    assert inner_report.peak_bytes >= inner_report.start_bytes + 2 * mib
    assert inner_report.peak_bytes < inner_report.start_bytes + 8 * mib
    assert inner_report.end_bytes == inner_report.start_bytes
    assert inner_report.host_peak_bytes == 0
    del resident


def test_the_allocator_measurement_runs_the_step_with_the_collector_off_and_puts_it_back() -> None:
    """`measure_allocator_peak` keeps Python's cyclic collector off for the step (garbage
    from before it is never freed inside it) and leaves the collector as it found it; a
    tensor held by a cycle made inside the step counts to the step's end."""
    import gc

    seen = []

    def step() -> None:
        seen.append(gc.isenabled())
        cycle: list = [torch.zeros(1 << 18)]          # 1 MiB held by a reference cycle
        cycle.append(cycle)
        del cycle
        torch.zeros(1 << 18)                           # 1 MiB more, made and freed after it

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            _, peak = memory.measure_allocator_peak(step)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
        gc.collect()
        assert seen[-1] is False
        assert peak >= 2 << 20                         # the cycle's tensor lived beside the second
