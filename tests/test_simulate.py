"""`simulate` on a graph small enough to count by hand, and the plans it must refuse.

The graph (bytes in brackets, times in ms)::

    placeholders: w [100] parameter, x [10] input, buf [4] buffer, t [1] tangent of `out`
    forward   f1(x, w)        -> a [40]            1.0 ms, workspace 100
              view(a)         -> v [0] (a view of a)  0.0 ms
              f2(v)           -> b [20], m [5]     2.0 ms, random (a dropout mask m)
              update(buf, a)  -> s [2]             0.5 ms, not recomputable
              loss(b)         -> out [1]           0.5 ms, forward output
    backward  loss_bw(t)          -> g_b [20]      0.5 ms
              f2_bw(g_b, v, m)    -> g_a [40]      2.0 ms
              f1_bw(g_a, x, s)    -> g_w [100]     1.0 ms, workspace 5, gradient

Resident for the whole step: w + x + buf = 114 bytes. Transfer channel: device->host
10 B/ms, host->device 20 B/ms, 0.5 ms latency per copy.
"""

from __future__ import annotations

import pytest

from solvers import (Graph, InvalidPlanError, Op, Phase, Plan, PlanMismatchError, Transfer, Value, ValueKind,
                     simulate)
from solvers.plan import Decision, Step, free, offload, prefetch, run
from solvers.kernel.program import build_program, decisions_for, saved_roots

FWD, BWD = Phase.FORWARD, Phase.BACKWARD
RESIDENT_BYTES = 114


def hand_graph() -> Graph:
    act, work = ValueKind.ACTIVATION, ValueKind.GRADIENT_WORK
    values = (Value("w", 100, ValueKind.PARAMETER), Value("x", 10, ValueKind.INPUT),
              Value("buf", 4, ValueKind.BUFFER), Value("t", 1, ValueKind.TANGENT),
              Value("a", 40, act, "f1"), Value("v", 0, act, "view", alias_of="a"),
              Value("b", 20, act, "f2"), Value("m", 5, act, "f2"), Value("s", 2, act, "update"),
              Value("out", 1, act, "loss"),
              Value("g_b", 20, work, "loss_bw"), Value("g_a", 40, work, "f2_bw"), Value("g_w", 100, work, "f1_bw"))
    ops = (Op("f1", ("x", "w"), ("a",), FWD, 1.0, tmp_bytes=100),
           Op("view", ("a",), ("v",), FWD, 0.0),
           Op("f2", ("v",), ("b", "m"), FWD, 2.0, random=True),
           Op("update", ("buf", "a"), ("s",), FWD, 0.5, recomputable=False, target="aten.add_.Tensor"),
           Op("loss", ("b",), ("out",), FWD, 0.5),
           Op("loss_bw", ("t",), ("g_b",), BWD, 0.5),
           Op("f2_bw", ("g_b", "v", "m"), ("g_a",), BWD, 2.0),
           Op("f1_bw", ("g_a", "x", "s"), ("g_w",), BWD, 1.0, tmp_bytes=5))
    return Graph(ops=ops, values=values, placeholders=("w", "x", "buf", "t"), forward_outputs=("out",),
                 gradients=("g_w",), transfer=Transfer(host_to_device_bytes_per_ms=20.0,
                                                       device_to_host_bytes_per_ms=10.0, latency_ms=0.5),
                 name="hand")


def hand_plan(graph: Graph, forward: list[Step], backward: list[Step]) -> Plan:
    return Plan(graph_hash=graph.hash, solver="hand", budget_bytes=10**9, forward=tuple(forward),
                backward=tuple(backward))


# Keep everything the backward reads (v, m, s).               after  high-water
KEEP_FORWARD = [run("f1"),        # 114 + a 40 (+ workspace 100)   154  254
                run("view"),      # v shares a's storage           154  154
                run("f2"),        # + b 20 + m 5                   179  179
                run("update"),    # + s 2                          181  181
                free("a"),        # v still holds the storage      181  181
                run("loss"),      # + out 1                        182  182
                free("b"),        #                                162  162
                free("out")]      # the caller holds it            162  162
KEEP_BACKWARD = [run("loss_bw"),  # t 1 arrives: 163, + g_b 20     183  183
                 run("f2_bw"),    # + g_a 40                       223  223
                 free("g_b"),     #                                203  203
                 free("v"),       # a's storage goes               163  163
                 free("m"),       #                                158  158
                 run("f1_bw"),    # + g_w 100 (+ workspace 5)      258  263
                 free("g_a"),     #                                218  218
                 free("s")]       # 114 + t 1 + out 1 + g_w 100    216  216
