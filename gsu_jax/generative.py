"""Generative model *families*: what training and unlearning need to know about a VAE or a DDPM, in one place.

Training (:mod:`gsu_jax.training`) and unlearning (:mod:`gsu_jax.unlearning`) are written once, against a
:class:`Family`, and dispatch on the registry name of the generative model (``config.model``):

=========== ====================== ================================ =============================================
family      models                 per-example loss                 noise a sample is generated from
=========== ====================== ================================ =============================================
``vae``     ``mlp_vae``,           negative ELBO (``kl_weight``)    ``z f32[latent_dim]``, decoded once
            ``conv_vae``
``ddpm``    ``ddpm_unet``          epsilon-prediction MSE at a      ``x_T f32[H, W, C]``, denoised by a few-step
                                   random timestep (own key)        DDIM (``eta = 0``: deterministic in ``x_T``)
=========== ====================== ================================ =============================================

A family reads its own fields of the train config (:attr:`Family.fields`; the others' are ignored and are left out
of a checkpoint's identity, so adding a family does not make existing workdirs unresumable), builds its loss
(:func:`gsu_jax.losses.LossFn` contract), the evaluation terms whose sum is that loss, and a jittable batched
``generate(graphdef, params, noise f32[B, *noise_shape], labels i32[B] | None) -> images f32[B, H, W, C]``.

Class-conditional DDPMs (``class_conditional=True``: ``num_classes`` = the data's, null label ``K`` for
classifier-free guidance) are generated with ``guidance_scale`` from the config; ``labels=None`` samples the
unconditional (null-label) model.

Example:
    >>> from gsu_jax.config_validation import default_train_config
    >>> values = dict(default_train_config())
    >>> family = family_of(values["model"])
    >>> family.name, family.noise_shape({"latent_dim": 2, "image_shape": (28, 28, 1)})
    ('vae', (2,))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gsu_jax import diffusion, losses, models

__all__ = [
    "FAMILIES",
    "Family",
    "GenerateFn",
    "family_of",
    "other_families_fields",
    "settings_of",
]

GenerateFn = Callable[[Any, jax.Array, "jax.Array | None"], jax.Array]  # (params, noise, labels) -> images
TermsFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]  # (params, example, key) -> f32[T]


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of generative models (a registry record; see the module docstring).

    Attributes:
        name: ``"vae"`` or ``"ddpm"``.
        models: registry names of :func:`gsu_jax.models.build_model` in this family.
        fields: train-config fields only this family reads (its :func:`settings_of`).
        reserved_kwargs: model hyperparameters set from the data and the config, never by ``model_kwargs``.
        loss_metric: name of the mean loss in training metrics (``heldout_<loss_metric>``).
        report_prefix: prefix of the loss keys of an unlearning report (``<prefix>_heldout_retain``, ...).
        loss_label: the loss in table headers.
        term_names: the evaluation terms whose sum is the loss (reported one by one when there are several).
    """

    name: str
    models: frozenset[str]
    fields: tuple[str, ...]
    reserved_kwargs: tuple[str, ...]
    loss_metric: str
    report_prefix: str
    loss_label: str
    term_names: tuple[str, ...]
    _model_kwargs: Callable[[Mapping[str, Any], int], dict[str, Any]]
    _noise_shape: Callable[[Mapping[str, Any]], tuple[int, ...]]
    _loss: Callable[[nnx.GraphDef, Mapping[str, Any]], losses.LossFn]
    _terms: Callable[[nnx.GraphDef, Mapping[str, Any]], TermsFn]
    _generate: Callable[[nnx.GraphDef, Mapping[str, Any], int], GenerateFn]
    _describe: Callable[[Mapping[str, Any], Mapping[str, Any]], str]

    def model_kwargs(self, values: Mapping[str, Any], image_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """The complete keyword arguments of the generative model: ``config.model_kwargs`` plus the reserved ones."""
        return {**values["model_kwargs"], "image_shape": tuple(image_shape), **self._model_kwargs(values, num_classes)}

    def noise_shape(self, model_kwargs: Mapping[str, Any]) -> tuple[int, ...]:
        """The shape of ONE fixed noise a sample is generated from (VAE ``(L,)``, DDPM ``(H, W, C)``)."""
        return self._noise_shape(model_kwargs)

    def loss(self, graphdef: nnx.GraphDef, settings: Mapping[str, Any]) -> losses.LossFn:
        """The per-example training loss ``(params, example, key) -> f32[]`` (also what unlearning methods use)."""
        return self._loss(graphdef, settings)

    def terms(self, graphdef: nnx.GraphDef, settings: Mapping[str, Any]) -> TermsFn:
        """``(params, example, key) -> f32[len(term_names)]``, summing to :meth:`loss` with the same key."""
        return self._terms(graphdef, settings)

    def generator(self, graphdef: nnx.GraphDef, settings: Mapping[str, Any], *, num_steps: int) -> GenerateFn:
        """Batched ``generate(params, noise f32[B, *noise_shape], labels i32[B] | None) -> f32[B, H, W, C]`` in
        [0, 1], pure and jittable; ``num_steps`` sampling steps (ignored by the one-shot VAE decoder)."""
        return self._generate(graphdef, settings, num_steps)

    def describe(self, model_kwargs: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
        """A few words on the model for titles, e.g. ``latent 2`` or ``T=1000 cosine, DDIM 20 steps``."""
        return self._describe(model_kwargs, settings)

    @staticmethod
    def is_conditional(model_kwargs: Mapping[str, Any]) -> bool:
        """Whether the model takes class labels (a class-conditional DDPM)."""
        return int(model_kwargs.get("num_classes", 0) or 0) > 0


def settings_of(family: Family, values: Mapping[str, Any]) -> dict[str, Any]:
    """The family's own train-config values (what its loss and sampler depend on)."""
    return {field: values[field] for field in family.fields}


# ------------------------------------------------------------------------------------------- VAE


def _vae_terms(graphdef: nnx.GraphDef, settings: Mapping[str, Any]) -> TermsFn:
    del settings  # the terms are reported unweighted (KL weight 1: the true negative ELBO)
    terms_fn = losses.elbo_terms(graphdef)

    def terms(params, example, key):
        values = terms_fn(params, example, key)
        return jnp.stack([values.reconstruction, values.kl])

    return terms


def _vae_generate(graphdef: nnx.GraphDef, settings: Mapping[str, Any], num_steps: int) -> GenerateFn:
    del settings, num_steps  # one decoder pass

    def generate(params, noise, labels=None):
        if labels is not None:
            raise ValueError("a VAE is not class-conditional; generate it with labels=None")
        return models.generate_images(graphdef, params, noise)

    return generate


_VAE = Family(
    name="vae",
    models=models.VAE_MODELS,
    fields=("latent_dim", "kl_weight"),
    reserved_kwargs=("image_shape", "latent_dim"),
    loss_metric="neg_elbo",
    report_prefix="nelbo",
    loss_label="-ELBO",
    term_names=("reconstruction", "kl"),
    _model_kwargs=lambda values, num_classes: {"latent_dim": values["latent_dim"]},
    _noise_shape=lambda kwargs: (int(kwargs["latent_dim"]),),
    _loss=lambda graphdef, settings: losses.negative_elbo(graphdef, kl_weight=settings["kl_weight"]),
    _terms=_vae_terms,
    _generate=_vae_generate,
    _describe=lambda kwargs, settings: f"latent {kwargs['latent_dim']}",
)


# ------------------------------------------------------------------------------------------- DDPM


def _schedule(settings: Mapping[str, Any]) -> diffusion.NoiseSchedule:
    return diffusion.make_schedule(settings["diffusion_schedule"], settings["diffusion_steps"])


def _ddpm_loss(graphdef: nnx.GraphDef, settings: Mapping[str, Any]) -> losses.LossFn:
    dropout = settings["class_dropout"] if settings["class_conditional"] else 0.0
    return diffusion.epsilon_loss(graphdef, schedule=_schedule(settings), class_dropout=dropout)


def _ddpm_terms(graphdef: nnx.GraphDef, settings: Mapping[str, Any]) -> TermsFn:
    loss_fn = _ddpm_loss(graphdef, settings)
    return lambda params, example, key: loss_fn(params, example, key)[None]


def _ddpm_generate(graphdef: nnx.GraphDef, settings: Mapping[str, Any], num_steps: int) -> GenerateFn:
    schedule = _schedule(settings)
    guidance_scale = settings["guidance_scale"] if settings["class_conditional"] else 0.0

    def generate(params, noise, labels=None):
        return diffusion.generate(
            graphdef,
            params,
            noise,
            schedule=schedule,
            num_steps=num_steps,
            sampler="ddim",
            labels=labels,
            guidance_scale=guidance_scale if labels is not None else 0.0,
        )

    return generate


_DDPM = Family(
    name="ddpm",
    models=models.DIFFUSION_MODELS,
    fields=(
        "diffusion_schedule",
        "diffusion_steps",
        "sample_steps",
        "class_conditional",
        "class_dropout",
        "guidance_scale",
    ),
    reserved_kwargs=("image_shape", "num_classes"),
    loss_metric="eps_loss",
    report_prefix="eps_loss",
    loss_label="eps-MSE",
    term_names=("eps_loss",),
    _model_kwargs=lambda values, num_classes: {"num_classes": num_classes if values["class_conditional"] else 0},
    _noise_shape=lambda kwargs: tuple(int(d) for d in kwargs["image_shape"]),
    _loss=_ddpm_loss,
    _terms=_ddpm_terms,
    _generate=_ddpm_generate,
    _describe=lambda kwargs, settings: (
        f"T={settings['diffusion_steps']} {settings['diffusion_schedule']}, DDIM {settings['sample_steps']} steps"
        + (f", class-conditional (guidance {settings['guidance_scale']:g})" if kwargs.get("num_classes") else "")
    ),
)

FAMILIES: dict[str, Family] = {family.name: family for family in (_VAE, _DDPM)}


def family_of(model_name: str) -> Family:
    """The family of a generative registry name (``mlp_vae`` -> ``vae``, ``ddpm_unet`` -> ``ddpm``).

    Raises:
        ValueError: ``model_name`` is not a generative model.
    """
    for family in FAMILIES.values():
        if model_name in family.models:
            return family
    generative = sorted(name for family in FAMILIES.values() for name in family.models)
    raise ValueError(f"{model_name!r} is not a generative model; allowed: {', '.join(generative)}")


def other_families_fields(family: Family) -> frozenset[str]:
    """Train-config fields read only by the OTHER families (left out of a checkpoint's identity)."""
    return frozenset(field for other in FAMILIES.values() if other is not family for field in other.fields)
