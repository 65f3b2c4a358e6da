"""Unlearn digit 1 from the MNIST DDPM (configs/mnist_ddpm.py): the recommended method, the published diffusion
baselines (SalUn, Selective Amnesia) with and without gradient surgery, and the paper's ``sa`` and ``s``.

Command (from the repository root; trains what is missing -- the DDPM, the evaluator and the oracle DDPM retrained
without digit 1 -- through train.py's code into <workdir>/train)::

    python unlearn.py --config configs/unlearn_mnist_ddpm.py --workdir runs/unlearn_ddpm \\
        --config.train.data=idx:../shared/data/mnist
    # from a finished train.py workdir of configs/mnist_ddpm.py
    python unlearn.py --config configs/unlearn_mnist_ddpm.py --workdir runs/unlearn_ddpm \\
        --config.checkpoint=runs/mnist_ddpm

Protocol as for the VAE (docs/protocol.md §2): batches of 128 forget + 128 retain examples, a budget of 50 steps,
each method at its registry optimizer (``remap_surgery`` SGD 3e-3, ``salun`` / ``selective_amnesia`` Adam 1e-4 as
published) and the others at Adam 1e-3; stop at the first step whose forget fraction falls below the auto threshold (oracle + 2 binomial
standard errors). The forget fraction is monitored after every step on 512 FIXED initial noises x_T (labels i mod
10, guidance scale 1) sampled with 8 DDIM steps; FID, grids and the class-conditional protocol (samples generated
FROM label 1: the evaluator's probability of class 1 and its entropy) use 2000 samples with 25 DDIM steps.

Expected runtime on one H100: the DDPM and the oracle as configs/mnist_ddpm.py each (about 6-8 minutes), then
about 1 minute and a half of unlearning per method (50 steps with monitoring and two evaluations; measured with
sa and s), so about 10-12 minutes for the seven. bench/ddpm_gpu.sh runs this with fewer epochs, and the methods
split over two calls (DDPM_GPU_METHODS, DDPM_GPU_REUSE), so that each fits a ~9-minute GPU call.
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file
from gsu_jax.unlearning import default_unlearn_config


def get_config() -> ml_collections.ConfigDict:
    """Digit 1, seven methods, one seed, auto threshold on 512 fixed x_T with 8 DDIM steps, 50 steps."""
    config = default_unlearn_config()
    config.forget_classes = "1"
    config.methods = "remap_surgery,salun,selective_amnesia,salun_surgery,selective_amnesia_surgery,sa,s"
    # The U-Net has no decoder to restrict the surrogate to (and no encoder to cheat through): every parameter.
    # remap_surgery's other settings are the VAE's, not yet measured on the DDPM (no GPU in the sessions since).
    config.method_hparams.remap_surgery.forget_only = None
    config.seeds = 1
    config.threshold = "auto"
    config.monitor_samples = 512
    config.monitor_sample_steps = 8
    config.max_steps = 50
    config.continue_to_budget = True
    config.batch_size = 128
    config.retain_batch_size = 128
    config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
    config.guidance_weight = 0.0
    config.fid_samples = 2000
    config.fid_sample_steps = 25
    config.elbo_samples = 4
    config.grid_samples = 64
    train = load_config_file(pathlib.Path(__file__).with_name("mnist_ddpm.py"))
    train.progress_bar = False
    config.train = train
    return config
