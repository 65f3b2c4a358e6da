"""The unlearning report's formats: JSON, Markdown table, per-step CSV logs, PNG grids, forget-fraction plot.

Everything here is plain host-side formatting of numbers that `gsu_jax.unlearning` has already computed; nothing
here touches JAX, and every file goes through the atomic writers of :mod:`gsu_jax.io`. The report is a nested dict (see `gsu_jax.unlearning.unlearn_and_evaluate`):

* ``report["original"]`` / ``report["oracle"]``: one evaluation of one model, ``{metric: float | None}``.
* ``report["methods"][label]``: one summary per method label (``"sa"``, ``"sa_gated+guided"``, ...) where
  every metric is the statistic of `gsu_jax.metrics.summarize`: ``{"mean", "std", "per_seed", "num_reached",
  "num_seeds"}`` (``None`` entries in ``per_seed`` are seeds without a value, e.g. that never stopped).

Example:
  >>> import tempfile, os
  >>> d = tempfile.mkdtemp()
  >>> write_step_csv(os.path.join(d, "log.csv"), [{"seed": 0, "step": 1, "forget_fraction": 0.5}])
  >>> open(os.path.join(d, "log.csv")).read().splitlines()[0]
  'seed,step,forget_fraction'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gsu_jax import io

# Columns of the results table: (header, key in a method summary, key in an original/oracle evaluation, format).
# A method key names a statistic {mean, std, per_seed}; a reference key names a float of one model.
_TABLE_COLUMNS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("steps to threshold", "steps_to_threshold", None, "{:.1f}"),
    ("steps to 0.02 @128 (published)", "steps_to_published_threshold", None, "{:.1f}"),
    ("step time (ms)", "step_time_ms", None, "{:.1f}"),
    ("time to unlearn (s)", "time_to_unlearn_s", None, "{:.3f}"),
    ("forget fraction at stop", "forget_fraction_at_stop", "forget_fraction", "{:.3f}"),
    ("FID retain: stop", "fid_retain_at_stop", "fid_retain", "{:.2f}"),
    ("FID retain: end", "fid_retain_at_end", "fid_retain", "{:.2f}"),
    ("FID all: stop", "fid_all_at_stop", "fid_all", "{:.2f}"),
    ("FID all: end", "fid_all_at_end", "fid_all", "{:.2f}"),
    ("IS at stop", "inception_score_at_stop", "inception_score", "{:.2f}"),
    ("held-out -ELBO retain", "nelbo_heldout_retain_at_stop", "nelbo_heldout_retain", "{:.1f}"),
    ("held-out -ELBO forget", "nelbo_heldout_forget_at_stop", "nelbo_heldout_forget", "{:.1f}"),
    ("MIA AUC", "mia_auc", "mia_auc", "{:.3f}"),
)
# The columns when the forget set is examples, not whole classes (report["forget_set"]["kind"] == "examples"): the
# forget fraction of generated samples means nothing there; the loss gap (each forget training example's loss minus
# the held-out mean of its class) is what the stop reads, and the MIA compares the forget examples with the whole held-out split.
_EXAMPLE_TABLE_COLUMNS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("steps to oracle loss-gap band", "steps_to_threshold", None, "{:.1f}"),
    ("step time (ms)", "step_time_ms", None, "{:.1f}"),
    ("time to unlearn (s)", "time_to_unlearn_s", None, "{:.3f}"),
    ("loss gap: stop", "loss_gap_at_stop", "loss_gap", "{:.2f}"),
    ("loss gap: end", "loss_gap_at_end", "loss_gap", "{:.2f}"),
    ("FID retain: stop", "fid_retain_at_stop", "fid_retain", "{:.2f}"),
    ("FID retain: end", "fid_retain_at_end", "fid_retain", "{:.2f}"),
    ("IS at stop", "inception_score_at_stop", "inception_score", "{:.2f}"),
    ("-ELBO forget train", "nelbo_forget_train_at_stop", "nelbo_forget_train", "{:.1f}"),
    ("held-out -ELBO", "nelbo_heldout_at_stop", "nelbo_heldout", "{:.1f}"),
    ("MIA AUC (forget vs held-out)", "mia_auc", "mia_auc", "{:.3f}"),
)


# Fields of report.json that are not reproducible numbers: wall-clock measurements, and how this process came
# by its numbers (the command names the workdir; ``resumed`` lists the results read back from an interrupted
# run). Every other field is identical between two runs of the same config and seeds on the same device and
# software, and between an interrupted-and-resumed run and an uninterrupted one. ``*`` stands for any method
# label or any per-seed record.
VOLATILE_REPORT_FIELDS: tuple[str, ...] = (
    "command",
    "timing",
    "resumed",
    "methods.*.compile_s",
    "methods.*.step_time_ms",
    "methods.*.step_time_ms_mean",
    "methods.*.time_to_unlearn_s",
    "methods.*.per_seed.*.step_time_ms",
    "methods.*.per_seed.*.step_time_ms_mean",
    "methods.*.per_seed.*.time_to_unlearn_s",
)
# The same for the per-step CSV logs: one column.
VOLATILE_LOG_COLUMNS: tuple[str, ...] = ("step_time_ms",)


def without_volatile_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` without :data:`VOLATILE_REPORT_FIELDS`: what two runs of one config must share.

    Example:
        >>> without_volatile_fields({"timing": {"total_s": 3.1}, "methods": {"sa": {"compile_s": 2.0, "x": 1}}})
        {'methods': {'sa': {'x': 1}}}
    """
    kept = io.json_normalize(report, nonfinite_as_null=True)
    for field in VOLATILE_REPORT_FIELDS:
        _drop(kept, field.split("."))
    return kept


