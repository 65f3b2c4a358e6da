"""Tiny unlearning run of a DDPM for tests: training, oracle, methods, report of the class-conditional U-Net.

Command::

    python unlearn.py --config configs/unlearn_ddpm_smoke.py --workdir /tmp/gsu_unlearn_ddpm_smoke

The models are ``configs/ddpm_smoke.py`` (tiny class-conditional DDPM, tiny MLP evaluator); seven methods (the
recommended ``remap_surgery`` with the DDPM's settings, ``sa``, the per-example ``sa_per_example`` on its jvp/vjp
route, and the published diffusion baselines ``salun`` and ``selective_amnesia`` with their surgery variants), one
seed, 2 steps, forget fraction monitored on 64 fixed
``x_T`` sampled with 2 DDIM steps, FID on 64 samples with 3 steps, ``elbo_samples=1`` fixed epsilon-loss key.

Expected runtime on the 2-core development CPU: about 1-2 minutes including JAX start-up and compilation (the
models are far too small to forget anything meaningful; this checks the machinery, not the results).
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file
from gsu_jax.unlearning import default_unlearn_config


def get_config() -> ml_collections.ConfigDict:
    """configs/ddpm_smoke.py models; seven methods, 1 seed, 2 steps, few and short samples."""
    config = default_unlearn_config()
    config.forget_classes = "1"
    # Every method with its own DDPM code path (the four baselines: +30 s over sa alone on 2 cores, cold).
    config.methods = "remap_surgery,sa,sa_per_example,salun,salun_surgery,selective_amnesia,selective_amnesia_surgery"
    config.method_hparams.remap_surgery.forget_only = None  # a U-Net has no decoder (configs/unlearn_mnist_ddpm.py)
    config.seeds = 1
    config.threshold = "auto"
    config.monitor_samples = 64  # = fid_samples: the forget-label samples share the FID chunk's compiled sampler
    config.published_monitor_samples = 16
    config.monitor_sample_steps = 2
    config.fid_sample_steps = 3
    config.max_steps = 2
    config.continue_to_budget = True
    config.batch_size = 16
    config.retain_batch_size = 16
    config.fid_samples = 64
    config.elbo_samples = 1
    config.grid_samples = 16
    config.guidance_weight = 0.0
    config.progress = False
    config.train = load_config_file(pathlib.Path(__file__).with_name("ddpm_smoke.py"))
    return config
