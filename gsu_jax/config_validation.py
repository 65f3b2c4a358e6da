"""``train.py``'s config: its schema (:data:`TRAIN_SCHEMA`), the parallel fields both programs share, the checks
between fields, and loading config files.

The machinery (:class:`~gsu_jax.schema.Field`, predicates, one-line refusals) is :mod:`gsu_jax.schema`'s; this
module holds what ``train.py``'s fields are and what they allow. Scopes are how a checkpoint decides whether a
workdir may be resumed under a new config: only fields in scope for a role must match (``run`` fields such as the
checkpoint interval never do; ``data`` fields are compared through the fingerprint of the examples a role trains
on, see :mod:`gsu_jax.training`).

Example:
    >>> config = default_train_config()
    >>> config.latent_dim = 16
    >>> validate_train_config(config)["latent_dim"]
    16
    >>> config.latent_dim = 0
    >>> validate_train_config(config)
    Traceback (most recent call last):
    ...
    gsu_jax.schema.ConfigError: config.latent_dim=0 is invalid: allowed: an integer >= 1
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
from collections.abc import Mapping
from typing import Any

import ml_collections

from gsu_jax.models import CLASSIFIER_MODELS, DIFFUSION_MODELS, VAE_MODELS, model_hyperparameters
from gsu_jax.schema import (
    HOST_PORT_ALLOWED,
    ConfigError,
    Field,
    as_mapping,
    at_least,
    did_you_mean,
    dotted_name,
    greater_than,
    is_host_port,
    one_of,
    unknown_key_message,
    validate_config,
    within,
)

__all__ = [
    "PARALLEL_SCHEMA",
    "ROLES",
    "TRAIN_SCHEMA",
    "default_train_config",
    "fields_in_scope",
    "load_config_file",
    "parse_class_list",
    "parse_roles",
    "validate_parallel",
    "validate_train_config",
]

# The trained roles of a train workdir, in training order.
ROLES: tuple[str, ...] = ("generative", "evaluator", "guidance")

_ROLE_SCOPES: dict[str, frozenset[str]] = {
    "generative": frozenset({"all", "generative"}),
    "evaluator": frozenset({"all", "classifier"}),
    "guidance": frozenset({"all", "classifier"}),
}


# ------------------------------------------------------------------------------------------- predicates


def is_data_spec(value: str, *, empty_ok: bool) -> bool:
    """Whether ``value`` has the form of a data spec of :func:`gsu_jax.data.load_dataset`.

    Only the form is checked here (``embedded``, ``idx:<dir>[:<prefix>]``, ``tfds:<name>[:<split>]``); whether the
    files exist is checked when the data is loaded, before any training.
    """
    if value == "":
        return empty_ok
    if value == "embedded":
        return True
    for prefix in ("idx:", "tfds:"):
        if value.startswith(prefix):
            rest = value[len(prefix) :]
            return bool(rest) and not rest.startswith(":") and not rest.endswith(":")
    return False


_DIFFUSION_SCHEDULES = ("cosine", "linear")
_DATA_SPEC_FORMS = "'embedded', 'idx:<dir>[:<prefix>]' or 'tfds:<name>[:<split>]'"


# ------------------------------------------------------------------------------------------- parsers


def parse_class_list(value: str, *, field: str = "exclude_classes") -> tuple[int, ...]:
    """Parses a comma-separated list of distinct class indices (``""`` -> ``()``; ``"1,7"`` -> ``(1, 7)``).

    Raises:
        ConfigError: a token that is not a non-negative integer, or a class given twice.

    Example:
        >>> parse_class_list("1, 7")
        (1, 7)
    """
    if not isinstance(value, str):
        raise ConfigError(f"config.{field}={value!r} is invalid: allowed: a comma-separated list of class indices")
    if not value.strip():
        return ()
    classes = []
    for token in value.split(","):
        token = token.strip()
        if not (token.isascii() and token.isdigit()):  # str.isdigit() also accepts '²', which int() refuses
            raise ConfigError(
                f"config.{field}={value!r} is invalid: {token!r} is not a class index; "
                "allowed: comma-separated non-negative integers, e.g. '1' or '1,7'"
            )
        classes.append(int(token))
    if len(set(classes)) != len(classes):
        raise ConfigError(f"config.{field}={value!r} is invalid: a class is listed twice; list each class once")
    return tuple(classes)


def parse_roles(value: str, *, field: str = "roles") -> tuple[str, ...]:
    """Parses a comma-separated, non-empty list of distinct roles from :data:`ROLES` (returned in ROLES order).

    Raises:
        ConfigError: an empty list, an unknown role (with a "did you mean" hint) or a repeated role.

    Example:
        >>> parse_roles("guidance,generative")
        ('generative', 'guidance')
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"config.{field}={value!r} is invalid: allowed: a comma-separated non-empty subset of {', '.join(ROLES)}"
        )
    names = [token.strip() for token in value.split(",")]
    for name in names:
        if name not in ROLES:
            raise ConfigError(
                f"config.{field}={value!r} is invalid: unknown role {name!r}{did_you_mean(name, ROLES)}; "
                f"allowed: a comma-separated subset of {', '.join(ROLES)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"config.{field}={value!r} is invalid: a role is listed twice; list each role once")
    return tuple(role for role in ROLES if role in names)


# ------------------------------------------------------------------------------------------- devices and hosts

# Fields of how a run is spread over devices and hosts (train.py and unlearn.py); never part of a result.
MESH_DEFAULT = {"data": 1, "model": 1}
DISTRIBUTED_DEFAULT = {"enabled": False, "coordinator_address": "", "num_processes": 0, "process_id": -1}
_MESH_ALLOWED = "{'data': an integer >= 1 or -1 (all devices), 'model': an integer >= 1}"
_DISTRIBUTED_ALLOWED = (
    "{'enabled': True/False, and for a cluster JAX cannot detect: 'coordinator_address': "
    "'host:port', 'num_processes': n >= 1, 'process_id': 0..n-1 (else '', 0, -1: auto-detect)}"
)
PARALLEL_SCHEMA: Mapping[str, Field] = types.MappingProxyType(
    {
        "mesh": Field(
            dict(MESH_DEFAULT),
            dict,
            _MESH_ALLOWED,
            None,
            "run",
            "Device mesh of the training/unlearning steps (gsu_jax.parallel): batches split over 'data' "
            "devices, parameters split over 'model' devices; data=1, model=1 is the single-device run, "
            "data=-1 uses every device.",
        ),
        "distributed": Field(
            dict(DISTRIBUTED_DEFAULT),
            dict,
            _DISTRIBUTED_ALLOWED,
            None,
            "run",
            "Multi-host run (jax.distributed): enabled=True joins the processes, auto-detected on "
            "SLURM / Cloud TPU / Open MPI or from the explicit coordinator fields.",
        ),
    }
)


def validate_parallel(values: Mapping[str, Any], *, prefix: str = "config.") -> dict[str, Any]:
    """Checks the ``mesh`` and ``distributed`` fields (their form; device counts are checked against the devices
    when the mesh is built). Missing fields take their defaults (configs and checkpoints older than them).

    Returns:
        ``{"mesh": {...}, "distributed": {...}}`` with every key present.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or range, or explicit coordinator fields given
            only in part.
    """
    result = {}
    for name, default, allowed in (
        ("mesh", MESH_DEFAULT, _MESH_ALLOWED),
        ("distributed", DISTRIBUTED_DEFAULT, _DISTRIBUTED_ALLOWED),
    ):
        given = values.get(name, default)
        given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else given
        if not isinstance(given, Mapping):
            raise ConfigError(f"{prefix}{name}={given!r} is invalid: allowed: {allowed}")
        for key in given:
            if key not in default:
                raise ConfigError(unknown_key_message(key, default, prefix=f"{prefix}{name}."))
        merged = {**default, **given}
        for key, value in merged.items():
            kind = type(default[key])
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise ConfigError(
                    f"{prefix}{name}.{key}={value!r} is invalid: expected {kind.__name__}; allowed: {allowed}"
                )
        result[name] = merged
    mesh, dist = result["mesh"], result["distributed"]
    if not (mesh["data"] >= 1 or mesh["data"] == -1):
        raise ConfigError(
            f"{prefix}mesh.data={mesh['data']!r} is invalid: allowed: an integer >= 1 or -1 (all devices)"
        )
    if mesh["model"] < 1:
        raise ConfigError(f"{prefix}mesh.model={mesh['model']!r} is invalid: allowed: an integer >= 1")
    explicit = (dist["coordinator_address"] != "", dist["num_processes"] != 0, dist["process_id"] != -1)
    if any(explicit) and not all(explicit):
        raise ConfigError(
            f"{prefix}distributed: give all of coordinator_address, num_processes and process_id "
            f"(or none, to auto-detect the cluster); got {dist['coordinator_address']!r}, "
            f"{dist['num_processes']!r}, {dist['process_id']!r}"
        )
    if all(explicit):
        if not dist["enabled"]:
            raise ConfigError(
                f"{prefix}distributed: coordinator fields are set but enabled=False; set "
                f"--{prefix}distributed.enabled=True"
            )
        if dist["num_processes"] < 1 or not 0 <= dist["process_id"] < dist["num_processes"]:
            raise ConfigError(
                f"{prefix}distributed.process_id={dist['process_id']!r} with num_processes="
                f"{dist['num_processes']!r} is invalid: allowed: num_processes >= 1 and process_id "
                "in 0..num_processes-1"
            )
        address = dist["coordinator_address"]
        if not is_host_port(address):
            raise ConfigError(
                f"{prefix}distributed.coordinator_address={address!r} is invalid: allowed: {HOST_PORT_ALLOWED}"
            )
    return result


# ------------------------------------------------------------------------------------------- the train schema


# Over 80 lines: a table, one Field per train.py config field, read top to bottom like configs/mnist_vae.py.
def _train_schema() -> dict[str, Field]:
    generative_models = tuple(sorted(VAE_MODELS | DIFFUSION_MODELS))
    classifier_models = tuple(sorted(CLASSIFIER_MODELS))
    return {
        # -- all roles
        "seed": Field(
            0,
            int,
            "an integer >= 0",
            at_least(0),
            "all",
            "Seeds every role: initialisation, data order, augmentation and the evaluator/guidance split. "
            "Each role derives its own keys from (seed, role), so the evaluator and the guidance "
            "classifier never share a seed.",
        ),
        # -- data (compared through fingerprints)
        "data": Field(
            "embedded",
            str,
            f"a data spec {_DATA_SPEC_FORMS}",
            lambda v: is_data_spec(v, empty_ok=False),
            "data",
            "Training data (gsu_jax.data.load_dataset spec).",
        ),
        "data_dir": Field(
            "",
            str,
            "a directory path or '' (none)",
            None,
            "data",
            "TFDS data_dir for tfds: specs; base directory of relative idx: paths.",
        ),
        "eval_data": Field(
            "",
            str,
            f"'' (a stratified holdout of config.data) or a data spec {_DATA_SPEC_FORMS}",
            lambda v: is_data_spec(v, empty_ok=True),
            "data",
            "Held-out data for the held-out ELBO and classifier accuracy. '' holds out "
            "holdout_fraction of config.data (stratified, seeded) and trains on the rest; a spec "
            "(e.g. 'idx:../shared/data/mnist', the real MNIST test set) leaves all of config.data "
            "for training.",
        ),
        "holdout_fraction": Field(
            0.1,
            float,
            "a number in (0, 0.5]",
            within(0.0, 0.5, low_open=True),
            "data",
            "Share of each class of config.data held out when eval_data is ''.",
        ),
        "exclude_classes": Field(
            "",
            str,
            "'' or comma-separated class indices, e.g. '1' or '1,7'",
            None,
            "data",
            "Classes left out of the generative model's training data: the "
            "retrain-from-scratch oracle. Classifiers always train on every class.",
        ),
        "exclude": Field(
            "",
            str,
            "'' (exclude_classes decides), 'classes:1,7', 'fraction:0.01' or 'indices:<file>'",
            None,
            "data",
            "Training examples left out of the generative model's training data (gsu_jax.example_sets): "
            "the oracle of unlearn.py's forget=, which selects the same examples on the same data and seed. "
            "exclude_classes is the shorthand for 'classes:<list>'.",
            optional=True,
        ),
        "evaluator_data": Field(
            "",
            str,
            f"'' (a disjoint split of the training data) or a data spec {_DATA_SPEC_FORMS}",
            lambda v: is_data_spec(v, empty_ok=True),
            "data",
            "Training data of the evaluator. '' splits the training data (every class) "
            "into two disjoint stratified parts: evaluator_fraction for the evaluator, the "
            "rest for the guidance classifier. A spec trains the evaluator on that data and "
            "the guidance classifier on all the training data.",
        ),
        "evaluator_fraction": Field(
            0.5,
            float,
            "a number in (0, 1)",
            within(0.0, 1.0, low_open=True, high_open=True),
            "data",
            "Share of each class of the training data given to the evaluator when evaluator_data is ''.",
        ),
        # -- generative model
        "model": Field(
            "mlp_vae",
            str,
            f"one of {', '.join(generative_models)}",
            one_of(generative_models),
            "generative",
            "Generative model (gsu_jax.models registry name): a VAE or the DDPM "
            "U-Net (ddpm_unet; see gsu_jax.generative for what each family reads).",
        ),
        "latent_dim": Field(2, int, "an integer >= 1", at_least(1), "generative", "Latent dimension of the VAE."),
        "model_kwargs": Field(
            {},
            dict,
            "keyword arguments of the chosen model",
            None,
            "generative",
            "Other hyperparameters of the generative model (e.g. hidden=400 for mlp_vae; "
            "channels, num_groups for conv_vae); image_shape comes from the data.",
        ),
        "kl_weight": Field(
            1.0,
            float,
            "a number >= 0",
            at_least(0.0),
            "generative",
            "Weight of the KL term of the negative ELBO (1 in the protocol).",
        ),
        # -- DDPM only (model ddpm_unet); a VAE ignores these and they stay out of its checkpoints' identity
        "diffusion_schedule": Field(
            "cosine",
            str,
            f"one of {', '.join(_DIFFUSION_SCHEDULES)}",
            one_of(_DIFFUSION_SCHEDULES),
            "generative",
            "DDPM noise schedule (beta_t): cosine (Nichol & Dhariwal) or linear (Ho et al.).",
        ),
        "diffusion_steps": Field(
            1000,
            int,
            "an integer >= 2",
            at_least(2),
            "generative",
            "DDPM training timesteps T (each example draws its own t in 1..T).",
        ),
        "class_conditional": Field(
            False,
            bool,
            "True or False",
            None,
            "generative",
            "DDPM conditioned on the class label (null label for classifier-free guidance).",
        ),
        "class_dropout": Field(
            0.1,
            float,
            "a number in [0, 1)",
            within(0.0, 1.0, high_open=True),
            "generative",
            "Share of training examples whose label is replaced by the null label "
            "(class-conditional DDPM; what classifier-free guidance needs).",
        ),
        "sample_steps": Field(
            20,
            int,
            "an integer >= 1 (and <= diffusion_steps)",
            at_least(1),
            "run",
            "DDIM steps of the DDPM samples in the PNG.",
        ),
        "guidance_scale": Field(
            0.0,
            float,
            "a number >= 0",
            at_least(0.0),
            "run",
            "Classifier-free guidance scale of class-conditional DDPM samples (0: the plain conditional model).",
        ),
        "batch_size": Field(128, int, "an integer >= 1", at_least(1), "generative", "Generative training batch."),
        "num_epochs": Field(150, int, "an integer >= 1", at_least(1), "generative", "Generative training epochs."),
        "learning_rate": Field(
            1e-3,
            float,
            "a number > 0",
            greater_than(0.0),
            "generative",
            "Adam learning rate of the generative model (constant, 1e-3 in the protocol).",
        ),
        # -- classifiers (evaluator and guidance)
        "classifier": Field(
            "mlp_classifier",
            str,
            f"one of {', '.join(classifier_models)}",
            one_of(classifier_models),
            "classifier",
            "Model of the evaluator and the guidance classifier.",
        ),
        "classifier_kwargs": Field(
            {},
            dict,
            "keyword arguments of the chosen classifier",
            None,
            "classifier",
            "Other hyperparameters of the classifiers (e.g. hidden=200 for "
            "mlp_classifier); image_shape and num_classes come from the data.",
        ),
        "classifier_batch_size": Field(
            128, int, "an integer >= 1", at_least(1), "classifier", "Classifier training batch."
        ),
        "classifier_num_epochs": Field(
            100, int, "an integer >= 1", at_least(1), "classifier", "Classifier training epochs."
        ),
        "classifier_learning_rate": Field(
            2e-3,
            float,
            "a number > 0",
            greater_than(0.0),
            "classifier",
            "Peak AdamW learning rate of the classifiers (cosine decay to 0).",
        ),
        "classifier_weight_decay": Field(
            1e-2,
            float,
            "a number >= 0",
            at_least(0.0),
            "classifier",
            "Decoupled (AdamW) weight decay of the classifiers.",
        ),
        "classifier_augment_shift": Field(
            2,
            int,
            "an integer in [0, 8]",
            within(0, 8),
            "classifier",
            "Random translations of up to this many pixels (each axis, zero fill) "
            "applied to each classifier training example; 0 disables.",
        ),
        # -- how the run is carried out
        "roles": Field(
            ",".join(ROLES),
            str,
            f"a comma-separated subset of {', '.join(ROLES)}",
            None,
            "run",
            "Which roles to train (each in its own subdirectory of the workdir).",
        ),
        "checkpoint_every_steps": Field(
            1000,
            int,
            "an integer >= 1",
            at_least(1),
            "run",
            "Save a checkpoint at the end of the first epoch that crosses each "
            "multiple of this many steps (and always at the end).",
        ),
        "max_to_keep": Field(2, int, "an integer >= 1", at_least(1), "run", "Checkpoints kept per role."),
        "num_sample_images": Field(
            64,
            int,
            "an integer in [1, 400]",
            within(1, 400),
            "run",
            "Samples (and reconstructions) drawn in the PNG grid.",
        ),
        "progress_bar": Field(True, bool, "True or False", None, "run", "Show a tqdm progress bar."),
        "restore_fallback": Field(
            False,
            bool,
            "True or False",
            None,
            "run",
            "When a role's latest checkpoint fails verification (a file truncated or "
            "corrupted on disk), resume from the newest earlier checkpoint that verifies, "
            "moving the bad ones to <role>/corrupt_checkpoints/ and saying which and why. "
            "False refuses to start, naming the bad step and file.",
            optional=True,
        ),
        **PARALLEL_SCHEMA,
    }


TRAIN_SCHEMA: Mapping[str, Field] = types.MappingProxyType(_train_schema())


def default_train_config() -> ml_collections.ConfigDict:
    """A ConfigDict holding every field of :data:`TRAIN_SCHEMA` at its default (configs/*.py start from it)."""
    config = ml_collections.ConfigDict()
    for name, field in TRAIN_SCHEMA.items():
        setattr(config, name, ml_collections.ConfigDict(dict(field.default)) if field.kind is dict else field.default)
    return config


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (``configs/`` is not a package, so configs build on each other with this).

    Example (inside ``configs/unlearn_mnist.py``): ``load_config_file(pathlib.Path(__file__).with_name("mnist_vae.py"))``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_gsu_configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    return module.get_config()


def fields_in_scope(role: str, schema: Mapping[str, Field] = TRAIN_SCHEMA) -> tuple[str, ...]:
    """Names of the fields whose value influences ``role``'s parameters (scope ``all`` or the role's own)."""
    if role not in _ROLE_SCOPES:
        raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    return tuple(name for name, field in schema.items() if field.scope in _ROLE_SCOPES[role])


# ------------------------------------------------------------------------------------------- validation


def _check_model_kwargs(field_name: str, model: str, kwargs: dict[str, Any], *, reserved: tuple[str, ...]) -> None:
    accepted = {name: default for name, default in model_hyperparameters(model).items() if name not in reserved}
    for name, value in kwargs.items():
        if name in reserved:
            raise ConfigError(
                f"config.{field_name}.{name} cannot be set: it is fixed by "
                f"{'the data' if name in ('image_shape', 'num_classes') else 'config.' + name}"
            )
        if name not in accepted:
            hint = did_you_mean(name, accepted)
            raise ConfigError(
                f"{dotted_name(f'config.{field_name}.', name)} is not a hyperparameter of {model!r}"
                f"{hint or '; allowed: ' + ', '.join(sorted(accepted))}"
            )
        default = accepted[name]
        expected = type(default)
        if isinstance(default, tuple) and isinstance(value, list):
            # A tuple read back from a checkpoint's JSON config (or written as a list in a config file).
            value = kwargs[name] = tuple(value)
        bad_type = (isinstance(value, bool) != isinstance(default, bool)) or not isinstance(value, expected)
        if default is not None and bad_type:
            raise ConfigError(
                f"config.{field_name}.{name}={value!r} is invalid: expected {expected.__name__} like the default "
                f"{default!r} of {model!r}"
            )


def validate_train_config(config: Any) -> dict[str, Any]:
    """Validates a ``train.py`` config (:data:`TRAIN_SCHEMA`) including the fields that depend on each other.

    Beyond :func:`validate_config`: ``model_kwargs``/``classifier_kwargs`` must name hyperparameters of the chosen
    models with values of the default's type; ``roles``, ``exclude_classes`` and ``exclude`` must parse (and not contradict each other).
    Whether the model accepts the data's image shape, whether excluded classes exist in the data and whether
    data files exist are checked when the data is loaded, still before any training.

    Returns:
        The validated values as a plain dict (see :func:`validate_config`).

    Raises:
        ConfigError: one line naming the field, the value and what is allowed.
    """
    raw = as_mapping(config)
    # Configs (and checkpoint records) written before the mesh existed ran on one device: the defaults.
    raw = {**{name: field.default for name, field in PARALLEL_SCHEMA.items()}, **raw}
    values = validate_config(raw, TRAIN_SCHEMA)
    values.update(validate_parallel(values))
    parse_roles(values["roles"])
    parse_class_list(values["exclude_classes"])
    # Imported here: gsu_jax.example_sets builds on this module's class-list parser.
    from gsu_jax.example_sets import combined_example_set

    combined_example_set(values, field="exclude", classes_field="exclude_classes", default_classes="")
    # Imported here: gsu_jax.generative builds on the models and losses, which this module must not import eagerly.
    from gsu_jax.generative import family_of

    family = family_of(values["model"])
    _check_model_kwargs("model_kwargs", values["model"], values["model_kwargs"], reserved=family.reserved_kwargs)
    if family.name == "ddpm":
        if values["sample_steps"] > values["diffusion_steps"]:
            raise ConfigError(
                f"config.sample_steps={values['sample_steps']} is invalid: allowed: an integer in "
                f"[1, config.diffusion_steps={values['diffusion_steps']}]"
            )
        if values["class_conditional"] and values["guidance_scale"] > 0 and values["class_dropout"] == 0:
            raise ConfigError(
                f"config.guidance_scale={values['guidance_scale']!r} needs an unconditional model: "
                "allowed with config.class_dropout > 0 (the null label is never trained at 0)"
            )
    _check_model_kwargs(
        "classifier_kwargs", values["classifier"], values["classifier_kwargs"], reserved=("image_shape", "num_classes")
    )
    return values
