"""The one mesh abstraction: data-parallel (and optionally model-sharded) steps on ``jax.sharding``.

Every multi-device and multi-host path of the project goes through this module; nothing else builds a mesh or
places arrays on devices.

* A :func:`make_mesh` ``Mesh`` has two axes, ``("data", "model")``: batches are split along ``data``
  (:func:`batch_sharding`, :func:`shard_batch`); parameters and optimizer state are replicated, or with
  ``model > 1`` each large enough leaf is split along one axis over ``model`` (:func:`param_shardings`).
* A step is jitted with explicit ``in_shardings``/``out_shardings`` (:func:`jit_sharded`,
  :func:`shard_method_step`). XLA's SPMD partitioner then splits everything computed per example: a method's
  per-example losses, gradients and jvps are ``vmap``-ped over the batch axis, so each device computes only its
  own examples, and the batch means become cross-device reductions. The step's maths is unchanged, so a sharded
  step equals the single-device step up to float32 summation order.
* Multi-host (multi-controller SPMD): every process runs the same program. :func:`initialize_distributed` joins
  the processes (``jax.distributed``), the mesh then spans every process's devices, :func:`put` and
  :func:`shard_batch` build global arrays from values each process holds (``jax.make_array_from_callback`` /
  ``jax.make_array_from_process_local_data``), :func:`localize` brings a replicated result back to this process
  for host-side work, and :func:`is_main_process` gates files and logs to process 0.

No ``shard_map`` is needed: the steps are written for one example and batched with ``vmap``, which the
partitioner shards by itself (inside ``shard_map`` the gradients of replicated parameters would be summed over
devices unless made device-varying first).

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> mesh = make_mesh(data=-1)                  # every device on the data axis
    >>> batch = shard_batch({"x": np.ones((8 * mesh.shape["data"], 3), np.float32)}, mesh)
    >>> params = put({"w": jnp.ones(3)}, replicated(mesh))
    >>> step = jit_sharded(lambda p, b: jnp.mean(b["x"] @ p["w"]), in_shardings=(replicated(mesh),
    ...                    batch_sharding(mesh)), out_shardings=replicated(mesh))
    >>> float(step(params, batch))
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gsu_jax.schema import HOST_PORT_ALLOWED, ConfigError, is_host_port

__all__ = [
    "DATA_AXIS",
    "MIN_SHARDED_SIZE",
    "MODEL_AXIS",
    "barrier",
    "batch_sharding",
    "check_batch_size",
    "initialize_distributed",
    "initialize_from_config",
    "is_main_process",
    "jit_sharded",
    "join_hosts",
    "localize",
    "make_mesh",
    "mesh_from_config",
    "param_shardings",
    "put",
    "replicated",
    "run_mesh",
    "shard_batch",
    "shard_method_step",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Leaves with fewer elements than this stay replicated on a model axis: splitting biases and scales saves no
# memory worth the collectives it adds.
MIN_SHARDED_SIZE = 4096


# ------------------------------------------------------------------------------------------- the mesh


def make_mesh(*, data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh of ``data * model`` devices.

    Args:
        data: devices along the data axis; ``-1`` = every device not used by the model axis
            (``len(devices) // model``).
        model: devices along the model axis (parameters of large leaves are split over it).
        devices: the devices to use, in order (default: ``jax.devices()``, every process's devices). The first
            ``data * model`` are used.

    Returns:
        ``jax.sharding.Mesh`` of shape ``{"data": data, "model": model}``.

    Raises:
        ValueError: ``data`` or ``model`` not a positive integer (or ``-1`` for ``data``), ``model`` not dividing
            the device count when ``data=-1``, or more devices asked for than there are.

    Example:
        >>> dict(make_mesh(data=1, model=1).shape)
        {'data': 1, 'model': 1}
    """
    for name, value, allowed in (
        ("data", data, "an integer >= 1 or -1 (all devices)"),
        ("model", model, "an integer >= 1"),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or (value < 1 and not (name == "data" and value == -1))
        ):
            raise ValueError(f"mesh {name}={value!r} is invalid; allowed: {allowed}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list")
    count = len(devices)
    if data == -1:
        if count % model:
            raise ValueError(
                f"mesh model={model} does not divide the {count} devices; with data=-1 the model axis "
                f"must divide the device count (allowed: one of {_divisors(count)})"
            )
        data = count // model
    if data * model > count:
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices but only {count} are "
            f"available ({devices[0].platform}); allowed: data * model <= {count}"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def mesh_from_config(mesh: Mapping[str, int]) -> Mesh | None:
    """The mesh a run's ``config.mesh`` (``{"data": d, "model": m}``) asks for, or ``None`` for one device.

    ``None`` (one device in all, e.g. the default ``data=1, model=1``, or ``data=-1`` on a one-device machine) means
    the plain single-device programs, bit for bit the results of a run without a mesh.

    Raises:
        ValueError: see :func:`make_mesh`.
    """
    built = make_mesh(data=mesh["data"], model=mesh["model"])
    return None if built.size == 1 else built


