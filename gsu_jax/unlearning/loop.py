r"""The run loop: one method over the seeds (:func:`run_method`), one (method, seed) run from its first step to its
saved result (:func:`run_seed`), and the steps themselves with the monitoring and the stopping rules
(:func:`run_steps`).

**The run** (per method, per seed): fresh permutations of the forget and retain training examples for the seed,
consumed 128 + 128 per step (reshuffled at each pass); the method's step is compiled ONCE per method (ahead of
time, reused across seeds) and timed alone, synchronised with ``block_until_ready``, excluding the monitoring.
After every update the forget fraction is measured on ``monitor_samples`` images decoded from the fixed z and
labelled by the evaluator (for a forget set of examples: the loss gap, see :mod:`gsu_jax.unlearning.evaluation`).
The run *stops* at the first update count ``t`` with fraction < threshold (updates applied, docs/protocol.md §2;
for examples, the gap risen to the oracle's band, :func:`gsu_jax.metrics.reached_stop`) and, when
``continue_to_budget``, continues to ``max_steps`` so that the
protocol's end-of-budget FID is measured too. Seeds that never cross the threshold are evaluated "at stop" at the
budget and counted as not reached (the table says how many reached).

The loop is a Python loop over the compiled step with a compiled monitor, not one ``lax.scan``: the step has to
be timed alone anyway, the stopping step's parameters must be kept, and with the per-step host read of one
scalar the overhead is a dispatch (~0.1 ms) against steps of several ms on CPU.

**Devices.** ``config.mesh`` / ``config.distributed`` (:mod:`gsu_jax.parallel`) run each method's step on a
mesh: forget and retain batches split over the ``data`` devices, parameters and optimizer state replicated or split
over ``model``; the monitoring and the evaluation run on each process's copy of the parameters, and process 0
alone prints and writes the report, logs and PNGs (every process saves its shards of the unlearned parameters).

**Non-finite steps.** A step whose new parameters or optimizer state are not finite is skipped (parameters and
optimizer state kept, the step's batch and key consumed) and counted: ``nonfinite_skipped`` in the log rows,
``nonfinite_steps`` per seed and per method in the report. :data:`MAX_CONSECUTIVE_NONFINITE` skipped steps in a row
stop the job with :class:`~gsu_jax.unlearning.errors.UnlearningDivergedError` (``unlearn.py`` exits 1), and
parameters are checked finite before every save: a NaN model is never written.

Per finished (method, seed), in this order: the sample grid ``samples/<label>.png`` (first seed), the unlearned
parameters ``unlearned/<label>/seed_<s>/`` (orbax, via :mod:`gsu_jax.checkpointing`; ``config.save_params``) and,
last, the result (:mod:`gsu_jax.unlearning.results`).
"""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from gsu_jax import checkpointing, interrupts, io, losses, methods, metrics, parallel, reporting, training
from gsu_jax import data as data_lib

# The library's own step pieces (gsu_jax.unlearn): the batch order and the non-finite guard are one code.
from gsu_jax.unlearner import MAX_CONSECUTIVE_NONFINITE, StepRecord, batch_schedule, step_loop, tree_all_finite
from gsu_jax.unlearning import inflight
from gsu_jax.unlearning.config import build_optimizer, jsonable_config
from gsu_jax.unlearning.errors import UnlearningDivergedError
from gsu_jax.unlearning.evaluation import Evaluation, References
from gsu_jax.unlearning.keys import data_order_rng, seed_step_keys
from gsu_jax.unlearning.plan import RunPlan
from gsu_jax.unlearning.results import load_result, result_path, save_result

__all__ = [
    "MAX_CONSECUTIVE_NONFINITE",
    "MethodRun",
    "batch_schedule",
    "compile_step",
    "run_method",
    "run_seed",
    "run_steps",
    "save_unlearned",
    "seed_record",
]


