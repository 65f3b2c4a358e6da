"""Smoke configuration for tests: tiny models, three epochs each, the whole run in a few seconds.

Command::

    python train.py --config configs/smoke.py --workdir /tmp/gsu_smoke

Expected runtime on the 2-core development CPU: about 5-10 seconds including JAX start-up and compilation (the
models are far too small to produce good samples; this config checks the machinery, not the results).
"""

import ml_collections

from gsu_jax.config_validation import default_train_config


def get_config() -> ml_collections.ConfigDict:
    """Tiny models on the embedded digits (10% held out); every role; no progress bar."""
    config = default_train_config()
    config.seed = 0
    config.data = "embedded"
    config.holdout_fraction = 0.1

    config.model = "mlp_vae"
    config.latent_dim = 2
    config.model_kwargs = ml_collections.ConfigDict({"hidden": 16})
    config.batch_size = 250
    config.num_epochs = 3

    config.classifier = "mlp_classifier"
    config.classifier_kwargs = ml_collections.ConfigDict({"hidden": 16})
    config.classifier_batch_size = 250
    config.classifier_num_epochs = 3

    config.roles = "generative,evaluator,guidance"
    config.checkpoint_every_steps = 1  # every epoch: tests interrupt and resume between any two epochs
    config.max_to_keep = 3
    config.num_sample_images = 16
    config.progress_bar = False
    return config
