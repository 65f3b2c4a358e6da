"""A DDPM (class-conditional U-Net, classifier-free guidance) on MNIST, with the evaluator of configs/mnist_vae.py.

``generative``: ``ddpm_unet`` with 64 channels at 28x28 and 128 at 14x14 (GroupNorm, sinusoidal time embedding,
label embedding with a null label), epsilon prediction, cosine schedule with T = 1000, 10% label dropout; Adam 5e-4,
batch 128, 200 epochs; samples in the PNG with 50 DDIM steps and guidance scale 1. The classifiers follow
``configs/mnist_vae.py`` (MLP 784-200-10: its 200 ReLU features are the classifier-FID features).

Data: the real MNIST test set (10,000 digits) with a stratified 10% holdout, from the repository root::

    python train.py --config configs/mnist_ddpm.py --workdir runs/mnist_ddpm \\
        --config.data=idx:../shared/data/mnist
    # the GPU machine carries the same files as .carry/mnist (bench/ddpm_gpu.sh)
    python train.py --config configs/mnist_ddpm.py --workdir runs/mnist_ddpm --config.data=idx:.carry/mnist

Expected runtime: about 6-8 minutes on one H100 for the 200 epochs (14,000 steps; an estimate from the model's
~1.5 GFLOP per example and step, not yet measured -- bench/ddpm_gpu.sh measures the step rate and trains as many
epochs as its time budget allows). Far too slow for the 2-core development CPU (use configs/ddpm_smoke.py there).
Expected quality: recognisable digits after a few thousand steps; the held-out epsilon MSE (one random timestep per
example) of a well-trained MNIST DDPM is about 0.02-0.04.
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """Class-conditional U-Net DDPM; classifiers and everything else as configs/mnist_vae.py."""
    config = load_config_file(pathlib.Path(__file__).with_name("mnist_vae.py"))
    config.data = "idx:../shared/data/mnist"
    config.holdout_fraction = 0.1
    config.model = "ddpm_unet"
    config.model_kwargs = ml_collections.ConfigDict(
        {"channels": 64, "channel_mults": (1, 2), "num_groups": 8, "time_embed_dim": 128}
    )
    config.diffusion_schedule = "cosine"
    config.diffusion_steps = 1000
    config.class_conditional = True
    config.class_dropout = 0.1
    config.guidance_scale = 1.0
    config.sample_steps = 50
    config.batch_size = 128
    config.num_epochs = 200
    config.learning_rate = 5e-4
    config.checkpoint_every_steps = 2000
    config.num_sample_images = 100
    return config