class MethodRun(NamedTuple):
    """One method over the seeds, as the report takes it."""

    label: str  # the method's name in tables and files (+guided when guided)
    hparams: dict[str, Any]  # as resolved for this run (sa_gated's target included)
    optimizer: dict[str, Any]  # the optimizer spec of this method
    compile_seconds: float  # of its step (read back when every seed was)
    per_seed: list[dict[str, Any]]  # one record per seed
    rows: list[dict[str, Any]]  # the log rows of every seed, seed after seed
    fractions: list[list[float]]  # per seed, the forget fraction before and after each update
    resumed: list[str]  # "<label> seed <s>" of the seeds read back


def run_method(
    plan: RunPlan,
    name: str,
    evaluation: Evaluation,
    generator: training.TrainedModel,
    guidance_loss: losses.GuidanceLossFn | None,
    references: References,
    grids: tuple[np.ndarray, np.ndarray],
    run_identity: Mapping[str, Any],
) -> MethodRun:
    """Runs the method ``name`` over the plan's seeds; seeds saved by an earlier run of this config are read back.

    The step is compiled once (only when a seed is left to run) and shared by every seed; ``grids`` are the
    original's and the oracle's sample grids, ``run_identity`` what a saved result must match (see
    :func:`gsu_jax.unlearning.results.run_identity`).
    """
    config = plan.config
    label = plan.label(name)
    hparams = dict(plan.method_hparams.get(name, {}))
    if name == "sa_gated":
        hparams.setdefault("forget_loss_target", references.gated_target)
    optimizer_spec = config["method_optimizers"].get(name, config["optimizer"])
    method = methods.make_method(
        name,
        loss_fn=evaluation.loss_fn,
        optimizer=build_optimizer(optimizer_spec),
        guidance_loss=guidance_loss,
        guidance_weight=config["guidance_weight"],
        chunk_size=config["chunk_size"] or None,
        # A mesh that splits parameters over a model axis keeps them a pytree (a flat vector would gather them).
        flat_parameters=plan.mesh is None or plan.mesh.shape["model"] == 1,
        **hparams,
    )
    identities = {
        seed: {**run_identity, "method": label, "hparams": hparams, "optimizer": optimizer_spec, "seed": seed}
        for seed in plan.seeds
    }
    saved = {seed: load_result(plan.workdir, label, seed, identities[seed]) for seed in plan.seeds}
    compiled_step, compile_seconds, state_shardings = None, None, None
    if any(result is None for result in saved.values()):
        compiled_step, compile_seconds, state_shardings = compile_step(plan, method, generator)
        plan.progress(f"{label}: step compiled in {compile_seconds:.1f} s")

    per_seed, rows, fractions, resumed = [], [], [], []
    for seed in plan.seeds:
        result = saved[seed]
        if result is None:
            result = run_seed(
                plan,
                evaluation,
                compiled_step,
                method,
                generator,
                seed,
                references.threshold,
                references.start_fractions,
                label=label,
                hparams=hparams,
                compile_seconds=compile_seconds,
                grids=grids,
                identity=identities[seed],
                state_shardings=state_shardings,
            )
            # A safe point too: a signal that arrived during this seed's evaluation stops the job here, with this
            # result saved, instead of being ignored until the job ends by itself.
            interrupts.stop(interrupts.requested())
        else:
            resumed.append(f"{label} seed {seed}")
            plan.progress(
                f"{label} seed {seed}: finished before; read back from {result_path(plan.workdir, label, seed)}"
            )
        if compile_seconds is None:  # every seed was read back: the compile time of the run that did them
            compile_seconds = result["compile_s"]
        record = result["record"]
        per_seed.append(record)
        plan.progress(_seed_progress(label, seed, record))
        rows.extend(result["rows"])
        fractions.append(result["fractions"])
    return MethodRun(label, hparams, optimizer_spec, compile_seconds, per_seed, rows, fractions, resumed)


def _seed_progress(label: str, seed: int, record: Mapping[str, Any]) -> str:
    """The progress line of a finished (method, seed): its stops, FID retain at the stop and end, step time."""
    at_end = record.get("fid_retain_at_end")
    return (
        f"{label} seed {seed}: stop {record['steps_to_threshold']} (published rule "
        f"{record['steps_to_published_threshold']}), FID retain "
        f"{record['fid_retain_at_stop']:.2f} -> {'n/a' if at_end is None else format(at_end, '.2f')}"
        f", step {record['step_time_ms'] or float('nan'):.1f} ms"
        + (f", {record['nonfinite_steps']} non-finite step(s) skipped" if record["nonfinite_steps"] else "")
    )


