r"""Evaluating generators: the compiled per-step monitor and the full evaluation of a model (:class:`Evaluation`),
the reference models' evaluation and the threshold and ``sa_gated`` target taken from it
(:func:`evaluate_references`), and the independence of the two classifiers.

**Evaluation integrity.** The evaluator scores every run (forget fraction, FID, inception score) and is never
passed to a method: a method's step closes over the loss and, for ``guidance_weight > 0``, the *guidance*
classifier only. :func:`check_classifier_independence` refuses to run when the two classifiers are the same
object, have the same parameters, the same role, the same training examples or were not trained as separate
runs. Every guided result is labelled ``<method>+guided`` in every table and file name.

**Evaluation** of a model (original, oracle, each method at the stop and at the end of the budget): forget
fraction on the monitoring z; classifier-FID (evaluator features) of ``fid_samples`` samples against the retained
training images and against all training images; inception score; mean held-out negative ELBO on retained and on
forget classes, and on the forget training examples; membership-inference AUC of the loss attack, forget
training examples (members) against held-out examples of the same classes. Losses average ``elbo_samples``
reparameterisation draws per example with fixed keys, identical for every model.

**DDPMs** (:mod:`gsu_jax.generative`, ``config.train.model = "ddpm_unet"``): the same evaluation, with the family's
loss (epsilon MSE at one random timestep, averaged over ``elbo_samples`` fixed keys; report keys ``eps_loss_*``
where a VAE's are ``nelbo_*``), fixed initial noises ``x_T`` instead of ``z`` (streams ``monitor``/``fid`` of
:mod:`gsu_jax.unlearning.keys`) and a few-step DDIM sampler: ``monitor_sample_steps`` steps for the per-step
monitoring, ``fid_sample_steps`` for the FID, the grids and the class-conditional protocol. A class-conditional
DDPM is sampled with labels ``i mod K`` and the train config's ``guidance_scale``; its evaluation adds samples
generated FROM the forget label(s) (SalUn, Selective Amnesia): ``forget_label_class_prob`` (the evaluator's
probability of that label), ``forget_label_accuracy`` and ``forget_label_entropy``. The guidance add-on
(``guidance_weight > 0``) is VAE-only and refused for a DDPM.

**Thresholds.** ``threshold="auto"``: the oracle's forget fraction on the same fixed z plus two binomial standard
errors (:func:`gsu_jax.metrics.auto_threshold`), on ``monitor_samples`` (1024) samples. The published setting
(``published_threshold`` 0.02 on ``published_monitor_samples`` 128 samples) is evaluated on the *first 128 of the
same monitoring samples* in the same runs (a second stopping rule read off the same trajectory; with
``continue_to_budget=False`` a run ends at the main rule's stop, so the published stop is only seen if it came
first).

**Forget sets of examples** (``config.forget='fraction:...'`` or ``'indices:...'``, :attr:`RunPlan.example_forget
<gsu_jax.unlearning.plan.RunPlan.example_forget>`): the forget fraction of generated samples means nothing when
the forgotten examples are scattered over every class, so the per-step monitor is the **loss gap** instead
(:func:`gsu_jax.metrics.loss_gap`): the mean over the forget training examples of each one's loss minus the
held-out mean of its own class (class-matched: the loss differs far more between classes than between seen and
unseen examples, so an unmatched gap on a few dozen examples measures mostly the draw's class mix), the held-out
examples being the *whole held-out split* (matching by class makes any forget set, even an ``indices`` file of
one class, comparable with unseen examples of its own classes). The evaluation reports the gap, its standard
error, both means, the membership-inference AUC forget-training vs the whole held-out split (the plain loss
attack, not class-matched), FID and inception score as for classes (FID retain against the retained
training examples). The stop (``threshold='auto'``, the only one allowed) is the first update count whose gap has
risen to the oracle's gap - 2 of its standard errors, the low end of :func:`gsu_jax.metrics.loss_gap_band`
(one-sided, :func:`gsu_jax.metrics.reached_stop`); there is no published rule for examples.

**``sa_gated``** needs ``forget_loss_target``: by default (``gated_target="oracle"``) the oracle's mean negative
ELBO on the forget *training* examples, i.e. the level a model that never saw them reaches -- this uses the
oracle, a reference model the user must have trained. Without an oracle, ``gated_target="heldout"`` uses the
original model's mean negative ELBO on *held-out* examples of the forget classes (examples it never trained on: the
same "unseen" level, estimated from the model itself); ``gated_target`` may also be a number.
``gated_target_scale`` moves the target along the gap from the original model's own loss on the forget examples
``L_orig`` to that reference ``L_ref``: ``L_orig + scale * (L_ref - L_orig)`` (2 = as far beyond the reference as the
original is below it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsu_jax import checkpointing, metrics, models, training
from gsu_jax import generative as families
from gsu_jax.unlearning.config import GATED_TARGETS
from gsu_jax.unlearning.keys import monitoring_noise, stream_key
from gsu_jax.unlearning.plan import RunPlan

__all__ = [
    "Evaluation",
    "References",
    "check_classifier_independence",
    "evaluate_references",
    "gated_target",
    "generative_record",
]

# Generated images per compiled FID call (bounds activation memory for the convolutional models). Not only a memory
# bound: a VAE's FID latents are drawn padded to a multiple of it (another size draws other z, other FIDs), and XLA
# picks kernels per batch shape (another size changes the features' last float32 bits). gsu_jax.training's
# held-out evaluation keeps its own 500 for the same reason.
_FID_CHUNK = 1000
# Real training images per compiled feature-extraction call (FID reference statistics); 1000 as always, for the
# same reason: features of another chunk shape differ in their last bits.
_REAL_FEATURES_CHUNK = 1000
# Built once at import: one compiled feature extractor per (graphdef, chunk shape), whatever the caller.
_classifier_features = jax.jit(models.classifier_features, static_argnums=0)


# ------------------------------------------------------------------------------------------- integrity


def check_classifier_independence(evaluator: training.TrainedModel, guidance: training.TrainedModel) -> dict:
    """Refuses an evaluator and a guidance classifier that are not distinct models from distinct runs.

    Checks: distinct parameter objects, different parameter digests, roles ``evaluator`` / ``guidance``,
    different training examples (training-data fingerprints) and different training keys (the role folds into
    the seed, so the same ``seed`` still gives different keys; identical role and seed would not).

    Returns:
        The evidence recorded in the report (digests, fingerprints, roles, seeds).

    Raises:
        RuntimeError: any check fails.
    """
    evidence = {
        "evaluator": {
            "role": evaluator.metadata.get("role"),
            "seed": evaluator.metadata.get("seed"),
            "params_digest": evaluator.metadata.get("params_digest"),
            "train_fingerprint": evaluator.metadata.get("train_fingerprint"),
            "num_train": evaluator.metadata.get("num_train"),
        },
        "guidance": {
            "role": guidance.metadata.get("role"),
            "seed": guidance.metadata.get("seed"),
            "params_digest": guidance.metadata.get("params_digest"),
            "train_fingerprint": guidance.metadata.get("train_fingerprint"),
            "num_train": guidance.metadata.get("num_train"),
        },
    }
    problems = []
    if evaluator.params is guidance.params:
        problems.append("they are the same parameter object")
    if checkpointing.state_digest(evaluator.params) == checkpointing.state_digest(guidance.params):
        problems.append("their parameters are identical")
    if (evidence["evaluator"]["role"], evidence["guidance"]["role"]) != ("evaluator", "guidance"):
        problems.append(f"roles are {evidence['evaluator']['role']!r}/{evidence['guidance']['role']!r}")
    if evidence["evaluator"]["train_fingerprint"] == evidence["guidance"]["train_fingerprint"]:
        problems.append("they were trained on the same examples")
    if problems:
        raise RuntimeError("the evaluator and the guidance classifier are not independent: " + "; ".join(problems))
    return evidence


# ------------------------------------------------------------------------------------------- evaluation


class Evaluation:
    """Compiled evaluation of generators by the evaluator on fixed noises and fixed per-example keys.

    Family-generic (:mod:`gsu_jax.generative`): a VAE decodes its fixed ``z`` once; a DDPM denoises its fixed
    ``x_T`` with ``monitor_sample_steps`` DDIM steps for the per-step monitoring and ``fid_sample_steps`` for the
    FID, the grids and the class-conditional protocol. A class-conditional DDPM is sampled with the fixed labels
    ``i mod K`` (sample ``i``) and the train config's guidance scale; on top, samples generated FROM the forget
    label(s) (cycled over the same monitoring noises) are scored as in SalUn / Selective Amnesia: the evaluator's
    probability of the label, its accuracy and the entropy of its prediction.
    """

    def __init__(self, plan: RunPlan, generator: training.TrainedModel, evaluator: training.TrainedModel):
        config = plan.config
        self.gen_graphdef = generator.graphdef
        self.eval_graphdef = evaluator.graphdef
        self.eval_params = evaluator.params
        family = families.family_of(generator.metadata["model"])
        model_kwargs = dict(generator.metadata["model_kwargs"])
        settings = families.settings_of(family, config["train"])
        self.family = family
        self.loss_prefix = family.report_prefix
        self.conditional = family.is_conditional(model_kwargs)
        num_classes = int(model_kwargs.get("num_classes", 0) or 0)
        self.example_forget = plan.example_forget
        self._draw_fixed_noises(config, family.noise_shape(model_kwargs), num_classes, plan.forget_classes)
        self._compile(config, settings, plan.forget_classes)
        self._gather_loss_examples(plan)

        # Real-data feature statistics, once: retained training images and all training images.
        features_all = self._features(jnp.asarray(plan.run_data.train.images))
        self.real_all = metrics.feature_statistics(features_all)
        self.real_retain = metrics.feature_statistics(features_all[plan.retain_idx])

    def _draw_fixed_noises(
        self, config: Mapping[str, Any], noise_shape: Sequence[int], num_classes: int, forget_classes: Sequence[int]
    ) -> None:
        """The monitoring and FID noises (and, for a class-conditional model, their labels and the forget labels)."""
        self.num_monitor = config["monitor_samples"]
        self.num_published = config["published_monitor_samples"]
        self.z_monitor = monitoring_noise(max(self.num_monitor, self.num_published), noise_shape)
        num_fid = config["fid_samples"]
        # The VAE keeps the padded draw of its earlier reports (same z, same numbers); a DDPM pays per sample.
        chunk = _FID_CHUNK if self.family.name == "vae" else min(_FID_CHUNK, num_fid)
        padded = chunk * math.ceil(num_fid / chunk)
        self.num_fid = num_fid
        self.z_fid = jax.random.normal(stream_key("fid"), (padded, *noise_shape)).reshape(-1, chunk, *noise_shape)

        def cycled(count: int, classes: Sequence[int]) -> jax.Array | None:
            if not self.conditional or len(classes) == 0:
                return None
            return jnp.asarray(np.resize(np.asarray(classes, np.int32), count))

        self.monitor_labels = cycled(self.z_monitor.shape[0], range(num_classes))
        self.fid_labels = None if not self.conditional else cycled(padded, range(num_classes)).reshape(-1, chunk)
        self.forget_labels = cycled(self.num_monitor, forget_classes)

    def _compile(self, config: Mapping[str, Any], settings: Any, forget_classes: Sequence[int]) -> None:
        """The jitted monitor, sampler-and-classifier, per-example losses and grid sampler of this generator."""
        family = self.family
        monitor_generate = family.generator(self.gen_graphdef, settings, num_steps=config["monitor_sample_steps"])
        final_generate = family.generator(self.gen_graphdef, settings, num_steps=config["fid_sample_steps"])
        forget = jnp.asarray(forget_classes, jnp.int32)
        gen_graphdef, eval_graphdef = self.gen_graphdef, self.eval_graphdef
        num_monitor, num_published = self.num_monitor, self.num_published

        @jax.jit
        def monitor(gen_params, eval_params, z, labels):
            images = monitor_generate(gen_params, z, labels)
            logits = models.classifier_logits(eval_graphdef, eval_params, images)
            return (
                metrics.forget_fraction_from_logits(logits[:num_monitor], forget),
                metrics.forget_fraction_from_logits(logits[:num_published], forget),
            )

        @jax.jit
        def sample_outputs(gen_params, eval_params, z, labels):
            images = final_generate(gen_params, z, labels)
            features = models.classifier_features(eval_graphdef, eval_params, images)
            logits = models.classifier_logits(eval_graphdef, eval_params, images)
            return features, jax.nn.softmax(logits)

        loss_fn = family.loss(gen_graphdef, settings)

        @jax.jit
        def example_losses(gen_params, images, labels, keys):
            def one(inputs):
                image, label, example_keys = inputs
                draws = jax.vmap(lambda key: loss_fn(gen_params, {"image": image, "label": label}, key))(example_keys)
                return jnp.mean(draws)

            return jax.lax.map(one, (images, labels, keys), batch_size=256)

        self._monitor, self._sample_outputs, self._example_losses = monitor, sample_outputs, example_losses
        self._grid = jax.jit(final_generate)
        self.loss_fn = loss_fn

    def _gather_loss_examples(self, plan: RunPlan) -> None:
        """The examples whose losses are read (forget training, held-out forget, held-out retained; for a forget
        set of examples: forget training, the whole held-out split) and their keys."""
        config = plan.config
        run_data = plan.run_data
        train = run_data.train
        if plan.example_forget:
            images = np.concatenate([train.images[plan.forget_idx], run_data.heldout.images])
            labels = np.concatenate([train.labels[plan.forget_idx], run_data.heldout.labels])
            self._loss_images, self._loss_labels = jnp.asarray(images), jnp.asarray(labels)
            self._splits = np.asarray([plan.forget_idx.size])
            # For the class-matched loss gap: each forget example against the held-out examples of its class.
            self._gap_labels = {
                "forget_labels": train.labels[plan.forget_idx],
                "heldout_labels": run_data.heldout.labels,
            }
            self._loss_keys = jax.random.split(stream_key("elbo"), (images.shape[0], config["elbo_samples"]))
            return
        heldout_forget = np.flatnonzero(np.isin(run_data.heldout.labels, plan.forget_classes))
        heldout_retain = np.flatnonzero(~np.isin(run_data.heldout.labels, plan.forget_classes))
        if heldout_forget.size == 0 or heldout_retain.size == 0:
            raise RuntimeError(
                "the held-out data has no examples of the forget classes or none of the retained "
                "ones; membership inference and held-out losses need both (raise holdout_fraction)"
            )
        # One array of every example whose loss is read: forget training (members), held-out forget (non-members),
        # held-out retained; one compiled call evaluates all of them.
        images = np.concatenate(
            [
                train.images[plan.forget_idx],
                run_data.heldout.images[heldout_forget],
                run_data.heldout.images[heldout_retain],
            ]
        )
        labels = np.concatenate(
            [
                train.labels[plan.forget_idx],
                run_data.heldout.labels[heldout_forget],
                run_data.heldout.labels[heldout_retain],
            ]
        )
        self._loss_images, self._loss_labels = jnp.asarray(images), jnp.asarray(labels)
        self._splits = np.cumsum([plan.forget_idx.size, heldout_forget.size])
        self._loss_keys = jax.random.split(stream_key("elbo"), (images.shape[0], config["elbo_samples"]))

    def _features(self, images: jax.Array) -> np.ndarray:
        chunks = [
            np.asarray(_classifier_features(self.eval_graphdef, self.eval_params, images[i : i + _REAL_FEATURES_CHUNK]))
            for i in range(0, images.shape[0], _REAL_FEATURES_CHUNK)
        ]
        return np.concatenate(chunks).astype(np.float64)

    @property
    def monitor_keys(self) -> tuple[str, str | None]:
        """The names of :meth:`monitor`'s two values in the log rows (``None``: no published rule)."""
        return ("loss_gap", None) if self.example_forget else ("forget_fraction", "forget_fraction_published")

    def monitor(self, gen_params) -> tuple[float, float]:
        """``(forget fraction on monitor_samples, on the published_monitor_samples)`` of the fixed noises; for a
        forget set of examples ``(loss gap, nan)`` (no published rule)."""
        if self.example_forget:
            return self._gap(*self.example_losses(gen_params))[0], math.nan
        main, published = self._monitor(gen_params, self.eval_params, self.z_monitor, self.monitor_labels)
        return float(main), float(published)

    def grid(self, gen_params, count: int) -> np.ndarray:
        labels = None if self.monitor_labels is None else self.monitor_labels[:count]
        return np.asarray(self._grid(gen_params, self.z_monitor[:count], labels))

    def example_losses(self, gen_params) -> tuple[np.ndarray, ...]:
        """Per-example family loss: (forget training, held-out forget, held-out retained); for a forget set of
        examples (forget training, the whole held-out split)."""
        values = np.asarray(
            self._example_losses(gen_params, self._loss_images, self._loss_labels, self._loss_keys), np.float64
        )
        return tuple(np.split(values, self._splits))

    def _forget_label_protocol(self, gen_params) -> dict[str, float]:
        """Samples generated FROM the forget label(s): the evaluator's probability of that label, its accuracy
        (the complement of SalUn's unlearning accuracy) and the mean entropy of its prediction (nats)."""
        z = self.z_monitor[: self.num_monitor]
        _, probs = self._sample_outputs(gen_params, self.eval_params, z, self.forget_labels)
        probs = np.asarray(probs, np.float64)
        labels = np.asarray(self.forget_labels)
        entropy = -np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=1)
        return {
            "forget_label_class_prob": float(probs[np.arange(labels.size), labels].mean()),
            "forget_label_accuracy": float(np.mean(np.argmax(probs, axis=1) == labels)),
            "forget_label_entropy": float(entropy.mean()),
        }

    def _gap(self, forget_train: np.ndarray, heldout: np.ndarray) -> tuple[float, float]:
        """The class-matched :func:`gsu_jax.metrics.loss_gap`, or ``(inf, nan)`` when a loss is not finite (a run
        that blew up is nowhere near the oracle's gap: no stop, no error mid-run)."""
        if not (np.isfinite(forget_train).all() and np.isfinite(heldout).all()):
            return math.inf, math.nan
        return metrics.loss_gap(forget_train, heldout, **self._gap_labels)

    def _sample_metrics(self, gen_params) -> tuple[dict[str, float], np.ndarray]:
        """FID (retained and all training data) and inception score of ``fid_samples`` samples, and their
        evaluator probabilities."""
        features, probs = [], []
        for index, chunk in enumerate(self.z_fid):
            labels = None if self.fid_labels is None else self.fid_labels[index]
            f, p = self._sample_outputs(gen_params, self.eval_params, chunk, labels)
            features.append(np.asarray(f))
            probs.append(np.asarray(p))
        features = np.concatenate(features)[: self.num_fid].astype(np.float64)
        probs = np.concatenate(probs)[: self.num_fid].astype(np.float64)
        generated = metrics.feature_statistics(features)
        quality = {
            "fid_retain": metrics.frechet_distance_from_stats(self.real_retain, generated),
            "fid_all": metrics.frechet_distance_from_stats(self.real_all, generated),
            "inception_score": metrics.inception_score(probs)[0],
        }
        return quality, probs

    def _evaluate_examples(self, gen_params) -> dict[str, float]:
        """A forget set of examples: the loss gap and its parts, MIA against the held-out split, sample quality."""
        quality, _ = self._sample_metrics(gen_params)
        forget_train, heldout = self.example_losses(gen_params)
        gap, se = self._gap(forget_train, heldout)
        prefix = self.loss_prefix
        return {
            "loss_gap": gap,
            "loss_gap_se": se,
            **quality,
            f"{prefix}_forget_train": float(forget_train.mean()),
            f"{prefix}_heldout": float(heldout.mean()),
            "mia_auc": metrics.membership_inference_auc(forget_train, heldout),
        }

    def evaluate(self, gen_params, forget_classes: Sequence[int]) -> dict[str, float]:
        """Every metric of one generator (see the module docstring)."""
        if self.example_forget:
            return self._evaluate_examples(gen_params)
        quality, probs = self._sample_metrics(gen_params)
        forget_train, heldout_forget, heldout_retain = self.example_losses(gen_params)
        main, published = self.monitor(gen_params)
        prefix = self.loss_prefix
        result = {
            "forget_fraction": main,
            "forget_fraction_published": published,
            "forget_fraction_fid_samples": metrics.forget_fraction(np.argmax(probs, axis=1), list(forget_classes)),
            **quality,
            f"{prefix}_heldout_retain": float(heldout_retain.mean()),
            f"{prefix}_heldout_forget": float(heldout_forget.mean()),
            f"{prefix}_forget_train": float(forget_train.mean()),
            "mia_auc": metrics.membership_inference_auc(forget_train, heldout_forget),
        }
        if self.conditional:
            result.update(self._forget_label_protocol(gen_params))
        return result


