"""Per-example losses as pure functions of the parameters: the one contract the unlearning core is written against.

A :data:`LossFn` is the loss of ONE example::

    loss_fn(params: nnx.State, example: {"image": f32[H, W, C], "label": i32[]}, key: PRNGKey) -> f32[]

built by a factory that closes over the model's ``graphdef`` and the hyperparameters (optax style). Batched by
``jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys)`` with one key per example; :func:`batch_mean` is
the ONE way training and unlearning turn it into a batch loss (keys ``jax.random.split(key, B)``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from gsu_jax.models import MLPVAE
  >>> graphdef, params = nnx.split(MLPVAE(rngs=nnx.Rngs(0)))
  >>> loss_fn = negative_elbo(graphdef, kl_weight=1.0)
  >>> batch = {"image": jnp.full((4, 28, 28, 1), 0.5), "label": jnp.zeros(4, jnp.int32)}
  >>> jax.jit(batch_mean(loss_fn))(params, batch, jax.random.key(0)).shape
  ()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gsu_jax.models.batched import classifier_logits, generate_images
from gsu_jax.models.layers import check_positive_int
from gsu_jax.models.vae import reparameterize

Params = Any  # an nnx.State (any pytree of arrays that nnx.merge accepts with the graphdef)
Example = Mapping[str, jax.Array]  # {"image": f32[H, W, C], "label": i32[]}
Batch = Mapping[str, jax.Array]  # {"image": f32[B, H, W, C], "label": i32[B]}
LossFn = Callable[[Params, Example, jax.Array], jax.Array]  # (params, example, key) -> f32[]
BatchLossFn = Callable[[Params, Batch, jax.Array], jax.Array]  # (params, batch, key) -> f32[]
GuidanceLossFn = Callable[[Params, jax.Array], jax.Array]  # (params, key) -> f32[]


class ElboTerms(NamedTuple):
    """The two terms of one example's negative ELBO (each ``f32[]``).

    Attributes:
      reconstruction: ``-log p(x | z) = sum_pixels BCE(sigmoid(logits), x)`` for one sample ``z ~ q(z | x)``.
      kl: ``KL(q(z | x) || N(0, I))``, summed over the latent dimensions (closed form, no sampling).
    """

    reconstruction: jax.Array
    kl: jax.Array


def bernoulli_nll(logits: jax.Array, image: jax.Array) -> jax.Array:
    """``sum_i [-x_i log sigmoid(l_i) - (1 - x_i) log sigmoid(-l_i)]``: BCE on logits summed over all pixels.

    Computed with ``optax.sigmoid_binary_cross_entropy`` (log-sigmoid form, finite for any logits); ``x`` in
    [0, 1] need not be binary.

    Args:
      logits: ``f32[H, W, C]`` decoder logits.
      image: ``f32[H, W, C]`` target in [0, 1].

    Returns:
      ``f32[]``.
    """
    # On flat vectors: XLA:CPU compiles the elementwise log-sigmoids of a [28, 28, 1] image inside vmap into far
    # slower loops (forward pass 2.8 against 1.2 ms, forward-mode derivative 10 against 1.9 ms on the protocol VAE's
    # 128-image batch), with bit-identical values.
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits.reshape(-1), image.reshape(-1)))


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(mean, diag(exp(logvar))) || N(0, I)) = 1/2 sum_j (exp(logvar_j) + mean_j^2 - 1 - logvar_j)``.

    Args:
      mean: ``f32[L]``.
      logvar: ``f32[L]``.

    Returns:
      ``f32[]``, zero exactly when ``mean = 0`` and ``logvar = 0``.
    """
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def _vae(graphdef: nnx.GraphDef, params: Params) -> nnx.Module:
    model = nnx.merge(graphdef, params)
    if not (hasattr(model, "encode") and hasattr(model, "decode")):
        raise TypeError(f"expected a VAE graphdef (with encode and decode), got {type(model).__name__}")
    return model


def _example_field(example: Example, field: str, *, loss: str) -> jax.Array:
    if not isinstance(example, Mapping) or field not in example:
        got = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"{loss} needs an example mapping with key {field!r}, got {got}")
    return example[field]