def compile_step(
    plan: RunPlan, method: methods.UnlearningMethod, generator: training.TrainedModel
) -> tuple[Any, float, tuple[Any, Any] | None]:
    """``(compiled step, compile seconds, state shardings)``: the method's step compiled ahead of time on the shapes
    every seed uses (on the plan's mesh, with the shardings its state is placed with; ``None`` on one device)."""
    config = plan.config
    state_shardings = None
    example_state = method.init(generator.params)
    forget_example = jax.device_put(
        data_lib.as_batch(plan.run_data.train, plan.forget_idx[:1].repeat(config["batch_size"]))
    )
    retain_example = jax.device_put(
        data_lib.as_batch(plan.run_data.train, plan.retain_idx[:1].repeat(config["retain_batch_size"]))
    )
    compile_started = time.perf_counter()
    if plan.mesh is None:
        compiled_step = (
            jax.jit(method.step)
            .lower(generator.params, example_state, forget_example, retain_example, seed_step_keys(0, 1)[0])
            .compile()
        )
    else:
        step, *shardings = parallel.shard_method_step(method.step, plan.mesh, generator.params, example_state)
        state_shardings = tuple(shardings)
        compiled_step = step.lower(
            *parallel.put((generator.params, example_state), state_shardings),
            parallel.shard_batch(jax.device_get(forget_example), plan.mesh),
            parallel.shard_batch(jax.device_get(retain_example), plan.mesh),
            parallel.put(seed_step_keys(0, 1)[0], parallel.replicated(plan.mesh)),
        ).compile()
    return compiled_step, time.perf_counter() - compile_started, state_shardings


