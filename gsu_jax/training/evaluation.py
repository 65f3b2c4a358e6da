"""Held-out evaluation of a trained role and its sample grid.

Generative roles: the family's loss on held-out and training data with one fixed key per example (VAE: negative
ELBO and its terms; DDPM: the epsilon loss at one random timestep), split into retained and excluded classes when
``config.exclude_classes`` is set, and ``samples.png``. Classifiers: held-out accuracy and cross-entropy. The
jitted programs these call are :func:`gsu_jax.training.programs.compiled_programs`; this module turns their
outputs into metrics and pictures.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gsu_jax import generative as families
from gsu_jax import io
from gsu_jax.training.plan import EVAL_STREAM, SAMPLE_STREAM, RolePlan
from gsu_jax.training.programs import Programs

__all__ = ["evaluate_role", "write_samples_png"]


def evaluate_role(plan: RolePlan, programs: Programs, params: nnx.State, excluded: tuple[int, ...]) -> dict[str, Any]:
    """Generative: the family's loss with a fixed key per example on held-out and training data (VAE: negative
    ELBO with KL weight 1 and one posterior sample, ``heldout_neg_elbo`` and its terms; DDPM: the epsilon loss at one
    random timestep, ``heldout_eps_loss``). Classifiers: accuracy and mean cross-entropy on the held-out data."""
    eval_key = jax.random.fold_in(plan.key, EVAL_STREAM)
    if not plan.generative:
        logits = programs.evaluate(params, jnp.asarray(plan.heldout.images), eval_key)
        labels = jnp.asarray(plan.heldout.labels)
        return {
            "heldout_accuracy": float(jnp.mean(jnp.argmax(logits, axis=-1) == labels)),
            "heldout_cross_entropy": float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))),
        }
    family = families.family_of(plan.spec.model_name)
    # Held-out and training examples in one call (one compilation); every example has its own key.
    both = np.concatenate([plan.heldout.images, plan.train.images])
    labels = np.concatenate([plan.heldout.labels, plan.train.labels])
    terms = np.asarray(programs.evaluate(params, jnp.asarray(both), jnp.asarray(labels), eval_key))
    heldout, train = terms[: len(plan.heldout)], terms[len(plan.heldout) :]
    loss = family.loss_metric
    metrics = {f"heldout_{loss}": float(heldout.sum(axis=1).mean())}
    if len(family.term_names) > 1:
        metrics.update({f"heldout_{term}": float(heldout[:, i].mean()) for i, term in enumerate(family.term_names)})
    metrics[f"train_{loss}"] = float(train.sum(axis=1).mean())
    if excluded:
        is_excluded = np.isin(plan.heldout.labels, excluded)
        for name, mask in (("retained", ~is_excluded), ("excluded", is_excluded)):
            if mask.any():
                metrics[f"heldout_{loss}_{name}_classes"] = float(heldout[mask].sum(axis=1).mean())
    return metrics


def write_samples_png(
    path: pathlib.Path, plan: RolePlan, programs: Programs, params: nnx.State, *, num_images: int, title: str
) -> None:
    """PNG: samples from fixed noise (left); for a VAE, held-out images next to their reconstructions (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Evenly spaced held-out examples: every class shows up even when the data is sorted by label.
    picks = np.linspace(0, len(plan.heldout) - 1, max(1, num_images // 2)).astype(np.int64)
    originals = plan.heldout.images[picks]
    samples, reconstructions = jax.device_get(
        programs.draw(
            params, jax.random.fold_in(plan.key, SAMPLE_STREAM), jnp.asarray(originals), num_samples=num_images
        )
    )
    columns = max(2, 2 * math.ceil(math.sqrt(num_images) / 2))

    def tile(images: np.ndarray) -> np.ndarray:
        return io.tile_images(images, columns, gap=1, fill=1.0)  # 1-pixel white lines between the images

    if reconstructions is None:  # a DDPM: samples only
        panels = [
            (
                tile(samples),
                "DDIM samples from x_T ~ N(0, I)"
                + (", labels 0, 1, ... row-wise" if families.Family.is_conditional(plan.model_kwargs) else ""),
            )
        ]
    else:
        interleaved = np.stack([originals, reconstructions], axis=1).reshape(-1, *originals.shape[1:])
        panels = [
            (tile(samples), "samples, z ~ N(0, I)"),
            (tile(interleaved), "held-out | reconstruction (posterior mean)"),
        ]
    figure = Figure(figsize=(10 if len(panels) > 1 else 7, 5.4), dpi=100)
    FigureCanvasAgg(figure)
    for axis, (grid, label) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        gray = grid.shape[-1] == 1
        axis.imshow(
            grid[..., 0] if gray else grid, cmap="gray" if gray else None, vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        axis.set_title(label, fontsize=10)
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    io.write_png(path, figure)
