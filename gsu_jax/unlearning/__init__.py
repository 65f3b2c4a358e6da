r"""The main job: unlearn forget classes from a trained VAE or DDPM with every requested method, evaluate, report.

``unlearn_and_evaluate(config, workdir) -> report`` (``unlearn.py`` is its command line). Two phases:

1. :func:`plan_run` validates *everything* before any work and writes nothing (refusals are
   :class:`UnlearnConfigError`, one line naming the value and what is allowed);
2. :func:`execute` trains what is missing through the same code as ``train.py``, runs every (method, seed),
   evaluates and writes the report.

One module per concern, each importing only those listed before it:

* :mod:`~gsu_jax.unlearning.errors`: the errors; :mod:`~gsu_jax.unlearning.config`: the schema, the defaults and
  the parsing of each field; :mod:`~gsu_jax.unlearning.keys`: the random streams;
* :mod:`~gsu_jax.unlearning.results`: the saved (method, seed) results that make a run resumable;
* :mod:`~gsu_jax.unlearning.plan`: :func:`plan_run`, the models (which, where, trained when missing);
* :mod:`~gsu_jax.unlearning.evaluation`: the monitor, the evaluation of a model, the references and thresholds;
* :mod:`~gsu_jax.unlearning.loop`: the run of one method over the seeds, the steps and the stopping rules;
* :mod:`~gsu_jax.unlearning.report`: :func:`execute`, the report's assembly and :func:`format_summary`.

Example:
    >>> import ml_collections
    >>> from gsu_jax.unlearning import unlearn_and_evaluate
    >>> config = ...  # configs/unlearn_smoke.py get_config()  # doctest: +SKIP
    >>> report = unlearn_and_evaluate(config, "/tmp/unlearn_demo")  # doctest: +SKIP
    >>> sorted(report["methods"])  # doctest: +SKIP
"""

from gsu_jax.unlearning.config import OPTIMIZERS, UNLEARN_SCHEMA, build_optimizer, default_unlearn_config
from gsu_jax.unlearning.errors import SavedResultError, UnlearnConfigError, UnlearningDivergedError
from gsu_jax.unlearning.evaluation import check_classifier_independence
from gsu_jax.unlearning.keys import monitoring_latents, monitoring_noise, seed_step_keys, stream_key
from gsu_jax.unlearning.loop import MAX_CONSECUTIVE_NONFINITE
from gsu_jax.unlearning.plan import RunPlan, plan_run
from gsu_jax.unlearning.report import execute, format_summary, unlearn_and_evaluate

__all__ = [
    "MAX_CONSECUTIVE_NONFINITE",
    "OPTIMIZERS",
    "UNLEARN_SCHEMA",
    "RunPlan",
    "SavedResultError",
    "UnlearnConfigError",
    "UnlearningDivergedError",
    "build_optimizer",
    "check_classifier_independence",
    "default_unlearn_config",
    "execute",
    "format_summary",
    "monitoring_latents",
    "monitoring_noise",
    "plan_run",
    "seed_step_keys",
    "stream_key",
    "unlearn_and_evaluate",
]
