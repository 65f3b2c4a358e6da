"""A convolutional VAE on the full Fashion-MNIST (60,000 training images, held-out on the 10,000 test images), with
a CNN evaluator and a CNN guidance classifier trained on disjoint halves of the training images.

The data is Debian's ``dataset-fashion-mnist`` package (``apt-get update && apt-get install dataset-fashion-mnist``),
which installs the original IDX files in ``/usr/share/datasets/fashion-mnist``; ``idx:<dir>:<prefix>`` selects the
training (``train``) or test (``t10k``) pair. Without the package, ``train.py`` stops before any work with a
one-line error naming it. Classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
7 Sneaker, 8 Bag, 9 Ankle boot.

Trains, each in its own subdirectory of the workdir:

* ``generative``: ConvVAE (``gsu_jax.models.ConvVAE``: two stride-2 conv blocks of 32 and 64 channels with
  GroupNorm, latent 16), negative ELBO, Adam 1e-3, batch 128, 20 epochs;
* ``evaluator``: CNN classifier (two conv blocks, 32 channels, a 128-unit hidden layer whose ReLU features give the
  classifier-FID), AdamW 2e-3 with cosine decay and weight decay 1e-2, +-2 px translations, 15 epochs, on half of
  the training images (stratified);
* ``guidance``: the same recipe with a different seed on the other, disjoint half.

Commands (from the repository root)::

    python train.py --config configs/fashion_convvae.py --workdir runs/fashion_convvae
    # the retrain-from-scratch oracle for forgetting trousers (class 1; generative model only)
    python train.py --config configs/fashion_convvae.py --workdir runs/fashion_convvae_oracle1 \\
        --config.exclude_classes=1 --config.roles=generative

Runtime: meant for a GPU, and not measured yet. Extrapolated from the MNIST conv VAE (17 s per epoch of 4,500
images on the 2-core development CPU), one epoch over 60,000 images takes about 4 minutes there, so the 20 epochs
take over an hour; no result of this config is in the README yet.
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def get_config() -> ml_collections.ConfigDict:
    """ConvVAE latent 16 and CNN classifiers on Fashion-MNIST (everything else as configs/mnist_vae.py)."""
    config = load_config_file(pathlib.Path(__file__).with_name("mnist_vae.py"))
    config.data = f"idx:{FASHION_MNIST}:train"
    config.eval_data = f"idx:{FASHION_MNIST}:t10k"
    config.model = "conv_vae"
    config.latent_dim = 16
    config.model_kwargs = ml_collections.ConfigDict({"channels": 32, "num_groups": 8})
    config.num_epochs = 20
    config.classifier = "cnn_classifier"
    config.classifier_kwargs = ml_collections.ConfigDict({"channels": 32, "hidden": 128})
    config.classifier_num_epochs = 15
    config.checkpoint_every_steps = 1000
    return config