# time: forward 1 + 0 + 2 + 0.5 + 0.5 = 4.0; backward 0.5 + 2 + 1 = 3.5; total 7.5

# Recompute a (and its view v) in the backward.
RECOMPUTE_FORWARD = [run("f1"),      # 154 (254)
                     run("view"),    # 154
                     run("f2"),      # 179
                     run("update"),  # 181
                     free("a"),      # 181
                     free("v"),      # 141: a's storage goes
                     run("loss"),    # 142
                     free("b"),      # 122
                     free("out")]    # 122 = 114 + m 5 + s 2 + out 1
RECOMPUTE_BACKWARD = [run("loss_bw"),  # t: 123, + g_b 20: 143
                      run("f1"),       # + a 40: 183, high 183 + workspace 100 = 283  (the peak)
                      run("view"),     # 183
                      run("f2_bw"),    # 223
                      free("g_b"), free("v"), free("a"), free("m"),   # 203, 203, 163, 158
                      run("f1_bw"),    # 258 (263)
                      free("g_a"), free("s")]   # 218, 216
# time: 4.0 + 0.5 + 1.0 (recompute f1) + 0 + 2.0 + 1.0 = 8.5

# Offload a and m in the forward, prefetch them in the backward.
OFFLOAD_FORWARD = [run("f1"),        # clock 1.0; 154
                   offload("a"),     # d2h channel busy 1.0 .. 1.0 + 0.5 + 40/10 = 5.5
                   run("view"),      # clock 1.0
                   run("f2"),        # clock 3.0; 179
                   offload("m"),     # waits for the channel: 5.5 .. 5.5 + 0.5 + 5/10 = 6.5
                   run("update"),    # clock 3.5; 181
                   free("a"),        # waits for a's copy: stall 2.0, clock 5.5; v still holds a: 181
                   free("v"),        # 141
                   run("loss"),      # clock 6.0; 142
                   free("b"),        # 122
                   free("m"),        # waits for m's copy: stall 0.5, clock 6.5; 117
                   free("out")]      # 117 = 114 + s 2 + out 1
OFFLOAD_BACKWARD = [prefetch("a"),   # t: 118; + a 40 on issue: 158; h2d 6.5 .. 6.5 + 0.5 + 40/20 = 9.0
                    prefetch("m"),   # 163; h2d busy until 9.0: 9.0 .. 9.0 + 0.5 + 5/20 = 9.75
                    run("loss_bw"),  # clock 7.0; 183
                    run("view"),     # waits for a: stall 2.0, clock 9.0; 183
                    run("f2_bw"),    # waits for m: stall 0.75, starts 9.75, clock 11.75; 223
                    free("g_b"), free("v"), free("a"), free("m"),   # 203, 203, 163, 158
                    run("f1_bw"),    # clock 12.75; 258 (263)
                    free("g_a"), free("s")]   # 218, 216


def bytes_after(result, phase: Phase) -> list[int]:
    return [point.bytes_in_use for point in result.timeline if point.phase is phase]


def high_water(result, phase: Phase) -> list[int]:
    return [point.high_water_bytes for point in result.timeline if point.phase is phase]


def test_keep_all_by_hand() -> None:
    graph = hand_graph()
    result = simulate(graph, hand_plan(graph, KEEP_FORWARD, KEEP_BACKWARD))
    assert bytes_after(result, FWD) == [154, 154, 179, 181, 181, 182, 162, 162]
    assert bytes_after(result, BWD) == [183, 223, 203, 163, 158, 258, 218, 216]
    assert high_water(result, FWD)[0] == 254 and high_water(result, BWD)[5] == 263
    assert (result.peak_bytes, result.peak_phase, result.peak_step_index) == (263, BWD, 5)
    assert result.time_ms == 7.5 and result.compute_ms == 7.5
    assert result.recompute_ms == 0.0 and result.stall_ms == 0.0 and result.offloaded_bytes == 0
    assert result.saved_bytes == 162 - (RESIDENT_BYTES + 1)   # a 40 + m 5 + s 2


def test_recompute_by_hand() -> None:
    graph = hand_graph()
    result = simulate(graph, hand_plan(graph, RECOMPUTE_FORWARD, RECOMPUTE_BACKWARD))
    assert bytes_after(result, FWD) == [154, 154, 179, 181, 181, 141, 142, 122, 122]
    assert bytes_after(result, BWD) == [143, 183, 183, 223, 203, 203, 163, 158, 258, 218, 216]
    assert (result.peak_bytes, result.peak_phase, result.peak_step_index) == (283, BWD, 1)
    assert result.time_ms == 8.5 and result.compute_ms == 8.5 and result.recompute_ms == 1.0
    assert result.saved_bytes == 7


