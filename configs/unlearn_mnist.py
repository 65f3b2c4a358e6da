"""The main job: unlearn digit 1 from the protocol VAE (configs/mnist_vae.py) by gradient surgery, with the table.

Command (from the repository root; trains what is missing into <workdir>/train through train.py's code)::

    python unlearn.py --config configs/unlearn_mnist.py --workdir runs/unlearn

Common overrides (the field names are a contract)::

    --config.forget_classes=1,7          comma-separated class indices
    --config.forget=fraction:0.01        or classes:1,7 / indices:<file>: any set of training examples
    --config.methods=all                 or e.g. sa_gated,pcgrad,s,uno (see gsu_jax.methods.METHODS)
    --config.seeds=10                    seeds per method
    --config.threshold=auto              or a number in (0, 1)
    --config.monitor_samples=1024        fixed-z samples monitored every step
    --config.max_steps=50                step budget
    --config.continue_to_budget=True     keep stepping after the stop (FID at the end of the budget)
    --config.checkpoint=runs/mnist_vae   use a train.py workdir instead of training here
    --config.checkpoint=/tmp/my_vae      or an orbax checkpoint of nnx.state(<registry model>) that config.train
                                         describes (imported; README "A registry model trained elsewhere")
    --config.oracle_checkpoint=runs/mnist_vae_oracle1
    --config.train_dir=runs/cache        share trained models between workdirs
    --config.guidance_weight=30          the classifier uniformity term (rows labelled +guided; 30 is the weight
                                         measured for remap_surgery, the Adam-based methods were run at 1000)
    --config.checkpoint_every_steps=10   save each (method, seed) run's state every 10 steps and resume from it
    --config.fid_samples=5000
    --config.train.latent_dim=16         any train.py field of the models trained here

Expected runtime on the 2-core development CPU, from nothing: 6 min 38 s measured in all (training the VAE, the
evaluator and the oracle, then 6 methods x 3 seeds x 50 steps with the evaluation), under the 10-minute budget;
re-runs reuse the trained models.
"""

import pathlib

import ml_collections

from gsu_jax.config_validation import load_config_file
from gsu_jax.unlearning import default_unlearn_config


def get_config() -> ml_collections.ConfigDict:
    """Defaults of the main job: digit 1, six methods, 3 seeds, auto threshold on 1024 samples, 50 steps."""
    config = default_unlearn_config()
    config.forget_classes = "1"
    # The recommended method first (gsu_jax.methods.RECOMMENDED_METHOD), then the gradient-surgery variants worth
    # showing, and plain ascent as the collapse baseline.
    config.methods = "remap_surgery,sa_gated,pcgrad,sa,s,ascent"
    config.seeds = 3
    config.threshold = "auto"
    config.monitor_samples = 1024
    config.max_steps = 50
    config.continue_to_budget = True
    config.batch_size = 128
    config.retain_batch_size = 128
    config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
    config.guidance_weight = 0.0
    config.fid_samples = 5000
    config.checkpoint = ""
    config.oracle_checkpoint = ""
    config.train_dir = ""
    train = load_config_file(pathlib.Path(__file__).with_name("mnist_vae.py"))
    # The guidance classifier is only trained when guidance_weight > 0 (unlearning decides the roles).
    train.progress_bar = True
    config.train = train
    return config