def _drop(node: Any, path: list[str]) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if rest:
                _drop(child, rest)
        return
    if not isinstance(node, dict) or head not in node:
        return
    if rest:
        _drop(node[head], rest)
    else:
        del node[head]


def write_json(path: str, report: Mapping[str, Any]) -> None:
    """Writes ``report`` atomically as indented JSON (NaN/inf become ``null``; numpy scalars Python numbers)."""
    io.write_json(path, report, indent=2, nonfinite_as_null=True)


def write_step_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes (atomically) one row per (seed, step), the union of the rows' keys as columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    io.write_csv(path, [{k: _format_csv_value(v) for k, v in row.items()} for row in rows], columns)


def _format_csv_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, np.integer):
        return int(value)
    return "" if value is None else value


def _format_stat(stat: Mapping[str, Any] | None, fmt: str) -> str:
    if stat is None or stat.get("mean") is None:
        return "—"
    text = fmt.format(stat["mean"])
    if stat.get("std") is not None:
        text += " ± " + fmt.format(stat["std"])
    return text


def _format_steps(stat: Mapping[str, Any] | None) -> str:
    if stat is None:
        return "—"
    runs, stopped = stat["num_seeds"], stat["num_reached"]
    body = _format_stat(stat, "{:.1f}") if stopped else "none"
    return body if stopped == runs else f"{body} ({stopped}/{runs} stopped)"


def _format_value(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


# Added for a class-conditional generator (samples generated FROM the forget label, SalUn / Selective Amnesia).
_CONDITIONAL_COLUMNS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("p(forget label) on its samples", "forget_label_class_prob_at_stop", "forget_label_class_prob", "{:.3f}"),
    ("entropy on forget-label samples", "forget_label_entropy_at_stop", "forget_label_entropy", "{:.3f}"),
)


def _table_columns(report: Mapping[str, Any]) -> tuple[tuple[str, str | None, str | None, str], ...]:
    """The columns for the kind of forget set (whole classes, or examples) and the report's generative family: its
    loss names (VAE ``nelbo`` / ``-ELBO`` when the report does not say) and, for a class-conditional model forgetting
    classes, the forget-label protocol."""
    family = report.get("generative") or {}
    prefix, label = family.get("loss_prefix", "nelbo"), family.get("loss_label", "-ELBO")
    examples = _forgets_examples(report)
    columns = []
    for header, key, ref_key, fmt in _EXAMPLE_TABLE_COLUMNS if examples else _TABLE_COLUMNS:
        if ref_key is not None and ref_key.startswith("nelbo_"):
            header = header.replace("-ELBO", label)
            key, ref_key = (name.replace("nelbo_", f"{prefix}_", 1) for name in (key, ref_key))
            fmt = fmt if prefix == "nelbo" else "{:.4f}"
        columns.append((header, key, ref_key, fmt))
    if family.get("class_conditional") and not examples:
        columns.extend(_CONDITIONAL_COLUMNS)
    return tuple(columns)


