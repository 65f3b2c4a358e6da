"""Per-example gradient throughput and memory, and the per-example projection with and without materialising.

Models: the MLP VAE 784-400-20 (652,824 parameters, the model of docs/protocol.md §3's anchors) and the conv
VAE (``ConvVAE`` defaults); the diffusion U-Net once the library has one. Loss: the negative ELBO of one example.

Rows, per model and batch size ``B`` (all jitted, outputs synchronised):

* ``vmap(grad)``: :func:`gsu_jax.per_example.per_example_grads`, returned from the jit in the default row-major
  layout;
* ``vmap(grad), AUTO output layout (diagnostic)``: the same function jitted with
  ``out_shardings=Format(Layout.AUTO)``, so XLA may return the gradients in the layout it computes them in (a
  dense ``[B, out, in]`` for ``[in, out]`` kernels) instead of adding a transposing copy of the whole
  ``B x |params|`` output: it measures what that copy costs;
* ``vmap(grad), precision highest`` (``--full`` only): full float32 matmuls, like torch's default;
* ``chunked``: ``per_example_grads(..., chunk_size=...)``;
* ``hand-written outer products`` (MLP only, model-specific): one batched forward/backward for the per-example
  output deltas, then each kernel gradient as a broadcast product ``x[:, :, None] * delta[:, None, :]`` written
  straight into the row-major layout;
* ``projection: materialised``: ``projections.mean_normal_plane_projection(..., only_on_conflict=True)`` on
  ``-per_example_grads``; ``projection: jvp/vjp``: :func:`gsu_jax.per_example.per_example_projected_mean` (no
  per-example gradient is ever stored);
* ``torch.func vmap(grad)`` and ``torch.compile`` of it (where torch is installed; ``torch.compile`` in ``--full``).

Correctness before timing: ``vmap(grad)`` is checked against ``jax.grad`` of single examples and its mean against
``jax.grad`` of the batch-mean loss; every other gradient row against ``vmap(grad)``; both projections against the
projection computed directly from the checked gradients; torch against JAX on identical weights, inputs and noise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench.common import Budget, Report, Section, SectionTimeout, Target
from gsu_jax import io

# Diagnostic row: the same vmap(grad), returned in the layout XLA computes it in (no transposing copy). Not a
# drop-in variant: such arrays must be consumed by computations compiled for their format (see
# common.device_relative_error), so it is left out of the target's "best generic" and only measures the copy.
AUTO_ROW = "vmap(grad), AUTO output layout (diagnostic)"


def build(model: str):
    """``(graphdef, params, loss_fn, description)`` for a benchmark model name."""
    from flax import nnx

    from gsu_jax.losses import negative_elbo
    from gsu_jax.models import MLPVAE, ConvVAE

    if model == "mlp_vae":
        graphdef, params = nnx.split(MLPVAE(hidden=400, latent_dim=20, rngs=nnx.Rngs(0)))
        description = "MLP VAE 784-400-20"
    elif model == "conv_vae":
        graphdef, params = nnx.split(ConvVAE(rngs=nnx.Rngs(0)))
        description = "conv VAE 28x28x1, 32-64 ch, latent 16"
    else:
        raise ValueError(f"unknown benchmark model {model!r}; allowed: mlp_vae, conv_vae")
    return graphdef, params, negative_elbo(graphdef), description


def latent_dim_of(params: Any) -> int:
    from bench.torch_reference import named_leaves

    return int(named_leaves(params)["mean_head.bias"].shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# The hand-written MLP VAE per-example gradients


def mlp_vae_per_example_grads(params: Any, batch: dict, keys: jax.Array) -> Any:
    """Per-example gradients of the MLP VAE's negative ELBO, kernels as broadcast outer products.

    One forward and one backward pass over the batch give every layer's input ``a_i`` and the gradient of example
    ``i``'s loss with respect to that layer's output, ``delta_i`` (a zero "probe" added to each layer output is
    differentiated: examples are independent, so the gradient of the summed loss at probe row ``i`` is exactly
    ``d loss_i / d out_i``). Then ``grad kernel_i = a_i delta_i^T`` and ``grad bias_i = delta_i``.

    Returns:
      a tree like ``params`` with a leading axis ``B`` (the layout of ``per_example_grads``).
    """
    import optax

    from bench.torch_reference import named_leaves

    p = named_leaves(params)
    names = list(p)
    treedef = jax.tree_util.tree_structure(params)
    images = batch["image"]
    size = images.shape[0]
    x = images.reshape(size, -1)
    latent = p["mean_head.bias"].shape[-1]
    eps = jax.vmap(lambda k: jax.random.normal(k, (latent,), x.dtype))(keys)
    layers = ("encoder_hidden", "mean_head", "logvar_head", "decoder_hidden", "decoder_output")

    def dense(name, inputs, probes):
        return inputs @ p[f"{name}.kernel"] + p[f"{name}.bias"] + probes[name]

    def summed_loss(probes):
        h = jax.nn.relu(dense("encoder_hidden", x, probes))
        mean, logvar = dense("mean_head", h, probes), dense("logvar_head", h, probes)
        z = mean + jnp.exp(0.5 * logvar) * eps
        h2 = jax.nn.relu(dense("decoder_hidden", z, probes))
        logits = dense("decoder_output", h2, probes)
        recon = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x))
        kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)
        return recon + kl, {
            "encoder_hidden": x,
            "mean_head": h,
            "logvar_head": h,
            "decoder_hidden": z,
            "decoder_output": h2,
        }

    probes = {name: jnp.zeros((size, p[f"{name}.bias"].shape[-1]), x.dtype) for name in layers}
    deltas, inputs = jax.grad(summed_loss, has_aux=True)(probes)
    grads = {}
    for name in layers:
        grads[f"{name}.kernel"] = inputs[name][:, :, None] * deltas[name][:, None, :]
        grads[f"{name}.bias"] = deltas[name]
    return jax.tree_util.tree_unflatten(treedef, [grads[name] for name in names])


# ----------------------------------------------------------------------------------------------------------------
# HLO summary (the explanation aid for the vmap(grad) vs torch.compile gap)


def hlo_report(variants: dict[str, Any], args: tuple, *, floor_bytes: int) -> str:
    """Text file: a summary per variant (counts, large writes, bytes written vs the floor), then the full optimised
    HLO of each variant."""
    parts = [
        "Optimised HLO of the per-example gradient variants (entry computation summary, then full text).",
        f"Floor: the per-example gradients themselves, {floor_bytes / 1e9:.3f} GB written once.",
        "",
    ]
    texts = {}
    for name, jitted in variants.items():
        try:
            compiled = jitted.lower(*args).compile()
            text = compiled.as_text()
        except Exception as error:  # noqa: BLE001 - the file says why a variant is missing
            parts.append(f"== {name}: could not compile: {type(error).__name__}: {error}")
            continue
        texts[name] = text
        summary = common.hlo_summary(text)
        parts += [
            f"== {name}",
            f"entry ops: {summary['entry_ops']}",
            f"fusion kinds: {summary['fusion_kinds']}",
            f"custom calls: {summary['custom_calls']}",
            f"bytes written by entry instructions: {summary['entry_bytes_written'] / 1e9:.3f} GB "
            f"({summary['entry_bytes_written'] / floor_bytes:.2f}x the floor)",
            "large outputs (>= 1M elements):",
            *[f"   {item}" for item in summary["large_outputs"]],
            "",
        ]
    for name, text in texts.items():
        parts += [f"######## full optimised HLO: {name}", text, ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def copy_bandwidth_gbs(cfg) -> float:
    """Device memory bandwidth (bytes read + written per second) of a large elementwise op, for the % column."""
    x = jnp.ones((cfg.bandwidth_elements,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001 + 1.0)
    timing = common.measure(lambda: f(x), sync=common.jax_sync, warmup=3, reps=10, pipelined=False)
    return 2 * x.nbytes / (timing.median_ms * 1e-3) / 1e9


def _auto_layout_jit(fn):
    from jax.experimental.layout import Format, Layout

    return jax.jit(fn, out_shardings=Format(Layout.AUTO))


def _conflict_projection_from_grads(grads, direction):
    """``mean_i P^c_d(-g_i)`` (flat) computed directly from materialised gradients, leaf by leaf (no
    ``B x |params|`` copy): the check of both projection rows."""

    @jax.jit
    def project(grads, direction):
        grad_leaves, d_leaves = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)
        size = grad_leaves[0].shape[0]
        inner = -sum(
            jnp.matmul(g.reshape(size, -1), d.reshape(-1), precision=jax.lax.Precision.HIGHEST)
            for g, d in zip(grad_leaves, d_leaves)
        )
        squared = sum(jnp.sum(jnp.square(d)) for d in d_leaves)
        coefficient = jnp.mean(jnp.where(inner < 0, inner / squared, 0.0))
        return jnp.concatenate(
            [(-common.leading_mean(g) - coefficient * d).reshape(-1) for g, d in zip(grad_leaves, d_leaves)]
        )

    return project(grads, direction)


def run(report: Report, cfg, budget: Budget, torch_device: str | None) -> None:
    """Measures the per-example table (and writes the HLO explanation file)."""
    import jax.flatten_util  # noqa: F401 - used by _conflict_projection_from_grads

    from gsu_jax import per_example, projections

    bandwidth = copy_bandwidth_gbs(cfg)
    rows: list[dict[str, Any]] = []
    notes = [
        f"Measured device memory bandwidth (elementwise op over {cfg.bandwidth_elements * 4 / 1e6:.0f} MB, "
        f"read + write): {bandwidth:.0f} GB/s; 'GB/s' = per-example gradient bytes written / time."
    ]
    tight = 1e-5 if jax.default_backend() == "cpu" else common.default_precision_tolerance()

    for model, batch_sizes in cfg.per_example_models.items():
        graphdef, params, loss_fn, description = build(model)
        num_params = common.parameter_count(params)
        # The batch the GPU target is about goes first, so a short budget still judges it.
        for size in sorted(batch_sizes, key=lambda b: (b != cfg.hlo_batch, b)):
            base = {"model": description, "B": size}
            if not budget.allows(cfg.per_example_row_s * (4 if size >= 1024 else 1)):
                rows.append(
                    {**base, "name": "all rows", "status": f"skipped: time budget ({budget.left():.0f} s left)"}
                )
                continue
            batch_np, _ = common.image_batch(size, seed=size)
            batch = jax.device_put(batch_np)
            keys = jax.random.split(jax.random.key(size), size)
            grad_bytes = size * num_params * 4

            def timed(name, fn, args, *, check=None, materialises=True, extra=None):
                row = {**base, "name": name}
                try:
                    if not budget.allows(cfg.per_example_row_s):
                        raise SectionTimeout(f"time budget ({budget.left():.0f} s left)")
                    compiled = fn.lower(*args).compile() if hasattr(fn, "lower") else None
                    runner = compiled if compiled is not None else fn
                    out = runner(*args)
                    if check is not None:
                        row["rel_err"] = check(out)
                    del out
                    timing = common.measure(
                        lambda: runner(*args),
                        sync=common.jax_sync,
                        warmup=cfg.pe_warmup,
                        reps=cfg.pe_reps,
                        pipelined=False,
                    )
                    row.update(timing.summary(), status="ok")
                    row["examples_per_s"] = size / (timing.median_ms * 1e-3)
                    if compiled is not None:
                        mem = common.compiled_memory_bytes(compiled)
                        row["memory_mb"] = mem / 1e6 if mem is not None else None
                    if materialises:
                        row["gb_per_s"] = grad_bytes / (timing.median_ms * 1e-3) / 1e9
                        row["pct_bandwidth"] = 100 * row["gb_per_s"] / bandwidth
                    row.update(extra or {})
                except Exception as error:  # noqa: BLE001
                    common.row_failure(row, error)
                rows.append(row)
                return row

            # Reference: vmap(grad), checked against single-example grads and the batch-mean gradient.
            vmap_grad = jax.jit(lambda p, b, k: per_example.per_example_grads(loss_fn, p, b, k))
            args = (params, batch, keys)
            reference = {}

            def check_vmap(out):
                first = jax.tree_util.tree_map(lambda leaf: leaf[:2], out)
                with jax.default_matmul_precision("highest"):  # references: full float32 (GPU default: TF32)
                    singles = [
                        jax.grad(loss_fn)(params, jax.tree_util.tree_map(lambda x: x[i], batch), keys[i])
                        for i in range(2)
                    ]
                    mean_grad = jax.jit(
                        jax.grad(lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, batch, keys)))
                    )(params)
                want = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), *singles)
                err1 = common.check_close("vmap(grad) vs single-example grad", first, want, rtol=tight)
                err2 = common.check_close_device(
                    "mean of vmap(grad) vs grad of mean loss",
                    jax.tree_util.tree_map(common.leading_mean, out),
                    mean_grad,
                    rtol=common.default_precision_tolerance(),
                )
                reference["grads"] = out
                return max(err1, err2)

            timed("vmap(grad)", vmap_grad, args, check=check_vmap)
            if "grads" not in reference:
                continue  # nothing else can be checked

            def against_reference(label, rtol=tight):
                return lambda out: common.check_close_device(label, out, reference["grads"], rtol=rtol)

            try:
                auto = _auto_layout_jit(lambda p, b, k: per_example.per_example_grads(loss_fn, p, b, k))
            except Exception as error:  # noqa: BLE001 - API missing on this JAX: the row says so
                rows.append(common.row_failure({**base, "name": AUTO_ROW}, error))
            else:
                timed(AUTO_ROW, auto, args, check=against_reference("AUTO layout vs vmap(grad)"))
            if cfg.gpu_rows:
                with jax.default_matmul_precision("highest"):
                    highest = jax.jit(lambda p, b, k: per_example.per_example_grads(loss_fn, p, b, k))
                    timed(
                        "vmap(grad), precision highest",
                        highest,
                        args,
                        check=against_reference("highest vs vmap(grad)", rtol=common.default_precision_tolerance()),
                    )
            chunk = cfg.chunk_size if size > cfg.chunk_size else max(size // 4, 1)
            chunked = jax.jit(lambda p, b, k: per_example.per_example_grads(loss_fn, p, b, k, chunk_size=chunk))
            timed(f"chunked (chunk_size={chunk})", chunked, args, check=against_reference("chunked vs vmap(grad)"))
            if model == "mlp_vae":
                timed(
                    "hand-written outer products (MLP only)",
                    jax.jit(mlp_vae_per_example_grads),
                    args,
                    check=against_reference("hand-written vs vmap(grad)"),
                )

            # The per-example projection, materialised vs jvp/vjp.
            direction = jax.tree_util.tree_map(
                lambda leaf: jax.random.normal(jax.random.key(7), leaf.shape, leaf.dtype), params
            )
            want = _conflict_projection_from_grads(reference["grads"], direction)

            @jax.jit
            def materialised(p, b, k, d):
                grads = per_example.per_example_grads(loss_fn, p, b, k)
                negated = jax.tree_util.tree_map(jnp.negative, grads)
                return projections.mean_normal_plane_projection(negated, d, only_on_conflict=True)

            @jax.jit
            def jvp_vjp(p, b, k, d):
                return per_example.per_example_projected_mean(loss_fn, p, b, k, d, scale=-1.0, only_on_conflict=True)

            def check_projection(label):
                return lambda out: common.check_close_device(
                    label, jax.flatten_util.ravel_pytree(out)[0], want, rtol=common.default_precision_tolerance()
                )

            timed(
                "projection: materialised",
                materialised,
                args + (direction,),
                check=check_projection("materialised projection"),
                materialises=False,
            )
            timed(
                "projection: jvp/vjp",
                jvp_vjp,
                args + (direction,),
                check=check_projection("jvp/vjp projection"),
                materialises=False,
            )

            if torch_device is not None:
                # torch is checked on the first examples; JAX's full reference is released first (device memory).
                first = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[:8]), reference["grads"])
                reference.clear()
                _torch_rows(
                    model,
                    params,
                    batch_np,
                    keys,
                    first,
                    size=size,
                    base=base,
                    cfg=cfg,
                    budget=budget,
                    torch_device=torch_device,
                    rows=rows,
                    grad_bytes=grad_bytes,
                    bandwidth=bandwidth,
                )
            if model == "mlp_vae" and size == cfg.hlo_batch and cfg.hlo_file:
                variants = {"vmap(grad)": vmap_grad, "hand-written outer products": jax.jit(mlp_vae_per_example_grads)}
                try:
                    variants[AUTO_ROW] = _auto_layout_jit(
                        lambda p, b, k: per_example.per_example_grads(loss_fn, p, b, k)
                    )
                except Exception:  # noqa: BLE001 - the row above already reports the missing API
                    pass
                io.write_text(cfg.hlo_file, hlo_report(variants, args, floor_bytes=grad_bytes))
                notes.append(f"HLO op counts and large writes of the variants at B={size}: {cfg.hlo_file}")
            reference.clear()

    model_order = {name: i for i, name in enumerate(dict.fromkeys(r["model"] for r in rows))}
    rows.sort(key=lambda r: (model_order[r["model"]], r["B"]))  # stable: methods keep their order
    section = Section(
        key="per_example",
        title="Per-example gradients: throughput and memory",
        columns=[
            ("model", "model"),
            ("B", "B"),
            ("name", "method"),
            ("median_ms", "median ms"),
            ("iqr_ms", "IQR ms"),
            ("examples_per_s", "examples/s"),
            ("memory_mb", "peak MB"),
            ("gb_per_s", "GB/s"),
            ("pct_bandwidth", "% bandwidth"),
            ("rel_err", "rel. err"),
            ("status", "status"),
        ],
        rows=rows,
        notes=notes
        + [
            f"Median of {cfg.pe_reps} synchronised calls after {cfg.pe_warmup} warm-ups. peak MB: JAX = XLA's buffer "
            "assignment of the compiled function (arguments + outputs + temporaries); torch on CUDA = "
            "max_memory_allocated during the call minus what was allocated before.",
            "The projection rows compute mean_i P^c_d(-grad l(x_i)) for a fixed random d; the jvp/vjp route never "
            "stores a per-example gradient.",
            "Diffusion U-Net: not in the library yet, so not measured.",
        ],
        targets=_targets(rows, batch=cfg.hlo_batch) if cfg.gpu_rows else [],
    )
    report.add(section)


def _torch_rows(
    model,
    params,
    batch_np,
    keys,
    reference_first,
    *,
    size,
    base,
    cfg,
    budget,
    torch_device,
    rows,
    grad_bytes,
    bandwidth,
):
    import torch

    from bench import torch_reference as tr

    latent = latent_dim_of(params)
    if model == "mlp_vae":
        module = tr.build_mlp_vae(hidden=400, latent_dim=latent)
    else:
        module = tr.build_conv_vae(latent_dim=latent)
    module = module.to(torch_device)
    tr.load_jax_params(module, params)
    x = tr.to_torch_input(batch_np["image"], module, torch_device)
    eps_np = np.array(jax.vmap(lambda k: jax.random.normal(k, (latent,)))(keys))
    eps = torch.from_numpy(eps_np).to(torch_device)
    fn, torch_params = tr.per_example_grad_fn(module)
    sync = common.make_torch_sync(torch_device)
    want = tr.jax_grads_in_torch_layout(module, reference_first)
    check_count = next(iter(want.values())).shape[0]
    on_cuda = torch_device.startswith("cuda")
    # torch's float32 matmuls are full precision by default, its cuDNN convolutions TF32 on GPU.
    rtol = 1e-4 if not on_cuda else 1e-2

    variants = [("torch.func vmap(grad)", fn)]
    if size in cfg.torch_compile_batches.get(model, ()):
        variants.append(("torch.compile(vmap(grad))", torch.compile(fn)))
    for name, function in variants:
        row = {**base, "name": name}
        try:
            estimate = cfg.torch_compile_s if "compile" in name else cfg.per_example_row_s
            if not budget.allows(estimate):
                raise SectionTimeout(f"time budget ({budget.left():.0f} s left)")
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            out = function(torch_params, x, eps)
            sync(out)
            if on_cuda:
                row["memory_mb"] = (torch.cuda.max_memory_allocated() - before) / 1e6
            got = {k: v[:check_count].detach().cpu().numpy() for k, v in out.items()}
            row["rel_err"] = common.check_close(f"{name} vs JAX vmap(grad)", got, {k: want[k] for k in got}, rtol=rtol)
            del out
            timing = common.measure(
                lambda: function(torch_params, x, eps),
                sync=sync,
                warmup=cfg.pe_warmup,
                reps=cfg.pe_reps,
                pipelined=False,
            )
            row.update(timing.summary(), status="ok")
            row["examples_per_s"] = size / (timing.median_ms * 1e-3)
            row["gb_per_s"] = grad_bytes / (timing.median_ms * 1e-3) / 1e9
            row["pct_bandwidth"] = 100 * row["gb_per_s"] / bandwidth
        except Exception as error:  # noqa: BLE001
            common.row_failure(row, error)
        rows.append(row)


def _targets(rows: list[dict[str, Any]], *, batch: int) -> list[Target]:
    """The GPU target on per-example gradients at ``batch`` (1024 in ``--full``), MLP VAE."""
    ok = [r for r in rows if r.get("status") == "ok" and r["B"] == batch and r["model"].startswith("MLP")]
    by_name = {r["name"]: r for r in ok}
    compiled = by_name.get("torch.compile(vmap(grad))")
    jax_rows = [r for r in ok if not r["name"].startswith(("torch", "projection")) and r["name"] != AUTO_ROW]
    if not compiled or not jax_rows:
        return [
            Target(
                f"GPU: per-example grads at B={batch} >= as fast as torch.compile(torch.func.vmap(grad))",
                None,
                f"a row is missing (torch or the B={batch} MLP rows)",
            )
        ]
    plain = by_name.get("vmap(grad)")
    generic = [r for r in jax_rows if "MLP only" not in r["name"]]
    best_generic = min(generic, key=lambda r: r["median_ms"]) if generic else None
    best = min(jax_rows, key=lambda r: r["median_ms"])
    detail = (
        f"torch.compile {compiled['median_ms']:.3f} ms; plain vmap(grad) {plain['median_ms']:.3f} ms; "
        if plain
        else f"torch.compile {compiled['median_ms']:.3f} ms; "
    )
    if best_generic:
        detail += f"best generic JAX ({best_generic['name']}) {best_generic['median_ms']:.3f} ms; "
    detail += f"best JAX ({best['name']}) {best['median_ms']:.3f} ms"
    if AUTO_ROW in by_name:
        detail += f"; diagnostic without the transposing output copy {by_name[AUTO_ROW]['median_ms']:.3f} ms"
    return [
        Target(
            f"GPU: plain vmap(grad) at B={batch} >= as fast as torch.compile",
            plain is not None and plain["median_ms"] <= compiled["median_ms"],
            detail,
        ),
        Target(
            f"GPU: best generic JAX per-example grads at B={batch} >= as fast as torch.compile",
            best_generic is not None and best_generic["median_ms"] <= compiled["median_ms"],
            detail,
        ),
    ]
