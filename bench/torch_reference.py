"""PyTorch reproductions: the reference implementation's S step, and ``torch.func`` per-example gradients.

The reference (UNO, ``pinakm9/forget``, ``modules/mnist/vae_surgery.py``) runs one eager step per batch pair::

    forward on forget and retain batches; loss = BCE(sum) + KL(sum) per batch
    gf = cat(g.view(-1) for g in autograd.grad(loss_forget, params, retain_graph=True))
    gr = cat(... autograd.grad(loss_retain, params, retain_graph=True))
    gr = gr - gf * (gf @ gr) / (gf @ gf)          # S rule on the flat vector
    p.grad = gr[idx: idx + numel].view(p.shape)   # scatter back
    adam.step()

:class:`ReferenceSStep` does exactly that on :class:`MLPVAE` (the reference's 784-400-L VAE with its BatchNorm
removed, as ours has none) with two deliberate differences that can only make the reference *faster*: the noise is
drawn on the device (``torch.randn_like``; the reference builds it on the host and copies it over) and the four
``.item()`` host syncs of its metrics are left out (the benchmark syncs once per step instead).

The modules mirror the JAX models of :mod:`gsu_jax.models` parameter for parameter, so weights can be copied
across (:func:`load_jax_params`) and outputs compared before anything is timed. torch is optional: import this
module only after :func:`available` says yes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def available() -> bool:
    """Whether torch is importable (it is a bench-only optional extra)."""
    return importlib.util.find_spec("torch") is not None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------------------------------------------
# Models mirroring gsu_jax.models (NCHW, weight layouts converted on load)


def build_mlp_vae(*, pixels: int = 784, hidden: int = 400, latent_dim: int = 2):
    """The reference MNIST VAE without BatchNorm: encoder ``pixels-hidden-(mean, logvar)``, decoder
    ``latent-hidden-pixels`` logits; the same parameter names as ``gsu_jax.models.MLPVAE``."""
    torch = _torch()
    nn = torch.nn

    class MLPVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.latent_dim = latent_dim
            self.encoder_hidden = nn.Linear(pixels, hidden)
            self.mean_head = nn.Linear(hidden, latent_dim)
            self.logvar_head = nn.Linear(hidden, latent_dim)
            self.decoder_hidden = nn.Linear(latent_dim, hidden)
            self.decoder_output = nn.Linear(hidden, pixels)

        def forward(self, x, eps):
            """``x f32[B, pixels]``, ``eps f32[B, L]`` -> ``(logits f32[B, pixels], mean, logvar)``."""
            h = torch.relu(self.encoder_hidden(x))
            mean, logvar = self.mean_head(h), self.logvar_head(h)
            z = mean + torch.exp(0.5 * logvar) * eps
            logits = self.decoder_output(torch.relu(self.decoder_hidden(z)))
            return logits, mean, logvar

    return MLPVAE()


def build_conv_vae(*, image_shape=(28, 28, 1), latent_dim: int = 16, channels: int = 32, num_groups: int = 8):
    """Mirror of ``gsu_jax.models.ConvVAE`` (stride-2 3x3 conv + GroupNorm + ReLU down, nearest-2x + 3x3 conv +
    GroupNorm + ReLU up). JAX's SAME padding of a stride-2 convolution pads only after (bottom/right), reproduced
    with an explicit ``F.pad``; GroupNorm epsilon 1e-6 like ``nnx.GroupNorm``."""
    torch = _torch()
    nn = torch.nn
    functional = torch.nn.functional
    side, _, image_channels = image_shape
    stages = {28: 2, 32: 2, 64: 3}[side]
    widths = [channels * 2**stage for stage in range(stages)]
    bottom_side = side // 2**stages
    bottom = (widths[-1], bottom_side, bottom_side)

    def same_pad_stride2(size: int) -> tuple[int, int]:
        out = -(-size // 2)
        total = max((out - 1) * 2 + 3 - size, 0)
        return total // 2, total - total // 2

    class Block(nn.Module):
        def __init__(self, in_width, out_width, *, stride):
            super().__init__()
            self.stride = stride
            self.conv = nn.Conv2d(in_width, out_width, 3, stride=stride, padding=0 if stride == 2 else 1)
            self.norm = nn.GroupNorm(num_groups, out_width, eps=1e-6)

        def forward(self, x):
            if self.stride == 2:
                low, high = same_pad_stride2(x.shape[-1])
                x = functional.pad(x, (low, high, low, high))
            else:
                x = functional.interpolate(x, scale_factor=2, mode="nearest")
            return torch.relu(self.norm(self.conv(x)))

    class ConvVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.latent_dim = latent_dim
            self.down = nn.ModuleList([Block(i, o, stride=2) for i, o in zip([image_channels] + widths[:-1], widths)])
            size = bottom[0] * bottom[1] * bottom[2]
            self.mean_head = nn.Linear(size, latent_dim)
            self.logvar_head = nn.Linear(size, latent_dim)
            self.decoder_input = nn.Linear(latent_dim, size)
            up_widths = widths[::-1] + [widths[0]]
            self.up = nn.ModuleList([Block(i, o, stride=1) for i, o in zip(up_widths[:-1], up_widths[1:])])
            self.decoder_output = nn.Conv2d(widths[0], image_channels, 3, padding=1)

        def forward(self, x, eps):
            """``x f32[B, C, H, W]``, ``eps f32[B, L]`` -> ``(logits f32[B, C, H, W], mean, logvar)``."""
            h = x
            for block in self.down:
                h = block(h)
            h = h.flatten(1)
            mean, logvar = self.mean_head(h), self.logvar_head(h)
            z = mean + torch.exp(0.5 * logvar) * eps
            h = torch.relu(self.decoder_input(z)).view(-1, *bottom)
            for block in self.up:
                h = block(h)
            return self.decoder_output(h), mean, logvar

    module = ConvVAE()
    module.bottom_hwc = (bottom[1], bottom[2], bottom[0])
    return module


# ----------------------------------------------------------------------------------------------------------------
# Weight transfer JAX -> torch (and gradients torch -> JAX layout, for comparisons)


def leaf_name(path) -> str:
    """``"encoder_hidden.kernel"`` for a ``tree_flatten_with_path`` path of an ``nnx.State`` (or dicts/lists)."""
    import jax

    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue  # nnx.Variable wrapper
        else:
            parts.append(str(getattr(entry, "name", getattr(entry, "key", entry))))
    return ".".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{"encoder_hidden.kernel": leaf, ...}`` in flatten order; works on tracers (no conversion)."""
    import jax

    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def jax_named_leaves(tree: Any) -> dict[str, np.ndarray]:
    """:func:`named_leaves` as host numpy arrays."""
    return {name: np.asarray(leaf) for name, leaf in named_leaves(tree).items()}


