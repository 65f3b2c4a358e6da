"""Where the retained data's loss goes in one ``remap_surgery`` step: slope or curvature (an issue-12 diagnostic).

``python -m bench.curvature [--latents 2,16] [--digits 1,8] [--seeds 2] [--out runs/curvature]``

For each cached protocol VAE (``runs/cache/latent<L>/model``, trained by :mod:`bench.per_class` when missing) and
forget digit, it takes the protocol's first step (128 forget + 128 retain examples drawn with ``--seeds``, SGD 3e-3,
``remap_surgery``'s other defaults) three ways: the forget part alone (``retain_weight=0``), the full step without
the lookahead (``retain_lookahead=0``, the retain gradient at the current parameters), and the full step with
``retain_lookahead=3e-3`` (the default: the retain gradient taken where the forget part leads). For each it reports the
change of the mean loss (negative ELBO, the same 4 reparameterisation draws per example before and after) of the
retained held-out digits, and, for the forget part, its first-order prediction ``g_heldout . delta``. Where the
prediction is far below the actual rise, the step damages the retained data through curvature, which a projection
off ``g_r`` (first order) cannot prevent.

Writes ``<out>/curvature.{json,md}`` (atomically, :func:`bench.per_class.write_outputs`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEARNING_RATE = 3e-3
DRAWS = 4


def measure(latent: int, digit: int, seed: int) -> dict[str, Any]:
    """One (latent, digit, seed): the held-out retained loss change of each variant of the first step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bench.per_class import train_models
    from gsu_jax import data as data_lib
    from gsu_jax import data_splits, generative, methods, training

    model_dir, _ = train_models(latent, [])
    generator = training.load_trained(model_dir, "generative")
    values = generator.config.to_dict()
    family = generative.family_of(generator.metadata["model"])
    loss_fn = family.loss(generator.graphdef, generative.settings_of(family, values))
    run_data = training.prepare_data(values)
    train, heldout = run_data.train, run_data.heldout
    forget_idx, retain_idx = data_splits.select_forget_retain(train.labels, classes=[digit])
    rng = np.random.default_rng(seed)
    forget = data_lib.as_batch(train, rng.choice(forget_idx, 128, replace=False))
    retain = data_lib.as_batch(train, rng.choice(retain_idx, 128, replace=False))
    held = data_lib.as_batch(heldout, np.flatnonzero(heldout.labels != digit))
    draws = jax.random.split(jax.random.key(seed + 1), (len(held["label"]), DRAWS))

    @jax.jit
    def heldout_loss(params):
        def example(image, label, keys):
            return jnp.mean(jax.vmap(lambda key: loss_fn(params, {"image": image, "label": label}, key))(keys))

        return jnp.mean(jax.vmap(example)(held["image"], held["label"], draws))

    params0 = generator.params
    base, slope = jax.value_and_grad(heldout_loss)(params0)

    def stepped(**hparams) -> Any:
        method = methods.make_method("remap_surgery", loss_fn=loss_fn, optimizer=optax.sgd(LEARNING_RATE), **hparams)
        params, _, _ = jax.jit(method.step)(params0, method.init(params0), forget, retain, jax.random.key(seed))
        return params

    forget_only = stepped(retain_weight=0.0, retain_lookahead=0.0)
    delta = jax.tree.map(jnp.subtract, forget_only, params0)
    predicted = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(slope), jax.tree.leaves(delta), strict=True))
    return {
        "latent": latent,
        "digit": digit,
        "seed": seed,
        "heldout_retain_loss": float(base),
        "forget_part_first_order": float(predicted),
        "forget_part_actual": float(heldout_loss(forget_only) - base),
        "full_step_actual": float(heldout_loss(stepped(retain_lookahead=0.0)) - base),
        "full_step_lookahead_actual": float(heldout_loss(stepped(retain_lookahead=LEARNING_RATE)) - base),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| latent | digit | seed | held-out retain -ELBO | forget part: first order | forget part: actual | full step, "
        "retain_lookahead=0 | full step, retain_lookahead=3e-3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['latent']} | {row['digit']} | {row['seed']} | {row['heldout_retain_loss']:.2f} | "
            f"{row['forget_part_first_order']:+.3f} | {row['forget_part_actual']:+.3f} | "
            f"{row['full_step_actual']:+.3f} | {row['full_step_lookahead_actual']:+.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", default="2,16")
    parser.add_argument("--digits", default="1,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="runs/curvature")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.per_class import _digits, write_outputs

    started = time.perf_counter()
    rows = [
        measure(latent, digit, seed)
        for latent in _digits(args.latents)
        for digit in _digits(args.digits)
        for seed in range(args.seeds)
    ]
    command = f"`python -m bench.curvature {' '.join(sys.argv[1:] if argv is None else argv)}`"
    text = f"Command: {command} ({time.perf_counter() - started:.0f} s)\n\n{table(rows)}\n"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out / "curvature", {"rows": rows}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
