r"""Carrying out a plan and assembling its report: :func:`execute` (the orchestration: train what is missing,
evaluate the references, run every method, assemble and write the report), :func:`unlearn_and_evaluate`
(plan and execute), the per-method summaries and :func:`format_summary`.

Outputs in the workdir: ``report.json``, ``report.md``, ``logs/<label>.csv`` (one row per seed and step),
``samples/<label>.png`` (original / at stop / at end / oracle on the same z), ``forget_fraction.png``,
``results/<label>/seed_<s>.json`` (each finished run, :mod:`gsu_jax.unlearning.results`), and
``unlearned/<label>/seed_<s>/`` (orbax, via :mod:`gsu_jax.checkpointing`) with the parameters at the stopping step.
JSON, Markdown, CSV and PNG files are written atomically (a killed run leaves the previous file or none, never half
of one) by the formatters of :mod:`gsu_jax.reporting`.

Not in :mod:`gsu_jax.reporting` itself: that module is the JAX-free formatting layer under this package (the run
loop writes its grids through it), while assembling the report needs the plan, the models and the evaluation of
this package; putting it there would make the two import each other.
"""

from __future__ import annotations

import pathlib
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from gsu_jax import checkpointing, losses, methods, metrics, parallel, provenance, reporting, training
from gsu_jax.unlearning.config import jsonable_config
from gsu_jax.unlearning.evaluation import (
    Evaluation,
    References,
    check_classifier_independence,
    evaluate_references,
    generative_record,
)
from gsu_jax.unlearning.loop import run_method
from gsu_jax.unlearning.plan import RunPlan, load_model, plan_run, train_missing_models
from gsu_jax.unlearning.results import run_identity
from gsu_jax.workdir_lock import exclusive_workdir

__all__ = [
    "EXAMPLE_SUMMARY_KEYS",
    "SUMMARY_KEYS",
    "assemble_report",
    "execute",
    "format_summary",
    "method_summary_keys",
    "summarize_method",
    "unlearn_and_evaluate",
]