# ------------------------------------------------------------------------------------------- the references


class References(NamedTuple):
    """The reference models' evaluations and what every run takes from them."""

    original: dict[str, float]  # the original model's evaluation
    oracle: dict[str, float]  # the oracle's
    threshold: float | metrics.LossGapBand  # the stop (config.threshold, auto from the oracle; a band for examples)
    gated_target: float  # sa_gated's forget_loss_target

    @property
    def start_fractions(self) -> tuple[float, float]:
        """The monitored values (main, published) before any update: the original model's forget fractions, or
        its loss gap (and no published value) for a forget set of examples."""
        if "loss_gap" in self.original:
            return (self.original["loss_gap"], math.nan)
        return (self.original["forget_fraction"], self.original["forget_fraction_published"])


def evaluate_references(
    plan: RunPlan, evaluation: Evaluation, generator: training.TrainedModel, oracle: training.TrainedModel
) -> References:
    """Evaluates the original model and the oracle, and derives the threshold and ``sa_gated``'s target."""
    config = plan.config
    original_eval = evaluation.evaluate(generator.params, plan.forget_classes)
    oracle_eval = evaluation.evaluate(oracle.params, plan.forget_classes)
    if plan.example_forget:
        threshold = metrics.loss_gap_band(oracle_eval["loss_gap"], oracle_eval["loss_gap_se"])
        target = gated_target(config, original_eval, oracle_eval, evaluation.loss_prefix)
        plan.progress(
            f"original: loss gap {original_eval['loss_gap']:.3f}, FID retain {original_eval['fid_retain']:.2f}; "
            f"oracle: {oracle_eval['loss_gap']:.3f} +- {oracle_eval['loss_gap_se']:.3f}, "
            f"{oracle_eval['fid_retain']:.2f}; stop band [{threshold.low:.3f}, {threshold.high:.3f}]",
        )
        return References(original_eval, oracle_eval, threshold, target)
    if plan.threshold is None:
        threshold = metrics.auto_threshold(oracle_eval["forget_fraction"], config["monitor_samples"])
    else:
        threshold = plan.threshold
    target = gated_target(config, original_eval, oracle_eval, evaluation.loss_prefix)

    plan.progress(
        f"original: forget fraction {original_eval['forget_fraction']:.4f}, FID retain "
        f"{original_eval['fid_retain']:.2f}; oracle: {oracle_eval['forget_fraction']:.4f}, "
        f"{oracle_eval['fid_retain']:.2f}; threshold {threshold:.4f}",
    )
    return References(original_eval, oracle_eval, threshold, target)


