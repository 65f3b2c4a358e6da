"""Tiny unlearning run for tests: the real pipeline (training, oracle, methods, report) in a few seconds.

Command::

    python unlearn.py --config configs/unlearn_smoke.py --workdir /tmp/gsu_unlearn_smoke

Expected runtime on the 2-core development CPU: about 20-30 seconds including JAX start-up and compilation (the
models are far too small to forget anything meaningful; this checks the machinery, not the results).
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file
from gsu_jax.unlearning import default_unlearn_config


def get_config() -> ml_collections.ConfigDict:
    """Three guided methods (the recommended one first, one gated by the oracle's loss), 2 seeds, 3 steps, small samples."""
    config = default_unlearn_config()
    config.forget_classes = "1"
    config.methods = "remap_surgery,sa_gated,sa"
    config.seeds = 2
    config.threshold = "auto"
    config.monitor_samples = 256
    config.max_steps = 3
    config.continue_to_budget = True
    config.batch_size = 32
    config.retain_batch_size = 32
    config.fid_samples = 300
    config.elbo_samples = 1
    config.grid_samples = 16
    config.guidance_weight = 10.0  # exercises the guidance classifier, its independence check and +guided labels
    config.guidance_samples = 32
    config.progress = False
    train = load_config_file(pathlib.Path(__file__).with_name("smoke.py"))
    config.train = train
    return config
