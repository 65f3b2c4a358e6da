"""A convolutional VAE on the embedded digits, with the same evaluator and guidance classifier as mnist_vae.

``generative``: ConvVAE (two stride-2 conv blocks of 32 and 64 channels with GroupNorm, latent 16; see
``gsu_jax.models.ConvVAE``), negative ELBO, Adam 1e-3, batch 128, 10 epochs. The classifiers follow
``configs/mnist_vae.py`` (same seed, same data: the same evaluator and guidance classifier).

Commands (from the repository root)::

    python train.py --config configs/mnist_convvae.py --workdir runs/mnist_convvae \\
        --config.eval_data=idx:../shared/data/mnist
    # only the VAE (reuse the classifiers of runs/mnist_vae)
    python train.py --config configs/mnist_convvae.py --workdir runs/mnist_convvae --config.roles=generative

Expected runtime on the 2-core development CPU: about 3.5 minutes for the VAE (measured 3 min 18 s wall with
the machine shared: 17 s per epoch; convolutions dominate, and on CPU each step is dispatched on its own because
XLA:CPU runs convolution gradients inside a scanned loop ~25x slower), plus about 20 s for the two classifiers.
Much faster on a GPU.

Measured (seed 0, eval_data = the MNIST test set): held-out -ELBO 122.1 (reconstruction 99.3 + KL 22.8);
reconstructions are sharp, but after 10 epochs samples from the prior are mostly not yet digit-like -- train
longer (``--config.num_epochs=50``, on a GPU) when samples matter.
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """ConvVAE latent 16 plus the protocol classifiers (everything else as configs/mnist_vae.py)."""
    config = load_config_file(pathlib.Path(__file__).with_name("mnist_vae.py"))
    config.model = "conv_vae"
    config.latent_dim = 16
    config.model_kwargs = ml_collections.ConfigDict({"channels": 32, "num_groups": 8})
    config.num_epochs = 10
    config.checkpoint_every_steps = 500
    return config