def _torch_name(jax_name: str) -> str:
    return jax_name.replace(".kernel", ".weight").replace(".scale", ".weight")


def _bottom_permutation(module) -> np.ndarray | None:
    """Index map from torch's CHW flattening of the conv bottom to JAX's HWC flattening (None for the MLP)."""
    bottom_hwc = getattr(module, "bottom_hwc", None)
    if bottom_hwc is None:
        return None
    h, w, c = bottom_hwc
    # torch flat index (c, h, w) -> JAX flat index (h, w, c)
    return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


def jax_to_torch_layout(module, name: str, value: np.ndarray) -> np.ndarray:
    """Converts one JAX parameter (``name`` as in :func:`jax_named_leaves`) to the torch module's layout.

    A leading per-example axis, if any, is kept (``value`` may be ``[B, *shape]`` when converting gradients)."""
    perm = _bottom_permutation(module)
    batched = value.ndim == len(_jax_shape(module, name)) + 1
    lead = (slice(None),) if batched else ()
    offset = 1 if batched else 0
    if name.endswith(".kernel") and value.ndim - offset == 2:  # Linear: [in, out] -> [out, in]
        if perm is not None and name.startswith(("mean_head", "logvar_head")):
            value = value[lead + (perm,)]
        if perm is not None and name.startswith("decoder_input"):
            value = value[lead + (slice(None), perm)]
        return np.swapaxes(value, offset, offset + 1)
    if name.endswith(".kernel") and value.ndim - offset == 4:  # Conv: HWIO -> OIHW
        axes = (3, 2, 0, 1) if not batched else (0, 4, 3, 1, 2)
        return np.transpose(value, axes)
    if perm is not None and name == "decoder_input.bias":
        return value[lead + (perm,)]
    return value


def _jax_shape(module, name: str) -> tuple[int, ...]:
    torch_shape = tuple(dict(module.named_parameters())[_torch_name(name)].shape)
    if name.endswith(".kernel") and len(torch_shape) == 2:
        return torch_shape[::-1]
    if name.endswith(".kernel") and len(torch_shape) == 4:
        o, i, h, w = torch_shape
        return (h, w, i, o)
    return torch_shape


def load_jax_params(module, params: Any) -> None:
    """Copies the JAX model's parameters into the mirroring torch ``module`` (in place)."""
    torch = _torch()
    torch_params = dict(module.named_parameters())
    named = jax_named_leaves(params)
    if set(map(_torch_name, named)) != set(torch_params):
        raise ValueError(f"parameter names differ: JAX {sorted(named)} vs torch {sorted(torch_params)}")
    with torch.no_grad():
        for name, value in named.items():
            converted = jax_to_torch_layout(module, name, value)
            target = torch_params[_torch_name(name)]
            if tuple(converted.shape) != tuple(target.shape):
                raise ValueError(f"{name}: converted shape {converted.shape} != torch {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.array(converted, copy=True)).to(target.device, target.dtype))


def jax_grads_in_torch_layout(module, grads: Any) -> dict[str, np.ndarray]:
    """JAX gradients (params-shaped, optionally with a leading per-example axis) in the torch module's layout,
    keyed by torch parameter name, for comparison with torch's gradients."""
    return {
        _torch_name(name): jax_to_torch_layout(module, name, value) for name, value in jax_named_leaves(grads).items()
    }


def to_torch_input(images: np.ndarray, module, device: str):
    """``f32[B, H, W, C]`` -> the module's input layout on ``device`` (flat for the MLP, NCHW for the conv VAE)."""
    torch = _torch()
    if hasattr(module, "bottom_hwc"):
        array = np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2)))
    else:
        array = np.ascontiguousarray(images.reshape(images.shape[0], -1))
    return torch.from_numpy(array.copy()).to(device)


