"""Smoke configuration of the DDPM for tests: a tiny class-conditional U-Net, two epochs, trains in seconds.

Command::

    python train.py --config configs/ddpm_smoke.py --workdir /tmp/gsu_ddpm_smoke

Everything but the generative model is ``configs/smoke.py`` (tiny MLP classifiers). The U-Net has 4 channels at one
resolution, T = 50 cosine steps, class conditioning with 10% label dropout and guidance scale 1 for the samples.

Expected runtime on the 2-core development CPU: about 15-30 seconds including JAX start-up and compilation (far too
small to draw digits; this config checks the machinery, not the results).
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """configs/smoke.py with a tiny class-conditional DDPM as the generative model."""
    config = load_config_file(pathlib.Path(__file__).with_name("smoke.py"))
    config.model = "ddpm_unet"
    config.model_kwargs = ml_collections.ConfigDict(
        {"channels": 4, "channel_mults": (1,), "num_groups": 2, "time_embed_dim": 8}
    )
    # Half the digits held out: half the training steps, and plenty of held-out forget-class examples.
    config.holdout_fraction = 0.5
    config.diffusion_schedule = "cosine"
    config.diffusion_steps = 50
    config.sample_steps = 4
    config.class_conditional = True
    config.class_dropout = 0.1
    config.guidance_scale = 1.0
    # 2 steps per epoch on the 2,500 training digits (and on the oracle's ~2,220 without digit 1).
    config.batch_size = 1000
    config.num_epochs = 2
    config.learning_rate = 2e-3
    config.num_sample_images = 16
    return config