def _forgets_examples(report: Mapping[str, Any]) -> bool:
    """Whether the report's forget set is examples rather than whole classes (reports before the field: classes)."""
    return (report.get("forget_set") or {}).get("kind") == "examples"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The results table: original model, oracle, then every method (mean ± std over seeds).

    ``steps to threshold`` is the number of updates applied when the monitored forget fraction first fell
    below the threshold, averaged over the seeds that got there (the count in brackets says how many did).
    FID columns are the classifier-FID of the evaluator's features, against the retained training data and
    against all training data, at the stopping step (the budget when a seed never stopped) and at the end of
    the budget. The original and the oracle have one value per column (no steps). The loss columns are the
    generative family's (VAE: negative ELBO; DDPM: epsilon MSE).
    """
    table_columns = _table_columns(report)
    headers = ["model"] + [c[0] for c in table_columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name in ("original", "oracle"):
        evaluation = report.get(name)
        if evaluation is None:
            continue
        cells = [f"{name} model" if name == "original" else "oracle (retrained without forget set)"]
        for _, _, ref_key, fmt in table_columns:
            cells.append("—" if ref_key is None else _format_value(evaluation.get(ref_key), fmt))
        lines.append("| " + " | ".join(cells) + " |")
    for label, summary in report.get("methods", {}).items():
        cells = [label]
        for _, key, _, fmt in table_columns:
            if key in ("steps_to_threshold", "steps_to_published_threshold"):
                cells.append(_format_steps(summary.get(key)))
            else:
                cells.append(_format_stat(summary.get(key), fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The whole report.md: command, setting, threshold, the table, and how to read it."""
    config = report["config"]
    guided = any(summary.get("guided") for summary in report.get("methods", {}).values())
    lines = [
        "# Unlearning report",
        "",
        "Produced by:",
        "",
        "```",
        report["command"],
        "```",
        "",
        *_forget_set_lines(report),
        f"- seeds: {report['seeds']}; budget {config['max_steps']} steps "
        f"({'always run to the budget' if config['continue_to_budget'] else 'stopped at the threshold'}); "
        f"batches {config['batch_size']} forget + {config['retain_batch_size']} retain per step; "
        f"optimizer {config['optimizer']['name']} lr {config['optimizer']['learning_rate']}",
        *_stop_lines(report),
        f"- FID: classifier-FID on the evaluator's features, {config['fid_samples']} generated samples, against "
        "the retained training images and against all training images",
        *_sampling_lines(report),
        f"- guidance: {'weight ' + str(config['guidance_weight']) + ' (rows labelled +guided)' if guided else 'none'}"
        "; the evaluator that scores the runs is a separate model that no method sees",
        f"- device: {report['device']}"
        + (
            f"; code: commit {report['code']['git_commit'][:12]}{' with local changes' if report['code']['git_dirty'] else ''}"
            if report.get("code", {}).get("git_commit")
            else ""
        ),
        "",
        markdown_table(report),
        "",
        "Method settings (hyperparameters and optimizer of each row):",
        "",
        *[f"- `{label}`: {_settings(summary)}" for label, summary in report.get("methods", {}).items()],
        "",
        "Steps count updates applied; mean ± sample std over seeds, over the seeds that stopped when "
        "the bracket says fewer did. Time to unlearn = mean step time × steps to threshold (the protocol's "
        "definition); step time is the jitted step alone after compilation, synchronised, without the "
        "monitoring. `stop` = the stopping step (the budget for a seed that never stopped), `end` = the end of "
        "the budget.",
        "",
    ]
    return "\n".join(lines)


def _forget_set_lines(report: Mapping[str, Any]) -> list[str]:
    """What was forgotten: which kind of set, how many training examples, and the data."""
    data = report["data"]
    forget_set = report.get("forget_set") or {}
    if _forgets_examples(report):
        head = (
            f"- forget set: {forget_set['count']} training examples (`{forget_set['spec']}`: examples, not whole "
            "classes)"
        )
    else:
        head = f"- forget classes: {report['forget_classes']}"
    return [
        f"{head}; data `{data['spec']}` (fingerprint `{data['fingerprint'][:16]}`), {data['num_forget_train']} "
        f"forget / {data['num_retain_train']} retain training examples, {data['num_heldout']} held-out examples"
    ]


def _stop_lines(report: Mapping[str, Any]) -> list[str]:
    """The stopping rule(s): the forget-fraction threshold and the published one, or the oracle's loss-gap band."""
    threshold = report["threshold"]
    if _forgets_examples(report):
        low, high = threshold["value"]
        return [
            f"- stop: {threshold['name']}: the first update whose loss gap (mean over the forget training "
            f"examples of each one's loss minus the mean of the {threshold['heldout_examples']} held-out examples' "
            "of its class) reaches "
            f"{low:.3f}, the low end of [{low:.3f}, {high:.3f}] = the oracle's gap {threshold['oracle_loss_gap']:.3f} ± 2 × its standard "
            f"error {threshold['oracle_loss_gap_se']:.3f} (original model's gap {threshold['original_loss_gap']:.3f});"
            " a gap past the high end has forgotten too much; no published rule for examples"
        ]
    published = threshold["published"]
    return [
        f"- threshold: {threshold['mode']} = {threshold['value']:.4f} on {threshold['monitor_samples']} fixed "
        f"monitoring samples"
        + (
            f" (oracle forget fraction {threshold['oracle_forget_fraction']:.4f} + 2 binomial standard errors)"
            if threshold["mode"] == "auto"
            else ""
        ),
        f"- published setting reported beside it: threshold {published['value']} on the first "
        f"{published['monitor_samples']} of the same monitoring samples (same runs, second stopping rule)",
    ]