def elbo_terms(graphdef: nnx.GraphDef) -> Callable[[Params, Example, jax.Array], ElboTerms]:
    """The reconstruction and KL terms of one example's negative ELBO, as a pure function of ``params``.

    ``z = mean + exp(logvar / 2) * eps`` with ``eps = jax.random.normal(key, (L,))`` (see
    :func:`gsu_jax.models.reparameterize`), then ``reconstruction = bernoulli_nll(decode(z), x)`` and
    ``kl = kl_to_standard_normal(mean, logvar)``. Useful for metrics (held-out ELBO, membership inference).

    An example may carry a ``"target"`` image: it is encoded from ``"image"`` and its reconstruction is scored
    against ``"target"`` (the surrogate loss of :func:`gsu_jax.methods.make_method`'s ``remap_surgery``: what the
    model should generate where it encodes ``image``). Without it the target is the image itself.

    Args:
      graphdef: graph definition of a VAE (``MLPVAE`` or ``ConvVAE``).

    Returns:
      ``terms_fn(params, example, key) -> ElboTerms`` for ONE example ``{"image": f32[H, W, C], ...}``.
    """

    def terms_fn(params: Params, example: Example, key: jax.Array) -> ElboTerms:
        if "pseudo_label" in example:
            # SalUn's random-label loss relabels a conditional model's input; a VAE has no label to replace, and
            # ignoring the field would silently turn salun's forget term into descent on the forget set.
            raise ValueError(
                "negative_elbo: an example with a 'pseudo_label' (salun's random-label loss) needs a class-conditional "
                "DDPM; allowed for a VAE: examples without it (any method but salun)"
            )
        model = _vae(graphdef, params)
        image = _example_field(example, "image", loss="negative_elbo")
        target = example.get("target", image)
        mean, logvar = model.encode(image)
        z = reparameterize(mean, logvar, key=key)
        return ElboTerms(bernoulli_nll(model.decode(z), target), kl_to_standard_normal(mean, logvar))

    return terms_fn


def negative_elbo(graphdef: nnx.GraphDef, *, kl_weight: float = 1.0) -> LossFn:
    """Negative ELBO of one example with a Bernoulli decoder on logits (a beta-VAE for ``kl_weight != 1``).

    .. math::

       \\ell(\\theta; x, \\text{key}) = \\sum_{i} \\mathrm{BCE}(\\sigma(f_\\theta(z))_i, x_i)
         + \\beta \\, \\tfrac12 \\sum_j (e^{s_j} + \\mu_j^2 - 1 - s_j),
       \\quad z = \\mu + e^{s/2} \\odot \\epsilon, \\ \\epsilon = \\texttt{normal(key, (L,))},

    with ``(mu, s) = encode(x)``, ``f_theta = decode`` and ``beta = kl_weight``: one reparameterised sample drawn with
    the example's own key, so the loss is a deterministic function of ``(params, example, key)``.

    Args:
      graphdef: graph definition of a VAE (``MLPVAE`` or ``ConvVAE``).
      kl_weight: ``beta >= 0``, multiplies only the KL term (1.0 in the published protocol).

    Returns:
      ``loss_fn(params, example, key) -> f32[]`` for ONE example ``{"image": f32[H, W, C], "label": i32[]}``
      (``label`` is ignored).

    Raises:
      ValueError: ``kl_weight`` is negative or not finite.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from gsu_jax.models import MLPVAE
      >>> graphdef, params = nnx.split(MLPVAE(rngs=nnx.Rngs(0)))
      >>> loss_fn = negative_elbo(graphdef)
      >>> loss_fn(params, {"image": jnp.zeros((28, 28, 1))}, jax.random.key(0)).shape
      ()
    """
    kl_weight = _check_nonnegative_float(kl_weight, name="kl_weight")
    terms_fn = elbo_terms(graphdef)

    def loss_fn(params: Params, example: Example, key: jax.Array) -> jax.Array:
        terms = terms_fn(params, example, key)
        return terms.reconstruction + kl_weight * terms.kl

    return loss_fn


