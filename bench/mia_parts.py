"""Where the membership signal lives: the MIA AUC of each part of the -ELBO, before and after unlearning.

``python -m bench.mia_parts --run runs/per_class_current [--latents 16] [--digits 0-9] [--method remap_surgery]``

The protocol's membership-inference attack thresholds each example's negative ELBO, ``reconstruction + KL``
(:func:`gsu_jax.metrics.membership_inference_auc`: forget training examples against held-out examples of the forget
class). This diagnostic scores the two terms apart, for the cached original and oracle of ``bench.per_class`` and for
the unlearned parameters a ``bench.per_class`` run saved at the stop (``<run>/latent<L>/digit<d>/unlearned/
<method>/seed_<s>``: seed 0 only, ``unlearn.py``'s default ``save_params='first_seed'``; the AUC is averaged over
the seeds found), with one reparameterisation draw per example (a fixed
key, so the total's AUC is close to but not the report's, which averages ``elbo_samples`` draws). It also prints the
mean reconstruction term of the forget training and held-out examples. Scoring only: no method reads its output.

Writes ``<run>/mia_parts.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any

from bench.per_class import ROOT, _digits, train_models, write_outputs

PARTS = ("total", "reconstruction", "kl")


def _auc_by_part(batch_terms: Any, params: Any, forget_images: Any, heldout_images: Any) -> dict[str, float]:
    """AUC of each part (forget training vs held-out) and the mean reconstruction of each side."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gsu_jax import metrics

    def parts(images: Any) -> tuple[Any, Any]:
        keys = jax.random.split(jax.random.key(0), images.shape[0])
        terms = batch_terms(params, jnp.asarray(images), keys)
        return np.asarray(terms.reconstruction, np.float64), np.asarray(terms.kl, np.float64)

    (rec_f, kl_f), (rec_h, kl_h) = parts(forget_images), parts(heldout_images)
    return {
        "total": metrics.membership_inference_auc(rec_f + kl_f, rec_h + kl_h),
        "reconstruction": metrics.membership_inference_auc(rec_f, rec_h),
        "kl": metrics.membership_inference_auc(kl_f, kl_h),
        "reconstruction_forget_train": float(rec_f.mean()),
        "reconstruction_heldout_forget": float(rec_h.mean()),
    }


def mia_parts(run: pathlib.Path, latent: int, digits: list[int], method: str) -> list[dict[str, Any]]:
    """One row per (digit, model): the original, the oracle and the unlearned model (mean over the saved seeds)."""
    import jax
    import numpy as np

    from gsu_jax import checkpointing, losses
    from gsu_jax.config_validation import load_config_file
    from gsu_jax.training.loading import load_trained
    from gsu_jax.training.run_data import prepare_data

    model_dir, oracles = train_models(latent, digits)
    config = load_config_file(ROOT / "configs" / "mnist_vae.py")
    config.latent_dim = latent
    data = prepare_data(config)
    original = load_trained(model_dir, "generative")
    terms_fn = losses.elbo_terms(original.graphdef)
    # One compiled program for every model (the parameters are an argument, not a constant).
    batch_terms = jax.jit(jax.vmap(lambda params, x, k: terms_fn(params, {"image": x}, k), in_axes=(None, 0, 0)))
    rows = []
    for digit in digits:
        forget = data.train.images[data.train.labels == digit]
        heldout = data.heldout.images[data.heldout.labels == digit]
        models = {"original": [original.params], "oracle": [load_trained(oracles[digit], "generative").params]}
        unlearned = []
        for seed_dir in sorted((run / f"latent{latent}" / f"digit{digit}" / "unlearned" / method).glob("seed_*")):
            with checkpointing.Checkpointer(seed_dir, max_to_keep=1) as ckpt:
                params, _, _ = ckpt.restore(abstract_params=checkpointing.abstract_like(original.params))
            unlearned.append(params)
        if unlearned:
            models[method] = unlearned
        for name, param_list in models.items():
            scores = [_auc_by_part(batch_terms, params, forget, heldout) for params in param_list]
            row = {"latent": latent, "digit": digit, "model": name, "seeds": len(scores)}
            row.update({key: float(np.mean([s[key] for s in scores])) for key in scores[0]})
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=pathlib.Path, required=True, help="a bench.per_class --out directory")
    parser.add_argument("--latents", default="16")
    parser.add_argument("--digits", type=_digits, default=list(range(10)))
    parser.add_argument("--method", default="remap_surgery")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [row for latent in _digits(args.latents) for row in mia_parts(args.run, latent, args.digits, args.method)]
    header = "| latent | digit | model | MIA AUC: -ELBO | reconstruction only | KL only | reconstruction: forget train / held-out forget |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['latent']} | {row['digit']} | {row['model']} | {row['total']:.3f} | {row['reconstruction']:.3f} | "
            f"{row['kl']:.3f} | {row['reconstruction_forget_train']:.1f} / {row['reconstruction_heldout_forget']:.1f} |"
        )
    seconds = time.perf_counter() - start
    command = " ".join(["python -m bench.mia_parts", *(sys.argv[1:] if argv is None else argv)])
    text = f"Command: `{command}` ({math.ceil(seconds)} s)\n\n" + "\n".join(lines) + "\n"
    payload = {"args": {**vars(args), "run": str(args.run)}, "rows": rows}
    write_outputs(args.run / "mia_parts", payload, text)


if __name__ == "__main__":
    main()