def _sampling_lines(report: Mapping[str, Any]) -> list[str]:
    """How a DDPM was sampled (nothing for a VAE: one decoder pass from fixed z)."""
    family = report.get("generative") or {}
    if family.get("family") != "ddpm":
        return []
    lines = [
        f"- DDPM: fixed x_T per sample, DDIM with {family['monitor_sample_steps']} steps for the per-step "
        f"monitoring and {family['fid_sample_steps']} for the FID, grids and forget-label protocol; losses "
        "are the epsilon MSE at one random timestep per fixed key"
    ]
    if family.get("class_conditional"):
        lines.append(
            f"- class-conditional: monitoring and FID samples use labels i mod K, guidance scale "
            f"{family['guidance_scale']}; 'forget label' columns score samples generated FROM the forget "
            "label(s): the evaluator's probability of that label and the entropy of its prediction (nats)"
        )
    return lines


def _settings(summary: Mapping[str, Any]) -> str:
    hparams = summary.get("hparams") or {}
    text = ", ".join(f"{key}={_short(value)}" for key, value in sorted(hparams.items())) or "no hyperparameters"
    optimizer = summary.get("optimizer")
    if optimizer:
        text += f"; optimizer {optimizer['name']} lr {optimizer['learning_rate']:g}"
    if summary.get("nonfinite_steps"):
        text += f"; {summary['nonfinite_steps']} step(s) with a non-finite update skipped (all seeds)"
    return text


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def write_markdown(path: str, report: Mapping[str, Any]) -> None:
    """Writes `markdown_report(report)` to ``path`` (atomically)."""
    io.write_text(path, markdown_report(report))


# Resolution of the report's PNGs (sample panels, forget-fraction plot).
_PNG_DPI = 110


def save_sample_panels(path: str, panels: Mapping[str, np.ndarray], *, columns: int = 8) -> None:
    """Saves side-by-side grids of samples, one titled panel per entry (e.g. original / at stop / at end).

    Args:
      path: PNG file to write.
      panels: title -> ``f32[N, H, W, C]`` images in [0, 1] (the same fixed z in every panel, so that the
        panels compare the same latent points before and after unlearning).
      columns: images per grid row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels.items()):
        grid = io.tile_images(images, columns)
        if grid.shape[-1] == 1:
            ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(np.clip(grid, 0.0, 1.0))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    io.write_png(path, fig, dpi=_PNG_DPI)
    plt.close(fig)


def plot_forget_fraction(
    path: str,
    curves: Mapping[str, Sequence[Sequence[float]]],
    *,
    threshold: float | Sequence[float],
    threshold_label: str,
    oracle_fraction: float | None = None,
    ylabel: str = "forget fraction (evaluator)",
) -> None:
    """Plots the monitored forget fraction against the step for every method (mean bold, seeds thin).

    Args:
      path: PNG file to write.
      curves: method label -> one sequence per seed of the forget fraction at steps 0, 1, ... (step 0 is the
        original model); sequences may differ in length (runs that stopped early).
      threshold: the stopping threshold, drawn as a dashed line (a ``(low, high)`` band: two lines).
      threshold_label: legend text for the threshold line.
      oracle_fraction: the oracle's forget fraction on the same samples, drawn as a dotted line when given.
      ylabel: what the curves are (a forget set of examples plots its loss gap).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, per_seed) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        length = max(len(c) for c in per_seed)
        padded = np.full((len(per_seed), length), np.nan)
        for j, curve in enumerate(per_seed):
            padded[j, : len(curve)] = curve
            ax.plot(np.arange(len(curve)), curve, color=color, alpha=0.2, linewidth=0.7)
        ax.plot(np.arange(length), np.nanmean(padded, axis=0), color=color, linewidth=1.8, label=label)
    for index, level in enumerate(np.atleast_1d(threshold)):
        ax.axhline(level, color="black", linestyle="--", linewidth=1.0, label=None if index else threshold_label)
    if oracle_fraction is not None:
        ax.axhline(oracle_fraction, color="gray", linestyle=":", linewidth=1.0, label="oracle")
    ax.set_xlabel("updates applied")
    ax.set_ylabel(ylabel)
    if np.ndim(threshold) == 0:  # a fraction; a loss gap may be negative
        ax.set_ylim(bottom=0.0)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    io.write_png(path, fig, dpi=_PNG_DPI)
    plt.close(fig)
