"""Models (Flax NNX), each written for ONE example, and the registry that builds them by name.

Registry names (``build_model``):

=================== ================================ ==========================================================
name                class                            hyperparameters (keyword-only, defaults)
=================== ================================ ==========================================================
``mlp_vae``         :class:`MLPVAE`                  image_shape=(28, 28, 1), hidden=400, latent_dim=2,
                                                     layer_norm=False
``conv_vae``        :class:`ConvVAE`                 image_shape=(28, 28, 1), latent_dim=16, channels=32,
                                                     num_groups=8
``mlp_classifier``  :class:`MLPClassifier`           image_shape=(28, 28, 1), hidden=200, num_classes=10
``cnn_classifier``  :class:`CNNClassifier`           image_shape=(28, 28, 1), channels=32, hidden=128,
                                                     num_classes=10, num_groups=8
``ddpm_unet``       :class:`UNet`                    image_shape=(28, 28, 1), channels=32, channel_mults=(1, 2),
                                                     num_groups=8, time_embed_dim=128, num_classes=0
=================== ================================ ==========================================================

After construction: ``graphdef, params = nnx.split(model)`` once; everything else (losses in
:mod:`gsu_jax.losses`, the batched helpers below) is a pure function of ``params``.
"""

from __future__ import annotations

import inspect

from flax import nnx

from gsu_jax.models.batched import classifier_features, classifier_logits, generate_images, reconstruct
from gsu_jax.models.classifier import CNNClassifier, MLPClassifier
from gsu_jax.models.unet import UNet
from gsu_jax.models.vae import MLPVAE, ConvVAE, reparameterize

MODELS: dict[str, type[nnx.Module]] = {
    "mlp_vae": MLPVAE,
    "conv_vae": ConvVAE,
    "mlp_classifier": MLPClassifier,
    "cnn_classifier": CNNClassifier,
    "ddpm_unet": UNet,
}
# Which registry names are generative (VAEs trained with gsu_jax.losses.negative_elbo, diffusion models with
# gsu_jax.diffusion.epsilon_loss) and which are classifiers (trained with gsu_jax.losses.cross_entropy).
VAE_MODELS: frozenset[str] = frozenset({"mlp_vae", "conv_vae"})
DIFFUSION_MODELS: frozenset[str] = frozenset({"ddpm_unet"})
CLASSIFIER_MODELS: frozenset[str] = frozenset({"mlp_classifier", "cnn_classifier"})


def model_hyperparameters(name: str) -> dict[str, object]:
    """The keyword arguments ``build_model(name, ...)`` accepts, with their defaults (``rngs`` excluded)."""
    model_class = _model_class(name)
    return {
        parameter.name: parameter.default
        for parameter in inspect.signature(model_class.__init__).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name != "rngs"
    }


def build_model(name: str, *, rngs: nnx.Rngs, **kwargs: object) -> nnx.Module:
    """Builds the registered model ``name`` with hyperparameters ``kwargs``.

    Args:
      name: one of ``mlp_vae``, ``conv_vae``, ``mlp_classifier``, ``cnn_classifier``, ``ddpm_unet``.
      rngs: initialisation randomness (used only during construction; the model keeps no RNG state).
      **kwargs: the model's hyperparameters (see the module docstring); unknown names are refused.

    Returns:
      The model.

    Raises:
      ValueError: unknown ``name``, unknown hyperparameter, or a bad value (e.g. ``latent_dim=0``, an
        ``image_shape`` that is not a 3-tuple or not supported by a convolutional model).
      TypeError: ``rngs`` is not an ``nnx.Rngs`` or a hyperparameter has the wrong type.

    Example:
      >>> from flax import nnx
      >>> vae = build_model("mlp_vae", latent_dim=20, rngs=nnx.Rngs(0))
      >>> vae.latent_dim
      20
    """
    model_class = _model_class(name)
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be a flax.nnx.Rngs, got {type(rngs).__name__}")
    allowed = model_hyperparameters(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for model {name!r}; allowed: {sorted(allowed)}")
    return model_class(rngs=rngs, **kwargs)


def _model_class(name: str) -> type[nnx.Module]:
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    return MODELS[name]


__all__ = [
    "CLASSIFIER_MODELS",
    "CNNClassifier",
    "ConvVAE",
    "DIFFUSION_MODELS",
    "MLPClassifier",
    "MLPVAE",
    "MODELS",
    "UNet",
    "VAE_MODELS",
    "build_model",
    "classifier_features",
    "classifier_logits",
    "generate_images",
    "model_hyperparameters",
    "reconstruct",
    "reparameterize",
]
