"""The solver kernel: what every algorithm of `solvers` shares, below them all.

    bounds      the least budget any plan can meet (`least_feasible_lower_bound`)
    milp        the MILP backend (`milp_solver`: HiGHS, else CBC) of `ilp` and `recompute_bound`
    program     decisions -> `Plan` (`build_program`, `plan_from_decisions`,
                `plan_with_offload`), liveness frees (`insert_frees`, `delay_frees`)
    recompute   what may be dropped and what recomputing it costs; fixed checkpoint
                decision sets (`checkpoint_decisions`, `every_block_decisions`)
    segments    the chain of segments (blocks, stages, levels) and its cuts
    options     a segment's recompute options and their probed costs
    replay      `Replays`: decision sets replayed by `simulate`, memoized
    space       the exact solvers' plan space (Checkmate's, restricted) and the way into it

What is alive at a step is `solvers.simulate.live_roots_at`, next to the accounting it
follows. The kernel imports only the core (`graph`, `plan`, `simulate`, `errors`); the
algorithms (`baselines`, `checkpoint_baselines`, `chain`, `hierarchical`, `brute_force`,
`ilp`, `offload_refine`, and `recompute_bound`, which bounds rather than plans) import only the kernel and the core; `solvers.portfolio` chooses
which of them run and which plan wins (`tests/test_layers.py` holds these rules). This
package imports nothing: import its modules by name.
"""