def initialize_from_config(distributed: Mapping[str, Any]) -> None:
    """:func:`initialize_distributed` as a run's ``config.distributed`` asks (nothing when ``enabled`` is false).

    ``coordinator_address`` ``''``, ``num_processes`` 0 and ``process_id`` -1 mean auto-detection.
    """
    if not distributed["enabled"]:
        return
    explicit = distributed["coordinator_address"] != ""
    initialize_distributed(
        coordinator_address=distributed["coordinator_address"] if explicit else None,
        num_processes=distributed["num_processes"] if explicit else None,
        process_id=distributed["process_id"] if explicit else None,
    )


def join_hosts(values: Mapping[str, Any]) -> None:
    """Joins the processes of a run's ``config.distributed`` (nothing when not enabled; again: a no-op).

    Raises:
        ConfigError: ``config.distributed`` cannot be honoured (one line naming it).
    """
    try:
        initialize_from_config(values["distributed"])
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"config.distributed: {err}") from err
    if jax.process_count() > 1:
        # Safe points would need every process to agree on a signal; several processes take its default action.
        from gsu_jax import interrupts

        interrupts.leave_to_default()


def run_mesh(values: Mapping[str, Any], batch_fields: Sequence[str]) -> Mesh | None:
    """The mesh of a validated run config (``train.py``'s and ``unlearn.py``'s), ``None`` for one device.

    Joins the hosts first (:func:`join_hosts`), builds ``config.mesh`` (:func:`mesh_from_config`) and refuses each
    batch size named by ``batch_fields`` (fields of ``values``) that the data axis cannot split.

    Raises:
        ConfigError: one line naming ``config.distributed``, ``config.mesh`` or the batch field.
    """
    join_hosts(values)
    try:
        mesh = mesh_from_config(values["mesh"])
    except ValueError as err:
        raise ConfigError(f"config.mesh={values['mesh']!r}: {err}") from err
    if mesh is not None:
        for field in batch_fields:
            try:
                check_batch_size(values[field], mesh, field=f"config.{field}")
            except ValueError as err:
                raise ConfigError(str(err)) from err
    return mesh