def cross_entropy(graphdef: nnx.GraphDef, *, label_smoothing: float = 0.0) -> LossFn:
    """Softmax cross-entropy of one example against its (optionally smoothed) label.

    .. math::

       \\ell(\\theta; x, y) = -\\sum_k t_k \\log \\mathrm{softmax}(g_\\theta(x))_k,
       \\quad t = (1 - \\alpha)\\, \\mathrm{onehot}(y) + \\alpha / K,

    with ``g_theta`` the classifier's logits, ``K`` its number of classes and ``alpha = label_smoothing``.

    Args:
      graphdef: graph definition of a classifier (``MLPClassifier`` or ``CNNClassifier``).
      label_smoothing: ``alpha`` in [0, 1).

    Returns:
      ``loss_fn(params, example, key) -> f32[]`` for ONE example ``{"image": f32[H, W, C], "label": i32[]}``; the
      key is accepted (the common signature) and unused.

    Raises:
      ValueError: ``label_smoothing`` outside [0, 1).
    """
    label_smoothing = _check_nonnegative_float(label_smoothing, name="label_smoothing")
    if label_smoothing >= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    def loss_fn(params: Params, example: Example, key: jax.Array) -> jax.Array:
        del key  # deterministic loss; the key is part of the common LossFn signature
        model = nnx.merge(graphdef, params)
        image = _example_field(example, "image", loss="cross_entropy")
        label = _example_field(example, "label", loss="cross_entropy")
        if jnp.ndim(label) != 0:
            raise ValueError(f"cross_entropy's label must be a scalar (one example), got shape {jnp.shape(label)}")
        logits = model(image)
        num_classes = logits.shape[-1]
        targets = (1.0 - label_smoothing) * jax.nn.one_hot(label, num_classes) + label_smoothing / num_classes
        return optax.softmax_cross_entropy(logits, targets)

    return loss_fn


def batch_size(batch: Batch) -> int:
    """The common leading dimension ``B`` of every array in ``batch``; refuses ragged or scalar leaves."""
    sizes = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"a batch needs one common leading dimension B >= 1 on every array, got sizes {sizes}")
    (size,) = sizes
    if size < 1:
        raise ValueError("a batch must hold at least one example, got B = 0")
    return size


def example_keys(key: jax.Array, batch: Batch) -> jax.Array:
    """One PRNG key per example: ``jax.random.split(key, B)``, the convention every batch loss follows."""
    return jax.random.split(key, batch_size(batch))


