"""Training of the generative model, the evaluator and the guidance classifier: resumable, checkpointed, exact.

``train_and_evaluate(config, workdir)`` trains each *role* named by ``config.roles`` in its own subdirectory of the
workdir, evaluates it on held-out data, and returns the metrics. ``load_trained(workdir, role)`` loads one role for
the unlearning side.

Roles and their data (``config.exclude`` / ``config.exclude_classes`` only ever change the generative role):

=============  ======================================================  =============================================
role           trains                                                  on
=============  ======================================================  =============================================
``generative`` ``config.model`` (VAE or DDPM), Adam, the family's      the training data, minus ``exclude_classes``
               loss (negative ELBO / epsilon MSE)
``evaluator``  ``config.classifier``, AdamW + cosine, cross-entropy,   ``evaluator_fraction`` of each class of the
               random translations                                     training data (or ``config.evaluator_data``)
``guidance``   same recipe, different seed                             the rest of the training data (all of it when
                                                                       ``evaluator_data`` is given)
=============  ======================================================  =============================================

*Training data* is all of ``config.data`` when ``config.eval_data`` names held-out data (e.g. the real MNIST test
set, ``idx:../shared/data/mnist``), else ``config.data`` minus a seeded stratified holdout of
``holdout_fraction`` of each class, which is then the held-out data. The evaluator and the guidance classifier are
separate models from separate runs: different keys (each role folds its index into the seed) and disjoint
training examples, so that the classifier that scores an unlearning run has never seen the data or the
randomness of the one that may guide it (issue 4, "evaluation integrity").

Exactness and resumption: every epoch is ONE jitted ``lax.scan`` over the shuffled batches (the last partial
batch dropped; it differs every epoch), compiled once per role with the parameter and optimizer buffers donated
(on CPU the convolutional models run the same jitted step once per batch instead; see :func:`make_train_epoch`).
Compiled programs are cached per model/hyperparameter/shape, so the evaluator and the guidance classifier, and
repeated runs in one process, share them. An epoch's data order and all its keys are derived from
``(seed, role, epoch)`` alone, so a run interrupted after any checkpoint and re-run with the same workdir continues
with exactly the batches and keys the uninterrupted run would have used and ends with bit-identical parameters (on
the same device and software). Checkpoints are taken at epoch ends: the first epoch end crossing each multiple of
``checkpoint_every_steps`` steps, and the last.

Devices: ``config.mesh`` runs the epochs on a :mod:`gsu_jax.parallel` mesh (batches split over the ``data``
devices, parameters and optimizer state replicated or split over ``model``; the same parameters as one device up
to float32 summation order); ``config.distributed`` joins several hosts first. Checkpoints restore onto whatever
mesh the resuming run has; evaluation runs on each process's own copy of the parameters, and only process 0
writes metrics, history, PNGs and the summary. The default mesh (one device) runs the single-device programs.

Non-finite steps: the optimizer is wrapped in ``optax.apply_if_finite``, so a step whose gradient is not finite is
skipped (and counted in the metrics); a run that ends an epoch with its last :data:`MAX_CONSECUTIVE_NONFINITE`
steps (or its whole epoch, if shorter) all skipped stops with :class:`TrainingDivergedError` before writing
anything of that epoch.

Workdir layout (the JSON, CSV and PNG files written atomically by :mod:`gsu_jax.io`: a run killed while writing
leaves the previous complete file or none)::

    <workdir>/
      summary.json                    metrics of every role trained by the last run, with wall times
      <role>/checkpoints/<step>/      orbax steps: params, opt_state, metadata (config, data fingerprints, ...)
      <role>/metrics.json             held-out metrics of the final model
      <role>/history.csv              epoch, step, mean training loss, skipped (non-finite) steps
      generative/samples.png          samples from z ~ N(0, I) and reconstructions of held-out images (VAE), or
                                      DDIM samples from x_T ~ N(0, I) with config.sample_steps steps (DDPM)

Generative families (:mod:`gsu_jax.generative`): ``config.model`` picks the family -- a VAE (``mlp_vae``,
``conv_vae``: negative ELBO, metrics ``heldout_neg_elbo`` and its terms) or the DDPM (``ddpm_unet``: epsilon loss at
one random timestep per example, metric ``heldout_eps_loss``; ``diffusion_schedule``, ``diffusion_steps``,
``class_conditional``, ``class_dropout``; samples with ``sample_steps`` DDIM steps and ``guidance_scale``). Each
family reads only its own fields; the other family's fields are left out of the checkpoint identity.

Modules, each importing only those above it (this package re-exports the public names)::

    run_data            RunData, prepare_data: the examples of each role and the held-out data
    epoch               make_train_epoch, random_translate: one jitted epoch (lax.scan or step by step)
    programs            ProgramSpec, compiled_programs: a role's jitted programs and optimizer, cached per spec
    plan                RolePlan, plan_role: a role's spec, data, key streams and checkpoint identity
    role_checkpoints    what a role's checkpoints allow: same run?, restore_fallback, restore targets on a mesh
    evaluation          held-out metrics of a trained role, samples.png
    role                train_role: restore or start, the epochs (divergence, checkpoints), evaluate and write
    loading             TrainedModel, load_trained: a finished role for the unlearning side
    run                 train_and_evaluate, check_resumable: every refusal first, then each role in turn

Example:
    >>> from gsu_jax.config_validation import default_train_config
    >>> config = default_train_config()
    >>> config.num_epochs, config.classifier_num_epochs = 1, 1
    >>> metrics = train_and_evaluate(config, "/tmp/gsu_demo")  # doctest: +SKIP
    >>> evaluator = load_trained("/tmp/gsu_demo", "evaluator")  # doctest: +SKIP
"""

from __future__ import annotations

# The errors train_and_evaluate and load_trained raise stay importable from here, as before the split (callers
# catch training.CheckpointNotFoundError and the like); "X as X" marks them as re-exports outside __all__.
from gsu_jax.checkpointing import CheckpointCorruptError as CheckpointCorruptError
from gsu_jax.checkpointing import CheckpointMismatchError as CheckpointMismatchError
from gsu_jax.checkpointing import CheckpointNotFoundError as CheckpointNotFoundError
from gsu_jax.checkpointing import WorkdirError as WorkdirError
from gsu_jax.schema import ConfigError as ConfigError
from gsu_jax.training.epoch import make_train_epoch, random_translate
from gsu_jax.training.loading import TrainedModel, load_trained
from gsu_jax.training.role import MAX_CONSECUTIVE_NONFINITE, TrainingDivergedError
from gsu_jax.training.run import check_resumable, train_and_evaluate
from gsu_jax.training.run_data import RunData, prepare_data

__all__ = [
    "MAX_CONSECUTIVE_NONFINITE",
    "RunData",
    "TrainedModel",
    "TrainingDivergedError",
    "check_resumable",
    "load_trained",
    "make_train_epoch",
    "prepare_data",
    "random_translate",
    "train_and_evaluate",
]