def unlearn_and_evaluate(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Validates (:func:`~gsu_jax.unlearning.plan.plan_run`) and runs (:func:`execute`) an unlearning request;
    returns the report."""
    return execute(plan_run(config, workdir))


def execute(plan: RunPlan) -> dict[str, Any]:
    """Carries out a validated plan: trains what is missing, runs every (method, seed), writes the report.

    Returns:
        The report dict (also written to ``report.json``; see :mod:`gsu_jax.reporting`).
    """
    started = time.perf_counter()
    # Every process has planned from the disk as it was before any of them writes to it.
    parallel.barrier("execute:planned")
    workdir = checkpointing.ensure_writable_directory(plan.workdir)
    with exclusive_workdir(workdir):  # one run per workdir: a second one is refused before it writes anything
        return _execute_holding_workdir(plan, workdir, started)


def _execute_holding_workdir(plan: RunPlan, workdir: pathlib.Path, started: float) -> dict[str, Any]:
    """``execute`` once the workdir is held: the models, every (method, seed), the report."""
    config = plan.config
    plan.progress(f"models: {plan.model_dir} (original), {plan.oracle_dir} (oracle); training what is missing")
    training_record = train_missing_models(plan)
    plan.progress(f"models ready in {training_record['seconds']:.1f} s")

    generator, evaluator, oracle = _load_models(plan)
    integrity, guidance_loss = _integrity_and_guidance(plan, generator, evaluator)
    evaluation = Evaluation(plan, generator, evaluator)
    integrity["monitoring_latents_digest"] = checkpointing.state_digest(evaluation.z_monitor)
    references = evaluate_references(plan, evaluation, generator, oracle)
    for sub in ("logs", "samples", "unlearned"):
        (workdir / sub).mkdir(exist_ok=True)
    grids = (
        evaluation.grid(generator.params, config["grid_samples"]),
        evaluation.grid(oracle.params, config["grid_samples"]),
    )

    model_digests = {
        "original": generator.metadata["params_digest"],
        "oracle": oracle.metadata["params_digest"],
        **{role: digest for role, digest in integrity.items() if role.endswith("params_digest")},
    }
    identity = run_identity(config, model_digests, references.threshold, references.gated_target)
    method_reports, curves, resumed = _run_methods(
        plan, evaluation, generator, guidance_loss, references, grids, identity
    )

    report = assemble_report(
        plan,
        references=references,
        evaluation=evaluation,
        models={"original": generator, "evaluator": evaluator, "oracle": oracle},
        integrity=integrity,
        method_reports=method_reports,
        resumed=resumed,
        training_seconds=training_record["seconds"],
        started=started,
    )
    report["timing"]["total_s"] = time.perf_counter() - started
    if parallel.is_main_process():
        _write_report_files(workdir, report, curves, references, started)
    return report


def _load_models(
    plan: RunPlan,
) -> tuple[training.TrainedModel, training.TrainedModel, training.TrainedModel]:
    """``(original, evaluator, oracle)``, refusing an original trained on other data than its config describes."""
    generator = load_model(plan, plan.model_dir, "generative")
    evaluator = load_model(plan, plan.classifier_dir, "evaluator")
    oracle = load_model(plan, plan.oracle_dir, "generative")
    if generator.metadata["train_fingerprint"] != plan.run_data.generative.fingerprint():
        raise RuntimeError(
            f"the generative model in {str(plan.model_dir)!r} was trained on other data than "
            "its config describes now (training-data fingerprints differ)"
        )
    return generator, evaluator, oracle


def _integrity_and_guidance(
    plan: RunPlan, generator: training.TrainedModel, evaluator: training.TrainedModel
) -> tuple[dict[str, Any], losses.GuidanceLossFn | None]:
    """The report's evidence that the evaluator stays out of the runs and, when guided, the guidance loss (built
    from the guidance classifier, refused unless independent of the evaluator)."""
    config = plan.config
    integrity: dict[str, Any] = {
        "evaluator_used_inside_runs": False,
        "evaluator_params_digest": evaluator.metadata["params_digest"],
        "monitoring_latents": "stream 'monitor' (independent of seeds and of every loss key)",
    }
    guidance_loss = None
    if plan.guided:
        guidance = load_model(plan, plan.classifier_dir, "guidance")
        integrity["classifiers"] = check_classifier_independence(evaluator, guidance)
        retained = [c for c in range(plan.run_data.train.num_classes) if c not in plan.forget_classes]
        guidance_loss = losses.uniformity_guidance_loss(
            generator.graphdef,
            guidance.graphdef,
            guidance.params,
            retained_classes=retained,
            num_samples=config["guidance_samples"],
            latent_dim=int(generator.metadata["model_kwargs"]["latent_dim"]),
        )
        integrity["guidance_params_digest"] = guidance.metadata["params_digest"]
    return integrity, guidance_loss


def _run_methods(
    plan: RunPlan,
    evaluation: Evaluation,
    generator: training.TrainedModel,
    guidance_loss: losses.GuidanceLossFn | None,
    references: References,
    grids: tuple[Any, Any],
    identity: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, list[list[float]]], list[str]]:
    """Runs every method in table order, writing each one's log as soon as its seeds are done.

    Returns:
        ``(summary per label, forget-fraction curves per label, the runs read back)``.
    """
    method_reports: dict[str, Any] = {}
    curves: dict[str, list[list[float]]] = {}
    resumed: list[str] = []
    keys = method_summary_keys(evaluation.loss_prefix, evaluation.conditional, example_forget=plan.example_forget)
    for name in plan.method_names:
        run = run_method(plan, name, evaluation, generator, guidance_loss, references, grids, identity)
        resumed.extend(run.resumed)
        curves[run.label] = run.fractions
        if parallel.is_main_process():
            reporting.write_step_csv(str(plan.workdir / "logs" / f"{run.label}.csv"), run.rows)
        method_reports[run.label] = summarize_method(
            name, run.label, run.hparams, run.per_seed, run.compile_seconds, plan.guided, keys
        )
        method_reports[run.label]["optimizer"] = run.optimizer
    return method_reports, curves, resumed


def assemble_report(
    plan: RunPlan,
    *,
    references: References,
    evaluation: Evaluation,
    models: Mapping[str, training.TrainedModel],
    integrity: dict[str, Any],
    method_reports: dict[str, Any],
    resumed: list[str],
    training_seconds: float,
    started: float,
) -> dict[str, Any]:
    """The report (see :mod:`gsu_jax.reporting`): the request, the references, every method's summary and what the
    numbers depend on (config, data, models, versions, device, code). ``models``: original, evaluator, oracle."""
    config = plan.config
    original_eval, oracle_eval = references.original, references.oracle
    return {
        "command": plan.command,
        # The method to use when in doubt (its defaults are the measured ones); it heads the default methods list.
        "recommended_method": methods.RECOMMENDED_METHOD,
        "config": jsonable_config(config),
        "forget_classes": list(plan.forget_classes),
        "forget_set": _forget_set_record(plan),
        "seeds": list(plan.seeds),
        "threshold": _threshold_record(plan, references),
        "sa_gated_forget_loss_target": {
            "source": config["gated_target"],
            "scale": config["gated_target_scale"],
            "value": references.gated_target,
            "original_forget_train_loss": original_eval[f"{evaluation.loss_prefix}_forget_train"],
        },
        "data": _data_record(plan),
        "models": {
            "original": _model_record(plan.model_dir, models["original"]),
            "evaluator": _model_record(plan.classifier_dir, models["evaluator"]),
            "oracle": _model_record(plan.oracle_dir, models["oracle"]),
        },
        "integrity": integrity,
        "generative": generative_record(evaluation, config),
        "versions": {**provenance.package_versions(), "python": platform.python_version()},
        "jax_flags": provenance.jax_flags(),
        "code": provenance.code_version(),
        "device": provenance.device_description(),
        "parallel": _parallel_record(plan),
        "original": original_eval,
        "oracle": oracle_eval,
        "methods": method_reports,
        "reproducibility": {
            "volatile_fields": list(reporting.VOLATILE_REPORT_FIELDS),
            "volatile_log_columns": list(reporting.VOLATILE_LOG_COLUMNS),
        },
        "resumed": resumed,
        "timing": {"training_s": training_seconds, "total_s": time.perf_counter() - started},
    }


def _forget_set_record(plan: RunPlan) -> dict[str, Any]:
    """Which kind of set was forgotten (``classes`` or ``examples``), its spec and how many training examples."""
    record = dict(plan.forget_record)
    record["selected_by"] = record.pop("kind")
    return {"kind": "examples" if plan.example_forget else "classes", **record}


def _threshold_record(plan: RunPlan, references: References) -> dict[str, Any]:
    config, threshold, original_eval = plan.config, references.threshold, references.original
    if plan.example_forget:
        return {
            "mode": "oracle_loss_gap_band",
            "name": "oracle loss gap ± 2 SE",
            "value": [threshold.low, threshold.high],
            "oracle_loss_gap": references.oracle["loss_gap"],
            "oracle_loss_gap_se": references.oracle["loss_gap_se"],
            "original_loss_gap": original_eval["loss_gap"],
            "original_already_reached": metrics.reached_stop(original_eval["loss_gap"], threshold),
            "heldout_examples": len(plan.run_data.heldout),
        }
    return {
        "mode": "auto" if plan.threshold is None else "fixed",
        "value": threshold,
        "monitor_samples": config["monitor_samples"],
        "oracle_forget_fraction": references.oracle["forget_fraction"],
        "original_forget_fraction": original_eval["forget_fraction"],
        "original_already_below": original_eval["forget_fraction"] < threshold,
        "published": {
            "value": config["published_threshold"],
            "monitor_samples": config["published_monitor_samples"],
            "original_forget_fraction": original_eval["forget_fraction_published"],
        },
    }


def _data_record(plan: RunPlan) -> dict[str, Any]:
    config = plan.config
    return {
        "spec": config["train"]["data"],
        "fingerprint": plan.run_data.source_fingerprint,
        "train_fingerprint": plan.run_data.train.fingerprint(),
        "heldout_fingerprint": plan.run_data.heldout.fingerprint(),
        "num_train": len(plan.run_data.train),
        "num_forget_train": int(plan.forget_idx.size),
        "num_retain_train": int(plan.retain_idx.size),
        "num_heldout": len(plan.run_data.heldout),
    }


def _write_report_files(
    workdir: pathlib.Path,
    report: dict[str, Any],
    curves: Mapping[str, list[list[float]]],
    references: References,
    started: float,
) -> None:
    """``forget_fraction.png``, then ``report.json`` and ``report.md`` (process 0); the total time is taken last."""
    threshold = references.threshold
    if isinstance(threshold, metrics.LossGapBand):
        reporting.plot_forget_fraction(
            str(workdir / "forget_fraction.png"),
            curves,
            threshold=tuple(threshold),
            threshold_label=f"stop band [{threshold.low:.3f}, {threshold.high:.3f}] (oracle gap ± 2 SE)",
            oracle_fraction=references.oracle["loss_gap"],
            ylabel="loss gap: forget train - held-out",
        )
    else:
        reporting.plot_forget_fraction(
            str(workdir / "forget_fraction.png"),
            curves,
            threshold=threshold,
            threshold_label=f"threshold {threshold:.4f} ({report['threshold']['mode']})",
            oracle_fraction=references.oracle["forget_fraction"],
        )
    report["timing"]["total_s"] = time.perf_counter() - started
    reporting.write_json(str(workdir / "report.json"), report)
    reporting.write_markdown(str(workdir / "report.md"), report)


# ------------------------------------------------------------------------------------------- summaries


SUMMARY_KEYS = (
    "step_time_ms",
    "step_time_ms_mean",
    "time_to_unlearn_s",
    "forget_fraction_at_stop",
    "forget_fraction_published_at_stop",
    "forget_fraction_fid_samples_at_stop",
    "fid_retain_at_stop",
    "fid_all_at_stop",
    "inception_score_at_stop",
    "nelbo_heldout_retain_at_stop",
    "nelbo_heldout_forget_at_stop",
    "nelbo_forget_train_at_stop",
    "mia_auc",
    "forget_fraction_at_end",
    "forget_fraction_fid_samples_at_end",
    "fid_retain_at_end",
    "fid_all_at_end",
    "inception_score_at_end",
    "nelbo_heldout_retain_at_end",
    "nelbo_heldout_forget_at_end",
    "nelbo_forget_train_at_end",
    "mia_auc_at_end",
)
# The summary of a run forgetting examples, not whole classes (the evaluation's keys for example sets).
EXAMPLE_SUMMARY_KEYS = (
    "step_time_ms",
    "step_time_ms_mean",
    "time_to_unlearn_s",
    *(f"{key}_{when}" for when in ("at_stop", "at_end") for key in ("loss_gap", "loss_gap_se", "fid_retain")),
    *(f"{key}_{when}" for when in ("at_stop", "at_end") for key in ("fid_all", "inception_score")),
    *(f"{key}_{when}" for when in ("at_stop", "at_end") for key in ("nelbo_forget_train", "nelbo_heldout")),
    "mia_auc",
    "mia_auc_at_end",
)
# Added to the summary of a class-conditional DDPM (the SalUn / Selective Amnesia protocol).
_CONDITIONAL_KEYS = ("forget_label_class_prob", "forget_label_accuracy", "forget_label_entropy")


def method_summary_keys(loss_prefix: str, conditional: bool, *, example_forget: bool = False) -> tuple[str, ...]:
    """:data:`SUMMARY_KEYS` (:data:`EXAMPLE_SUMMARY_KEYS` for a forget set of examples) with the family's loss
    names (``nelbo`` for a VAE), plus the conditional protocol when forgetting classes."""
    keys = tuple(
        key.replace("nelbo_", f"{loss_prefix}_", 1)
        for key in (EXAMPLE_SUMMARY_KEYS if example_forget else SUMMARY_KEYS)
    )
    if conditional and not example_forget:
        keys += tuple(f"{key}_{when}" for key in _CONDITIONAL_KEYS for when in ("at_stop", "at_end"))
    return keys


def summarize_method(
    name: str,
    label: str,
    hparams: dict[str, Any],
    per_seed: list[dict[str, Any]],
    compile_seconds: float,
    guided: bool,
    summary_keys: Sequence[str] = SUMMARY_KEYS,
) -> dict[str, Any]:
    """One method's entry in ``report["methods"]``: what it is, and the statistic over the seeds of every key."""
    summary: dict[str, Any] = {
        "method": name,
        "label": label,
        "guided": guided,
        "rule": methods.METHODS[name].rule,
        "source": methods.METHODS[name].source,
        "hparams": hparams,
        "compile_s": compile_seconds,
        "steps_to_threshold": metrics.summarize([r["steps_to_threshold"] for r in per_seed]),
        "steps_to_published_threshold": metrics.summarize([r["steps_to_published_threshold"] for r in per_seed]),
        "nonfinite_steps": sum(r.get("nonfinite_steps", 0) for r in per_seed),
    }
    for key in summary_keys:
        summary[key] = metrics.summarize([r.get(key) for r in per_seed])
    summary["per_seed"] = per_seed
    return summary