def _divisors(count: int) -> list[int]:
    return [d for d in range(1, count + 1) if count % d == 0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, everything else replicated: ``NamedSharding(mesh, P("data"))``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: ``NamedSharding(mesh, P())``."""
    return NamedSharding(mesh, P())


def _leaf_spec(shape: tuple[int, ...], model: int, min_size: int) -> P:
    if model == 1 or math.prod(shape) < min_size:
        return P()
    divisible = [axis for axis, size in enumerate(shape) if size % model == 0]
    if not divisible:
        return P()
    # The largest divisible axis (the first of equals): the biggest per-device saving for one collective.
    axis = max(divisible, key=lambda a: (shape[a], -a))
    return P(*([None] * axis + [MODEL_AXIS]))


def param_shardings(tree: Any, mesh: Mesh, *, min_size: int = MIN_SHARDED_SIZE) -> Any:
    """Shardings of a parameter (or optimizer-state) pytree: replicated, or split over the model axis.

    With ``mesh.shape["model"] == 1`` every leaf is replicated. Otherwise a leaf of at least ``min_size`` elements
    is split over ``model`` along its largest axis that the model axis divides; other leaves are replicated. The
    rule depends on the shape alone, so an Adam moment is sharded exactly like its parameter.

    Args:
        tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. an ``nnx.State``, an optax state).
        mesh: a :func:`make_mesh` mesh.
        min_size: smallest leaf (in elements) that is split.

    Returns:
        A pytree of ``NamedSharding`` with the structure of ``tree``.

    Example:
        >>> mesh = make_mesh(data=1, model=1)
        >>> param_shardings({"w": jnp.ones((4, 4))}, mesh)["w"].spec == jax.sharding.PartitionSpec()
        True
    """
    model = mesh.shape[MODEL_AXIS]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, _leaf_spec(tuple(np.shape(leaf)), model, min_size)), tree)


def check_batch_size(batch_size: int, mesh: Mesh, *, field: str = "batch_size") -> None:
    """Refuses a batch the data axis cannot split evenly.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``mesh.shape["data"]`` (the message names ``field`` and
            the nearest allowed sizes).
    """
    data = mesh.shape[DATA_AXIS]
    if batch_size % data:
        below, above = data * (batch_size // data), data * (batch_size // data + 1)
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"{field}={batch_size} is not divisible by the mesh's data axis ({data} devices); "
            f"allowed: a multiple of {data}, e.g. {nearest}"
        )


# ------------------------------------------------------------------------------------------- placing arrays


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _put_leaf(leaf: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if _is_key(leaf):
        # Typed PRNG keys travel as their raw data and are re-wrapped with the same implementation.
        return jax.random.wrap_key_data(_put_leaf(jax.random.key_data(leaf), sharding), impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
    host = np.asarray(leaf)
    # Every process holds the same value; each device takes its slice (works for one process and for many).
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: Any, shardings: Any) -> Any:
    """Places a pytree whose value every process holds identically onto the mesh.

    One process: ``jax.device_put``. Several: each device's slice is cut from the process's own copy
    (``jax.make_array_from_callback``), so no data crosses hosts; arrays that already span the mesh are resharded
    on device instead.

    Args:
        tree: pytree of arrays (numpy, local ``jax.Array``, typed PRNG keys or global arrays).
        shardings: one ``Sharding`` for every leaf, or a pytree of them matching ``tree``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(_put_leaf, tree, shardings)


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """A host batch as global arrays split along their leading axis over the mesh's ``data`` axis.

    Args:
        batch: pytree of numpy arrays with a common leading (batch) axis, e.g. ``{"image": f32[B, H, W, C],
            "label": i32[B]}``.
        mesh: a :func:`make_mesh` mesh.
        process_local: ``False``: ``batch`` is the global batch, the same on every process (each device takes its
            rows). ``True``: ``batch`` holds only this process's rows (a per-process input pipeline); the global
            batch is the processes' batches in process order (``jax.make_array_from_process_local_data``).

    Returns:
        The batch as ``jax.Array`` leaves with sharding :func:`batch_sharding`.

    Raises:
        ValueError: leaves of different leading sizes, or a global batch the data axis does not divide.
    """
    leaves = jax.tree.leaves(batch)
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"shard_batch needs leaves with one common leading (batch) axis, got sizes {sorted(map(str, sizes))}"
        )
    size = sizes.pop()
    global_size = size * jax.process_count() if process_local else size
    check_batch_size(global_size, mesh, field="batch size")
    sharding = batch_sharding(mesh)
    if process_local:
        return jax.tree.map(
            lambda leaf: jax.make_array_from_process_local_data(
                sharding, np.asarray(leaf), (global_size,) + tuple(np.shape(leaf)[1:])
            ),
            batch,
        )
    return put(batch, sharding)