def test_offload_and_prefetch_by_hand() -> None:
    graph = hand_graph()
    result = simulate(graph, hand_plan(graph, OFFLOAD_FORWARD, OFFLOAD_BACKWARD))
    assert bytes_after(result, FWD) == [154, 154, 154, 179, 179, 181, 181, 141, 142, 122, 117, 117]
    assert bytes_after(result, BWD) == [158, 163, 183, 183, 223, 203, 203, 163, 158, 258, 218, 216]
    assert [point.time_ms for point in result.timeline if point.phase is FWD] == \
        [1.0, 1.0, 1.0, 3.0, 3.0, 3.5, 5.5, 5.5, 6.0, 6.0, 6.5, 6.5]
    assert [point.time_ms for point in result.timeline if point.phase is BWD][:5] == [6.5, 6.5, 7.0, 9.0, 11.75]
    assert result.time_ms == 12.75
    assert result.stall_ms == 2.0 + 0.5 + 2.0 + 0.75
    assert result.compute_ms == 7.5 and result.offloaded_bytes == 45
    assert result.saved_bytes == 2 and result.peak_bytes == 263


def test_build_program_matches_the_hand_count() -> None:
    graph = hand_graph()
    assert saved_roots(graph) == ("a", "m", "s")
    for decisions, peak_bytes, time_ms in ((decisions_for(graph), 263, 7.5),
                                           (decisions_for(graph, recompute=["a"]), 283, 8.5)):
        forward, backward = build_program(graph, decisions)
        result = simulate(graph, hand_plan(graph, list(forward), list(backward)))
        assert (result.peak_bytes, result.time_ms) == (peak_bytes, time_ms)
        assert result.timeline[-1].bytes_in_use == 216


def test_workspace_counts_only_while_the_op_runs() -> None:
    graph = hand_graph()
    result = simulate(graph, hand_plan(graph, KEEP_FORWARD, KEEP_BACKWARD))
    f1 = result.timeline[0]
    assert f1.high_water_bytes - f1.bytes_in_use == 100


def test_pinned_values_survive_free() -> None:
    """Placeholders, tangents, forward outputs and gradients are held by the caller or
    autograd: dropping the program's reference releases nothing."""
    graph = hand_graph()
    forward = KEEP_FORWARD[:1] + [free("w")] + KEEP_FORWARD[1:]
    backward = KEEP_BACKWARD[:1] + [free("t")] + KEEP_BACKWARD[1:7] + [free("g_w")] + KEEP_BACKWARD[7:]
    result = simulate(graph, hand_plan(graph, forward, backward))
    assert bytes_after(result, FWD) == [154, 154, 154, 179, 181, 181, 182, 162, 162]
    assert bytes_after(result, BWD) == [183, 183, 223, 203, 163, 158, 258, 218, 218, 216]
    assert result.peak_bytes == 263


def test_tangents_arrive_with_the_backward() -> None:
    graph = hand_graph()
    result = simulate(graph, hand_plan(graph, KEEP_FORWARD, KEEP_BACKWARD))
    assert bytes_after(result, BWD)[0] == bytes_after(result, FWD)[-1] + 1 + 20   # tangent t, then g_b


# -- plans that must be refused --------------------------------------------------------------

def with_step(steps: list[Step], index: int, step: Step) -> list[Step]:
    return steps[:index] + [step] + steps[index:]


