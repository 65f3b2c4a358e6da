"""Unlearn trousers (class 1) from the Fashion-MNIST conv VAE (configs/fashion_convvae.py), with the table.

Command (from the repository root; trains what is missing into <workdir>/train through train.py's code, which on
a CPU takes hours: run it on a GPU, or point --config.checkpoint / --config.oracle_checkpoint at trained
workdirs)::

    python unlearn.py --config configs/unlearn_fashion.py --workdir runs/unlearn_fashion

It needs Debian's dataset-fashion-mnist package (``apt-get update && apt-get install dataset-fashion-mnist``).
Every other field, and every override, is the main job's (configs/unlearn_mnist.py): 128 + 128 per step, budget 50,
auto threshold on 1,024 fixed z, the recommended method first. No result of this config is in the README yet.
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """The main job's protocol on Fashion-MNIST: forget trousers."""
    config = load_config_file(pathlib.Path(__file__).with_name("unlearn_mnist.py"))
    config.forget_classes = "1"
    train = load_config_file(pathlib.Path(__file__).with_name("fashion_convvae.py"))
    train.progress_bar = True
    config.train = train
    return config