def batch_mean(loss_fn: LossFn) -> BatchLossFn:
    """Turns a per-example :data:`LossFn` into the mean loss of a batch.

    ``batch_loss(params, batch, key) = mean_b loss_fn(params, batch[b], keys[b])`` with
    ``keys = jax.random.split(key, B)``, computed with ``jax.vmap(loss_fn, in_axes=(None, 0, 0))``. The batch is
    the per-example pytree with a leading axis ``B`` (``{"image": f32[B, H, W, C], "label": i32[B]}``).

    Args:
      loss_fn: the loss of one example.

    Returns:
      ``batch_loss(params, batch, key) -> f32[]``, pure, jit-able, differentiable in ``params``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, example, key) -> f32[], got {loss_fn!r}")

    def batch_loss(params: Params, batch: Batch, key: jax.Array) -> jax.Array:
        keys = example_keys(key, batch)
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys))

    return batch_loss


def uniformity_guidance_loss(
    gen_graphdef: nnx.GraphDef,
    clf_graphdef: nnx.GraphDef,
    clf_params: Params,
    *,
    retained_classes: Sequence[int],
    num_samples: int,
    latent_dim: int,
    eps: float = 1e-8,
) -> GuidanceLossFn:
    """The reference implementation's classifier "uniformity" term (UNO code, ``pinakm9/forget``), as a pure loss.

    Decode ``N = num_samples`` latents ``z_n ~ N(0, I)`` drawn with the key, classify them with a fixed guidance
    classifier, average its class probabilities over the samples, and measure the KL divergence of that average
    from the uniform distribution ``u`` over the retained classes, with the reference's smoothing ``eps``:

    .. math::

       \\bar p = \\frac1N \\sum_n \\mathrm{softmax}(g(\\sigma(f_\\theta(z_n)))), \\quad
       L(\\theta) = \\sum_k \\bar p_k \\,[\\log(\\bar p_k + \\epsilon) - \\log(u_k + \\epsilon)],
       \\quad u_k = \\frac{[k \\in R]}{|R|}.

    It is zero when ``p_bar = u``; mass on a class outside ``R`` costs about ``p_k (log p_k - log eps)``, i.e. a
    weight of ~18 per unit probability at ``eps = 1e-8``: this is the term that drives the published fast UNO
    numbers (docs/protocol.md §2). Gradients flow into the generator ``params`` only; the classifier is a
    constant. The same key gives the same ``z`` (pass a fixed key for fixed latents); a guided method must be scored
    by a different classifier than ``clf_params``.

    Args:
      gen_graphdef: graph definition of the VAE being unlearned.
      clf_graphdef: graph definition of the guidance classifier.
      clf_params: the guidance classifier's parameters (closed over, never differentiated).
      retained_classes: the classes ``R`` the samples should spread over uniformly (distinct, in [0, K)).
      num_samples: ``N`` latents per evaluation (128 in the reference).
      latent_dim: ``L`` of the VAE.
      eps: smoothing of the logarithms, > 0 (1e-8 in the reference).

    Returns:
      ``guidance_loss(params, key) -> f32[]``, pure and jit-able.

    Raises:
      ValueError: empty, repeated or out-of-range ``retained_classes``, non-positive ``num_samples``/
        ``latent_dim``/``eps``, or a classifier graphdef/params pair without ``num_classes``.
    """
    num_samples = check_positive_int(num_samples, name="num_samples")
    latent_dim = check_positive_int(latent_dim, name="latent_dim")
    eps = _check_nonnegative_float(eps, name="eps")
    if eps == 0.0:
        raise ValueError("eps must be > 0 (log of the zero target mass of the forgotten classes), got 0")
    classifier = nnx.merge(clf_graphdef, clf_params)
    num_classes = getattr(classifier, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ValueError(
            f"clf_graphdef/clf_params must be a classifier with num_classes, got {type(classifier).__name__}"
        )
    retained = _check_retained_classes(retained_classes, num_classes=num_classes)
    target = np.zeros(num_classes, np.float32)
    target[list(retained)] = 1.0 / len(retained)
    log_target = jnp.asarray(np.log(target + np.float32(eps)), jnp.float32)

    def guidance_loss(params: Params, key: jax.Array) -> jax.Array:
        generator = nnx.merge(gen_graphdef, params)
        if getattr(generator, "latent_dim", None) != latent_dim:
            raise ValueError(f"latent_dim={latent_dim} does not match the generator's {generator.latent_dim}")
        if getattr(generator, "image_shape", None) != classifier.image_shape:
            raise ValueError(
                f"generator images {generator.image_shape} do not fit the classifier's {classifier.image_shape}"
            )
        z = jax.random.normal(key, (num_samples, latent_dim))
        images = generate_images(gen_graphdef, params, z)
        mean_probs = jnp.mean(jax.nn.softmax(classifier_logits(clf_graphdef, clf_params, images)), axis=0)
        return jnp.sum(mean_probs * (jnp.log(mean_probs + eps) - log_target))

    return guidance_loss


def _check_nonnegative_float(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_retained_classes(retained_classes: object, *, num_classes: int) -> tuple[int, ...]:
    if isinstance(retained_classes, np.ndarray) and retained_classes.ndim == 1:
        retained_classes = retained_classes.tolist()
    if isinstance(retained_classes, (str, bytes)) or not isinstance(retained_classes, Sequence):
        raise ValueError(f"retained_classes must be a sequence of class indices, got {retained_classes!r}")
    classes = tuple(retained_classes)
    if not classes:
        raise ValueError("retained_classes must not be empty")
    for cls in classes:
        if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or not 0 <= cls < num_classes:
            raise ValueError(f"retained class {cls!r} is not a class index in [0, {num_classes})")
    if len(set(classes)) != len(classes):
        raise ValueError(f"retained_classes has repeated classes: {list(classes)}")
    return tuple(int(cls) for cls in classes)