def run_seed(
    plan: RunPlan,
    evaluation: Evaluation,
    compiled_step,
    method: methods.UnlearningMethod,
    generator: training.TrainedModel,
    seed: int,
    threshold: float | metrics.LossGapBand,
    start_fractions: tuple[float, float],
    *,
    label: str,
    hparams: dict[str, Any],
    compile_seconds: float,
    grids: tuple[np.ndarray, np.ndarray],
    identity: dict[str, Any],
    state_shardings: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Runs and evaluates one (method, seed), writes its grid and unlearned model, then its result (last).

    Files are written by process 0 only; the unlearned model by every process (each its shards)."""
    config, workdir, budget = plan.config, plan.workdir, plan.config["max_steps"]
    run = run_steps(
        plan,
        evaluation,
        compiled_step,
        method,
        generator.params,
        seed,
        threshold,
        start_fractions,
        label=label,
        mesh=plan.mesh,
        state_shardings=state_shardings,
        identity=identity,
    )
    at_stop = evaluation.evaluate(run["params_at_stop"], plan.forget_classes)
    at_end = None
    if run["params_at_end"] is not None:
        at_end = at_stop if run["stop"] is None else evaluation.evaluate(run["params_at_end"], plan.forget_classes)
    record = seed_record(run, at_stop, at_end, budget)
    record["params_digest_at_stop"] = checkpointing.state_digest(run["params_at_stop"])
    record["params_digest_at_end"] = (
        None if run["params_at_end"] is None else checkpointing.state_digest(run["params_at_end"])
    )
    first = seed == plan.seeds[0]
    if first and parallel.is_main_process():
        original_grid, oracle_grid = grids
        panels = {
            "original": original_grid,
            f"{label} at stop (step {record['evaluated_at_step']})": evaluation.grid(
                run["params_at_stop"], config["grid_samples"]
            ),
        }
        if run["params_at_end"] is not None:
            panels[f"at end (step {budget})"] = evaluation.grid(run["params_at_end"], config["grid_samples"])
        panels["oracle"] = oracle_grid
        reporting.save_sample_panels(str(workdir / "samples" / f"{label}.png"), panels)
    saved_params = config["save_params"] == "all" or (config["save_params"] == "first_seed" and first)
    if saved_params:
        save_unlearned(workdir / "unlearned" / label / f"seed_{seed}", run, record, plan, label, hparams, generator)
    content = {
        "identity": identity,
        "record": record,
        "rows": run["rows"],
        "fractions": run["fractions"],
        "compile_s": compile_seconds,
        "unlearned_saved": saved_params,
    }
    if not parallel.is_main_process():
        saved = io.json_normalize(content)
    else:
        saved = save_result(workdir, label, seed, content)
    inflight.discard(inflight.inflight_directory(workdir, label, seed))  # the result holds everything now
    return saved


def save_unlearned(
    directory: pathlib.Path,
    run: dict[str, Any],
    record: dict[str, Any],
    plan: RunPlan,
    label: str,
    hparams: dict[str, Any],
    generator: training.TrainedModel,
) -> None:
    """Saves the parameters at the stopping step (the unlearned model) with orbax, with what produced them.

    Refuses non-finite parameters (nothing is written). A directory left by an earlier, interrupted attempt at
    this run is replaced: its run had not finished (its result file, written after this, was missing). With a mesh,
    every process saves its shards of the parameters placed on the mesh (orbax writes each once).
    """
    if not bool(tree_all_finite(run["params_at_stop"])):
        raise UnlearningDivergedError(
            f"{label} seed {run['seed']}: the parameters at step "
            f"{record['evaluated_at_step']} are not finite; refusing to save them to "
            f"{str(directory)!r}"
        )
    if parallel.is_main_process():
        shutil.rmtree(directory, ignore_errors=True)
    parallel.barrier(f"unlearn:save:{label}:{run['seed']}:cleared")
    params = run["params_at_stop"]
    if plan.mesh is not None:
        params = parallel.put(params, parallel.param_shardings(params, plan.mesh))
    with checkpointing.Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(
            record["evaluated_at_step"],
            params,
            metadata={
                "role": "unlearned",
                "model": generator.metadata["model"],
                "model_kwargs": generator.metadata["model_kwargs"],
                "method": label,
                "hparams": hparams,
                "seed": run["seed"],
                "forget_classes": list(plan.forget_classes),
                "forget": plan.forget_record,
                "steps_to_threshold": run["stop"],
                "original_params_digest": generator.metadata["params_digest"],
                "train_fingerprint": generator.metadata["train_fingerprint"],
                "config": jsonable_config(plan.config),
            },
        )


# Over 80 lines: the run's host state (both stopping rules, the fractions, the log rows, the in-flight save and its
# resume) lives here, shared by the hooks it gives gsu_jax.unlearner.step_loop, which owns the stepping itself.
def run_steps(
    plan: RunPlan,
    evaluation: Evaluation,
    compiled_step,
    method: methods.UnlearningMethod,
    params0,
    seed: int,
    threshold: float | metrics.LossGapBand,
    start_fractions: tuple[float, float],
    *,
    label: str = "run",
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: tuple[Any, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One (method, seed) run: steps, monitoring, stopping; returns the trajectory and the two parameter sets.

    With ``config.checkpoint_every_steps`` > 0 (and the run's ``identity``) its state is saved every that many
    applied steps and a saved state of this run is resumed from (:mod:`gsu_jax.unlearning.inflight`).

    With a ``mesh`` (the plan's) the steps run on it (state placed as ``state_shardings``, batches split over the
    data axis) and the monitoring, like everything host-side, on this process's copy of the parameters.

    Non-finite guard: a step whose new parameters or optimizer state are not finite (a NaN or infinite gradient
    or update) is skipped -- the parameters and the optimizer state stay as they were, the step's batch and key
    are consumed -- and counted (``nonfinite_steps``; the log row has ``nonfinite_skipped=1``). The check runs on
    the step's outputs outside the compiled step, so finite runs execute exactly the program they always did.

    Raises:
        UnlearningDivergedError: the last :data:`MAX_CONSECUTIVE_NONFINITE` steps (all steps, for a shorter
            budget) were skipped.
    """
    config = plan.config
    budget = config["max_steps"]
    rng = data_order_rng(seed)
    train = plan.run_data.train
    forget_schedule = batch_schedule(plan.forget_idx, config["batch_size"], budget, rng)
    retain_schedule = batch_schedule(plan.retain_idx, config["retain_batch_size"], budget, rng)
    keys = seed_step_keys(seed, budget)

    params, state = params0, method.init(params0)
    nonfinite_steps = consecutive_nonfinite = 0
    if mesh is not None:
        params, state = parallel.put((params, state), state_shardings)
    fractions, published = [start_fractions[0]], [start_fractions[1]]
    local_params = params0
    # The log's names of the two monitored values (a forget set of examples: the loss gap, no published rule).
    main_key, published_key = evaluation.monitor_keys

    def monitored(main: float, pub: float) -> dict[str, float]:
        return {main_key: main, **({published_key: pub} if published_key else {})}

    step_times, rows = [], [{"seed": seed, "step": 0, **monitored(*start_fractions)}]
    stop = 0 if metrics.reached_stop(start_fractions[0], threshold) else None
    stop_published = 0 if start_fractions[1] < config["published_threshold"] else None
    params_at_stop = params0 if stop == 0 else None
    first_step, every = 0, config["checkpoint_every_steps"] if identity is not None else 0
    inflight_dir = inflight.inflight_directory(plan.workdir, label, seed) if every else None
    resumed = inflight.restore(inflight_dir, params0, method.init(params0), identity) if every else None
    if resumed is not None:
        host = resumed.host
        plan.progress(f"{label} seed {seed}: resuming from step {host['next_step']} ({inflight_dir})")
        params, state, params_at_stop = resumed.params, resumed.opt_state, resumed.params_at_stop
        if mesh is not None:
            params, state = parallel.put((params, state), state_shardings)
        local_params = params if mesh is None else parallel.localize(params)
        params_at_stop = local_params if host["stop"] == host["next_step"] else params_at_stop
        first_step, rows, fractions, published = host["next_step"], host["rows"], host["fractions"], host["published"]
        stop, stop_published, step_times = host["stop"], host["stop_published"], host["step_times"]
        nonfinite_steps, consecutive_nonfinite = host["nonfinite_steps"], host["consecutive_nonfinite"]

    def before_step(t: int, params, state, counters: tuple[int, int]) -> None:
        interrupted = interrupts.requested()  # read once: what is saved below is what the stop relies on
        if every and t > first_step and (t % every == 0 or interrupted is not None):
            host = {
                "next_step": t,
                "rows": rows,
                "fractions": fractions,
                "published": published,
                "stop": stop,
                "stop_published": stop_published,
                "step_times": step_times,
                "nonfinite_steps": counters[0],
                "consecutive_nonfinite": counters[1],
            }
            at_stop = params_at_stop
            if mesh is not None and at_stop is not None:
                at_stop = parallel.put(at_stop, parallel.param_shardings(at_stop, mesh))
            inflight.save(inflight_dir, inflight.InflightState(params, state, at_stop, host), identity)
        # SIGINT/SIGTERM: stop here (with checkpoint_every_steps, the state was just saved to resume from; without,
        # this (method, seed) run is abandoned: the finished ones are saved already).
        interrupts.stop(interrupted)

    def inputs_at(t: int) -> tuple[Any, Any, jax.Array]:
        return _step_inputs(train, forget_schedule[t], retain_schedule[t], keys[t], mesh)

    def after_step(record: StepRecord) -> bool:
        nonlocal local_params, stop, stop_published, params_at_stop
        step_times.append(record.seconds)
        if record.finite:
            local_params = record.params if mesh is None else parallel.localize(record.params)
            main, pub = evaluation.monitor(local_params)
        else:  # a skipped step: the fractions are those of the kept model
            main, pub = fractions[-1], published[-1]
        fractions.append(main)
        published.append(pub)
        if stop is None and metrics.reached_stop(main, threshold):
            stop, params_at_stop = record.step, local_params
        if stop_published is None and pub < config["published_threshold"]:
            stop_published = record.step
        rows.append(
            {
                "seed": seed,
                "step": record.step,
                **monitored(main, pub),
                "step_time_ms": 1e3 * record.seconds,
                "nonfinite_skipped": int(not record.finite),
                **{name: float(value) for name, value in record.metrics.items()},
            }
        )
        return stop is not None

    end = step_loop(
        compiled_step,
        params,
        state,
        inputs_at,
        max_steps=budget,
        after_step=after_step,
        diverged=lambda consecutive, at_step: _diverged(label, seed, consecutive, at_step),
        first_step=first_step,
        stopped=stop is not None,
        continue_to_budget=config["continue_to_budget"],
        before_step=before_step,
        nonfinite_steps=nonfinite_steps,
        consecutive_nonfinite=consecutive_nonfinite,
    )
    nonfinite_steps = end.nonfinite_steps
    return {
        "seed": seed,
        "stop": stop,
        "stop_published": stop_published,
        "steps_run": len(step_times),
        "nonfinite_steps": nonfinite_steps,
        "fractions": fractions,
        "published_fractions": published,
        "step_times": step_times,
        "rows": rows,
        "params_at_stop": params_at_stop if params_at_stop is not None else local_params,
        "params_at_end": local_params if len(step_times) == budget else None,
    }


def _step_inputs(
    train: data_lib.ImageDataset,
    forget_positions: np.ndarray,
    retain_positions: np.ndarray,
    key: jax.Array,
    mesh: jax.sharding.Mesh | None,
) -> tuple[Any, Any, jax.Array]:
    """One step's forget batch, retain batch and key on the step's devices, ready (the step is timed without them)."""
    forget_batch = data_lib.as_batch(train, forget_positions)
    retain_batch = data_lib.as_batch(train, retain_positions)
    if mesh is None:
        forget_batch, retain_batch, key = jax.device_put(forget_batch), jax.device_put(retain_batch), key
    else:
        forget_batch, retain_batch = (
            parallel.shard_batch(forget_batch, mesh),
            parallel.shard_batch(retain_batch, mesh),
        )
        key = parallel.put(key, parallel.replicated(mesh))
    jax.block_until_ready((forget_batch, retain_batch, key))
    return forget_batch, retain_batch, key


def _diverged(label: str, seed: int, consecutive: int, step: int) -> UnlearningDivergedError:
    return UnlearningDivergedError(
        f"{label} seed {seed} diverged: the last {consecutive} steps (up to step {step}) had "
        "non-finite updates and were skipped; nothing of this run was saved. Lower the learning rate "
        "(config.optimizer.learning_rate or config.method_optimizers) or check the data"
    )


def seed_record(
    run: dict[str, Any], at_stop: dict[str, float], at_end: dict[str, float] | None, budget: int
) -> dict[str, Any]:
    """One seed's record in the report: its stopping steps, step times and the evaluations at the stop (keys
    ``<metric>_at_stop``; ``mia_auc`` as is) and at the end of the budget (``<metric>_at_end``)."""
    step_ms = 1e3 * float(np.median(run["step_times"])) if run["step_times"] else None
    record = {
        "seed": run["seed"],
        "steps_to_threshold": run["stop"],
        "steps_to_published_threshold": run["stop_published"],
        "evaluated_at_step": run["stop"] if run["stop"] is not None else budget,
        "steps_run": run["steps_run"],
        "nonfinite_steps": run.get("nonfinite_steps", 0),
        "step_time_ms": step_ms,
        "step_time_ms_mean": 1e3 * float(np.mean(run["step_times"])) if run["step_times"] else None,
        "time_to_unlearn_s": (
            None if run["stop"] is None or step_ms is None else metrics.time_to_unlearn(step_ms / 1e3, run["stop"])
        ),
    }
    for key, value in at_stop.items():
        record["mia_auc" if key == "mia_auc" else f"{key}_at_stop"] = value
    for key, value in (at_end or {}).items():
        record[f"{key}_at_end"] = value
    return record