def gated_target(
    config: Mapping[str, Any],
    original_eval: Mapping[str, float],
    oracle_eval: Mapping[str, float],
    loss_prefix: str = "nelbo",
) -> float:
    """``sa_gated``'s forget-loss target: ``L_orig + scale * (L_ref - L_orig)`` (a given number is used as is).

    ``L_orig`` is the original model's mean family loss (VAE: negative ELBO, key prefix ``nelbo``; DDPM: epsilon
    loss, ``eps_loss``) on the forget training examples; ``L_ref`` is the
    oracle's on the same examples (``gated_target='oracle'``) or the original model's on held-out examples of the
    forget classes (``'heldout'``: the fallback without an oracle, the loss level of examples it never saw; the
    whole held-out split for a forget set of examples).
    """
    if config["gated_target"] not in GATED_TARGETS:
        return float(config["gated_target"])
    reference = (
        oracle_eval[f"{loss_prefix}_forget_train"]
        if config["gated_target"] == "oracle"
        else original_eval.get(f"{loss_prefix}_heldout_forget", original_eval.get(f"{loss_prefix}_heldout"))
    )
    if config["gated_target_scale"] == 1.0:
        return reference
    start = original_eval[f"{loss_prefix}_forget_train"]
    return start + config["gated_target_scale"] * (reference - start)


def generative_record(evaluation: Evaluation, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the report's loss columns and sampling are (``reporting`` names the loss columns from it)."""
    record = {
        "family": evaluation.family.name,
        "loss_prefix": evaluation.loss_prefix,
        "loss_label": evaluation.family.loss_label,
        "class_conditional": evaluation.conditional,
    }
    if evaluation.family.name == "ddpm":
        record.update(
            sampler="ddim",
            monitor_sample_steps=config["monitor_sample_steps"],
            fid_sample_steps=config["fid_sample_steps"],
            guidance_scale=config["train"]["guidance_scale"] if evaluation.conditional else None,
            monitoring_labels="i mod K (all classes)" if evaluation.conditional else "none (unconditional)",
        )
    return record