# ----------------------------------------------------------------------------------------------------------------
# The reference S step


def reference_batch_loss(module, x, eps):
    """The reference's batch loss: ``BCE(sigmoid(logits), x, reduction='sum') + KL(sum)``."""
    torch = _torch()
    logits, mean, logvar = module(x, eps)
    recon = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp())
    return recon + kl


class ReferenceSStep:
    """The reference implementation's S step (see the module docstring), eager, with ``torch.optim.Adam``.

    Calling it draws fresh noise and updates the module's parameters in place; :meth:`direction` computes the
    flat update direction for given noise without touching anything (used for the correctness check).
    """

    def __init__(self, module, *, learning_rate: float = 1e-3, b1: float = 0.9):
        torch = _torch()
        self.module = module
        self.params = list(module.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=learning_rate, betas=(b1, 0.999))

    def _s_rule(self, forget_x, retain_x, eps_f, eps_r):
        torch = _torch()
        grad = torch.autograd.grad
        loss_forget = reference_batch_loss(self.module, forget_x, eps_f)
        loss_retain = reference_batch_loss(self.module, retain_x, eps_r)
        gf = torch.cat([g.view(-1) for g in grad(outputs=loss_forget, inputs=self.params, retain_graph=True)])
        gr = torch.cat([g.view(-1) for g in grad(outputs=loss_retain, inputs=self.params, retain_graph=True)])
        gfgr = gf @ gr
        gfgf = gf @ gf
        return gr - gf * gfgr / gfgf, gfgr, gfgf

    def direction(self, forget_x, retain_x, eps_f, eps_r):
        """The flat S direction (gradients of *summed* batch losses, as in the reference)."""
        return self._s_rule(forget_x, retain_x, eps_f, eps_r)[0].detach()

    def __call__(self, forget_x, retain_x, eps_f=None, eps_r=None):
        """One step; the noise is drawn here unless given (the correctness check passes JAX's)."""
        torch = _torch()
        latent = self.module.latent_dim
        if eps_f is None:
            eps_f = torch.randn(forget_x.shape[0], latent, device=forget_x.device)
        if eps_r is None:
            eps_r = torch.randn(retain_x.shape[0], latent, device=retain_x.device)
        self.optimizer.zero_grad()
        gr, gfgr, gfgf = self._s_rule(forget_x, retain_x, eps_f, eps_r)
        idx = 0
        for p in self.params:
            numel = p.numel()
            p.grad = gr[idx : idx + numel].view(p.shape)
            idx += numel
        self.optimizer.step()
        return gfgr**2 / (gfgf * (gr @ gr))  # the reference's orthogonality metric, left on the device

    def flat_params(self):
        torch = _torch()
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def unflatten(module, flat) -> dict[str, np.ndarray]:
    """A flat torch vector over ``module.parameters()`` -> ``{torch name: array}``."""
    out, idx = {}, 0
    for name, p in module.named_parameters():
        numel = p.numel()
        out[name] = flat[idx : idx + numel].detach().cpu().numpy().reshape(tuple(p.shape))
        idx += numel
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch.func per-example gradients


def per_example_grad_fn(module) -> tuple[Callable, dict[str, Any]]:
    """``torch.func.vmap(torch.func.grad(loss_one))`` for the negative ELBO of ONE example, as in our JAX loss
    (BCE on logits summed over pixels + KL summed over latents, ``z = mean + exp(logvar / 2) * eps``).

    Returns:
      ``(fn, params)`` with ``fn(params, x f32[B, ...], eps f32[B, L]) -> {name: f32[B, *shape]}`` and
      ``params`` the module's detached parameters (the standard ``functional_call`` recipe).
    """
    torch = _torch()
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss_one(p: Mapping[str, Any], x, eps):
        logits, mean, logvar = functional_call(module, p, (x.unsqueeze(0), eps.unsqueeze(0)))
        recon = torch.nn.functional.binary_cross_entropy_with_logits(logits, x.unsqueeze(0), reduction="sum")
        kl = 0.5 * torch.sum(torch.exp(logvar) + mean.square() - 1.0 - logvar)
        return recon + kl

    return vmap(grad(loss_one), in_dims=(None, 0, 0)), params
