"""Why classifier-free forgetting misses latent-2 digits: where the evaluator's forget-class samples lie in z.

``python -m bench.latent_coverage [--latent 2] [--digits 0-9] [--samples 4096] [--out runs/latent_coverage]``

A classifier-free method knows the forget class only through the forget data. In the latent space the original
encoder gives it the forget data's *posterior region*: the prior samples ``z`` where the forget examples' posteriors
``q(z | x_f)`` carry a responsibility above ``t`` in the mixture of all training posteriors,

.. math::

   r_f(z) = \\frac{\\sum_{i \\in F} q(z \\mid x_i)}{\\sum_{i \\in F} q(z \\mid x_i) + \\sum_{j \\in R} q(z \\mid x_j)}.

A method that redraws exactly that region (and nothing else) can remove at most the evaluator's forget-class samples
inside it. This script scores, for the cached protocol VAE (``bench.per_class``'s ``runs/cache/latent<L>/model``,
trained if absent), the fraction of ``--samples`` prior samples the *evaluator* labels as the digit and the part of it
that lies *outside* the region for several ``t``: when that part is above the digit's auto threshold (the oracle's
fraction plus two standard errors, in ``bench.per_class``'s table), no redrawing of the forget data's posterior region
reaches the threshold; the decoder must change where the retained data's posteriors dominate too. The evaluator only
scores here, as everywhere; no method reads this script's output.

Writes ``<out>/latent_coverage.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any

from bench.per_class import ROOT, _digits, train_models, write_outputs

RESPONSIBILITY_LEVELS = (0.5, 0.1, 0.01)


def _log_posterior_density(z: Any, mean: Any, logvar: Any) -> Any:
    """``log q(z_n | x_m)`` up to the constant shared by every term, ``f32[N, M]`` (diagonal Gaussians)."""
    import jax.numpy as jnp

    return -0.5 * jnp.sum(jnp.square(z[:, None, :] - mean[None]) / jnp.exp(logvar)[None] + logvar[None], axis=-1)


def coverage(latent: int, digits: list[int], num_samples: int) -> list[dict[str, Any]]:
    """One row per digit: the evaluator's fraction and the part of it outside the forget posterior region."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gsu_jax.config_validation import load_config_file
    from gsu_jax.models.batched import classifier_logits, generate_images
    from gsu_jax.training.loading import load_trained
    from gsu_jax.training.run_data import prepare_data

    model_dir, _ = train_models(latent, [])
    config = load_config_file(ROOT / "configs" / "mnist_vae.py")
    config.latent_dim = latent
    train = prepare_data(config).train
    generator = load_trained(model_dir, "generative")
    evaluator = load_trained(model_dir, "evaluator")
    model = nnx.merge(generator.graphdef, generator.params)
    mean, logvar = jax.vmap(model.encode)(jnp.asarray(train.images, jnp.float32))
    z = jax.random.normal(jax.random.key(0), (num_samples, latent))
    images = generate_images(generator.graphdef, generator.params, z)
    labels = np.asarray(jnp.argmax(classifier_logits(evaluator.graphdef, evaluator.params, images), axis=-1))
    log_density = _log_posterior_density(z, mean, logvar)
    rows = []
    for digit in digits:
        forget = np.asarray(train.labels) == digit
        log_forget = jax.nn.logsumexp(log_density[:, forget], axis=1)
        log_retain = jax.nn.logsumexp(log_density[:, ~forget], axis=1)
        responsibility = np.asarray(jax.nn.sigmoid(log_forget - log_retain))
        drawn = labels == digit
        row: dict[str, Any] = {"latent": latent, "digit": digit, "evaluator_fraction": float(drawn.mean())}
        for level in RESPONSIBILITY_LEVELS:
            inside = responsibility > level
            row[f"region_{level}"] = float(inside.mean())
            row[f"outside_{level}"] = float(np.sum(drawn & ~inside) / num_samples)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=2)
    parser.add_argument("--digits", type=_digits, default=list(range(10)))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "latent_coverage")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = coverage(args.latent, args.digits, args.samples)
    header = ["latent", "digit", "evaluator's fraction"]
    for level in RESPONSIBILITY_LEVELS:
        header += [f"region r_f > {level}", f"outside it (r_f > {level})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["latent"]), str(row["digit"]), f"{row['evaluator_fraction']:.3f}"]
        for level in RESPONSIBILITY_LEVELS:
            cells += [f"{row[f'region_{level}']:.3f}", f"{row[f'outside_{level}']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    seconds = time.perf_counter() - start
    command = " ".join(["python -m bench.latent_coverage", *(sys.argv[1:] if argv is None else argv)])
    text = f"Command: `{command}` ({math.ceil(seconds)} s)\n\n" + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out / "latent_coverage", {"args": {**vars(args), "out": str(args.out)}, "rows": rows}, text)


if __name__ == "__main__":
    main()