INVALID_PLANS = {
    "use before define": (KEEP_FORWARD[2:], KEEP_BACKWARD, "forward step 0 run(f2): input 'v' is not on the device"),
    "use after free": (with_step(KEEP_FORWARD, 1, free("a")), KEEP_BACKWARD,
                       "forward step 2 run(view): input 'a' is not on the device"),
    "free of a dead value": (with_step(KEEP_FORWARD, 5, free("a")), KEEP_BACKWARD,
                             "forward step 5 free(a): value is not on the device"),
    "free of a value never made": (KEEP_FORWARD, with_step(KEEP_BACKWARD, 0, free("g_a")),
                                   "backward step 0 free(g_a): value is not on the device"),
    "offload of a dead value": (with_step(KEEP_FORWARD, 7, offload("b")), KEEP_BACKWARD,
                                "forward step 7 offload(b): cannot offload a value that is not on the device"),
    "prefetch without host copy": (KEEP_FORWARD, with_step(KEEP_BACKWARD, 0, prefetch("a")),
                                   "backward step 0 prefetch(a): no host copy to prefetch"),
    "prefetch of a value on the device": (OFFLOAD_FORWARD[:10] + OFFLOAD_FORWARD[11:], OFFLOAD_BACKWARD,
                                          "backward step 1 prefetch(m): value is already on the device"),
    "missing gradient": (KEEP_FORWARD, KEEP_BACKWARD[:5], "backward never computes gradient(s) ['g_w']"),
    "missing forward output": (KEEP_FORWARD[:5], KEEP_BACKWARD, "forward never computes output(s) ['out']"),
    "recompute of a non-recomputable op": (KEEP_FORWARD, with_step(KEEP_BACKWARD, 0, run("update")),
                                           "backward step 0 run(update): op 'update' (aten.add_.Tensor) has effects "
                                           "and cannot be recomputed"),
    "non-recomputable op twice": (with_step(KEEP_FORWARD, 4, run("update")), KEEP_BACKWARD,
                                  "forward step 4 run(update): op 'update' (aten.add_.Tensor) has effects and must "
                                  "run once"),
    "backward op in the forward": (with_step(KEEP_FORWARD, 0, run("loss_bw")), KEEP_BACKWARD,
                                   "forward step 0 run(loss_bw): a backward op cannot run in the forward phase"),
    "unknown op": (with_step(KEEP_FORWARD, 0, run("f3")), KEEP_BACKWARD, "forward step 0 run(f3): no such op"),
    "tangent read after its free": (KEEP_FORWARD, [free("t")] + KEEP_BACKWARD,
                                    "backward step 1 run(loss_bw): input 't' is not on the device"),
}


@pytest.mark.parametrize("case", sorted(INVALID_PLANS))
def test_invalid_plans_are_refused_with_the_step(case: str) -> None:
    graph = hand_graph()
    forward, backward, message = INVALID_PLANS[case]
    with pytest.raises(InvalidPlanError) as info:
        simulate(graph, hand_plan(graph, forward, backward))
    assert message in str(info.value)
    assert "'hand'" in str(info.value)


def test_plan_for_another_graph_is_refused() -> None:
    graph = hand_graph()
    plan = hand_plan(graph, KEEP_FORWARD, KEEP_BACKWARD)
    other = Graph(ops=graph.ops, values=tuple(v if v.name != "a" else Value("a", 48, v.kind, "f1")
                                              for v in graph.values),
                  placeholders=graph.placeholders, forward_outputs=graph.forward_outputs, gradients=graph.gradients)
    with pytest.raises(PlanMismatchError, match="plan was made for graph"):
        simulate(other, plan)
    assert simulate(other, plan, check_hash=False).saved_bytes == 47 + 8


def test_decisions_do_not_change_the_replay() -> None:
    """simulate replays the steps; the decision summary is only a label."""
    graph = hand_graph()
    plain = hand_plan(graph, KEEP_FORWARD, KEEP_BACKWARD)
    labelled = Plan(graph_hash=graph.hash, solver="hand", budget_bytes=0, forward=plain.forward,
                    backward=plain.backward, decisions={"a": Decision.RECOMPUTE})
    assert simulate(graph, labelled) == simulate(graph, plain)


def test_released_outputs_are_freed_when_the_backward_starts() -> None:
    """A forward output the caller drops before the backward (`Graph.released_outputs`)
    counts until the forward's end only; it is part of the graph's identity and JSON."""
    import json
    from dataclasses import replace
    from solvers import UnsupportedGraphError, solve
    held = hand_graph()
    released = replace(held, released_outputs=("out",))
    assert released.hash != held.hash
    assert Graph.from_json(json.loads(json.dumps(released.to_json()))) == released
    held_run = simulate(held, solve(held, 10**9, "none"))
    released_run = simulate(released, solve(released, 10**9, "none"))
    forward_end = len(solve(held, 10**9, "none").forward) - 1
    assert released_run.timeline[forward_end].bytes_in_use == held_run.timeline[forward_end].bytes_in_use
    assert [h.bytes_in_use - r.bytes_in_use for h, r in zip(held_run.timeline, released_run.timeline)][
        forward_end + 1:] == [1] * (len(held_run.timeline) - forward_end - 1)        # out is 1 byte
    with pytest.raises(UnsupportedGraphError, match="released output 'b'"):
        replace(held, released_outputs=("b",))