def _parallel_record(plan: RunPlan) -> dict[str, Any]:
    return {
        "mesh": None if plan.mesh is None else dict(plan.mesh.shape),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }


def _model_record(workdir: pathlib.Path, model: training.TrainedModel) -> dict[str, Any]:
    """A model's entry in ``report["models"]``: where it is, what it is and how it was trained (or imported from)."""
    meta = model.metadata
    return {
        "workdir": str(workdir),
        "role": meta.get("role"),
        "model": meta.get("model"),
        "model_kwargs": meta.get("model_kwargs"),
        "seed": meta.get("seed"),
        "step": meta.get("step"),
        "num_train": meta.get("num_train"),
        "train_fingerprint": meta.get("train_fingerprint"),
        "excluded_classes": meta.get("excluded_classes"),
        "excluded": meta.get("excluded"),
        "params_digest": meta.get("params_digest"),
        # A foreign orbax checkpoint imported by unlearn.py: {"from": its path, "params_digest"}; None if trained.
        "imported": meta.get("imported"),
    }


def format_summary(report: Mapping[str, Any]) -> str:
    """The table printed at the end of a run (the same as in report.md), with the threshold line."""
    threshold = report["threshold"]
    if threshold["mode"] == "oracle_loss_gap_band":
        forget_set = report["forget_set"]
        low, high = threshold["value"]
        head = (
            f"forget set {forget_set['spec']} ({forget_set['count']} examples); stop: {threshold['name']} = "
            f"[{low:.3f}, {high:.3f}] (original gap {threshold['original_loss_gap']:.3f}, oracle "
            f"{threshold['oracle_loss_gap']:.3f}); seeds {report['seeds']}"
        )
        return head + "\n\n" + reporting.markdown_table(report)
    head = (
        f"threshold {threshold['mode']} = {threshold['value']:.4f} on {threshold['monitor_samples']} samples "
        f"(original {threshold['original_forget_fraction']:.4f}, oracle {threshold['oracle_forget_fraction']:.4f});"
        f" seeds {report['seeds']}"
    )
    return head + "\n\n" + reporting.markdown_table(report)