def localize(tree: Any) -> Any:
    """A pytree of global arrays as single-device arrays on this process's first local device.

    For host-side work (evaluation, sampling, files) that every process does redundantly with its own copy:
    a fully replicated array costs no transfer; a model-sharded one is gathered first (a collective: every
    process must call this in the same order). Leaves that are not ``jax.Array`` are returned as they are.
    """
    device = jax.local_devices()[0]

    def one(leaf: Any) -> Any:
        if _is_key(leaf):
            return jax.random.wrap_key_data(one(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        if not isinstance(leaf, jax.Array):
            return leaf
        if not leaf.is_fully_replicated:
            mesh = getattr(leaf.sharding, "mesh", None)
            if mesh is None:
                raise ValueError(f"localize: cannot gather an array with sharding {leaf.sharding}")
            leaf = jax.jit(lambda x: x, out_shardings=replicated(mesh))(leaf)
        return jax.device_put(leaf.addressable_data(0), device)

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------------------------- sharded steps


def jit_sharded(
    fn: Callable[..., Any],
    *,
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: int | Sequence[int] = (),
    static_argnums: int | Sequence[int] = (),
) -> Callable:
    """``jax.jit(fn)`` with explicit input and output shardings (the only way steps are compiled for a mesh).

    The shardings are pytree prefixes of the arguments / outputs (see ``jax.jit``). Arguments that are not yet
    on the mesh are placed by the call itself (single process); in a multi-process run pass global arrays
    (:func:`put`, :func:`shard_batch`).
    """
    return jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=donate_argnums,
        static_argnums=static_argnums,
    )


def shard_method_step(
    step: Callable[..., Any], mesh: Mesh, params: Any, opt_state: Any, *, min_size: int = MIN_SHARDED_SIZE
) -> tuple[Callable[..., Any], Any, Any]:
    """Jits an unlearning method's step for ``mesh``: batches split over ``data``, state as :func:`param_shardings`.

    ``step(params, opt_state, forget_batch, retain_batch, key) -> (params, opt_state, metrics)`` (the one step
    signature of :mod:`gsu_jax.methods`).

    Args:
        step: the method's step (pure, jit-able).
        mesh: a :func:`make_mesh` mesh.
        params, opt_state: example values (arrays or ``ShapeDtypeStruct``) that fix the state's shardings.
        min_size: see :func:`param_shardings`.

    Returns:
        ``(jitted_step, params_shardings, opt_state_shardings)``; place the initial state with :func:`put` and
        the batches with :func:`shard_batch`. Metrics come back replicated.
    """
    params_sharding = param_shardings(params, mesh, min_size=min_size)
    state_sharding = param_shardings(opt_state, mesh, min_size=min_size)
    batch, rep = batch_sharding(mesh), replicated(mesh)
    jitted = jit_sharded(
        step,
        in_shardings=(params_sharding, state_sharding, batch, batch, rep),
        out_shardings=(params_sharding, state_sharding, rep),
    )
    return jitted, params_sharding, state_sharding


# ------------------------------------------------------------------------------------------- multi-host

_initialized = False


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a multi-host run (``jax.distributed.initialize``); call before any other JAX use.

    Without arguments the cluster is auto-detected (Cloud TPU pod slices, SLURM, Open MPI: JAX reads the
    environment those launchers set). On a cluster JAX cannot detect, give all three of ``coordinator_address``
    (``host:port`` of process 0), ``num_processes`` and ``process_id``. Calling it again in the same process is
    a no-op.

    Raises:
        ValueError: only some of the explicit arguments given, or out of range (before anything is started).
        RuntimeError: JAX was already used in this process, or no cluster was detected (the message says what
            to pass instead).
    """
    global _initialized
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit) and any(value is None for value in explicit):
        raise ValueError(
            "initialize_distributed: give all of coordinator_address, num_processes and process_id, "
            f"or none of them (auto-detection); got {coordinator_address=}, {num_processes=}, "
            f"{process_id=}"
        )
    if coordinator_address is not None:
        if not is_host_port(coordinator_address):
            raise ValueError(f"coordinator_address={coordinator_address!r} is invalid; allowed: {HOST_PORT_ALLOWED}")
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes={num_processes!r} is invalid; allowed: an integer >= 1")
        if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id!r} is invalid; allowed: an integer in [0, {num_processes})")
    if _initialized:
        return
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
    except ValueError as err:
        raise RuntimeError(
            f"jax.distributed could not detect a cluster ({err}); outside SLURM, Open MPI or a "
            "Cloud TPU pod, give coordinator_address, num_processes and process_id"
        ) from err
    _initialized = True


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op in a one-process run).

    Needed wherever processes read the disk and then write it: a process that is ahead must not change what a
    slower one is still deciding from (orbax's own synchronisation points must be reached in the same order).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_process_value(flag: bool) -> bool:
    """Process 0's ``flag``, on every process (the flag itself in a one-process run): lets every process act on a
    decision only process 0 can make, such as whether it could lock the workdir."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def is_main_process() -> bool:
    """Whether this is process 0 (the one that writes reports, logs and images)."""
    return jax.process_index() == 0
