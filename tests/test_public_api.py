"""The package's public API: every exported name resolves, `import gsu_jax` stays cheap, no module imports in a
cycle."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import gsu_jax
from gsu_jax import methods, per_example, projections, surgery

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every module of the surgery and methods layers, each imported first in a fresh set of gsu_jax modules: a cycle
# shows as an ImportError (a partially initialised module) for the module that closes it.
# Every module of the package, each imported first on its own: a cycle anywhere fails.
MODULES = tuple(
    sorted(
        str(path.relative_to(REPO / "gsu_jax").with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for path in (REPO / "gsu_jax").rglob("*.py")
        if path.name != "__init__.py" or path.parent != REPO / "gsu_jax"
    )
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_exported_name_resolves_to_its_definition():
    assert sorted(gsu_jax.__all__) == sorted(set(gsu_jax.__all__))
    for name in gsu_jax.__all__:
        assert getattr(gsu_jax, name) is not None, name
    assert gsu_jax.make_method is methods.make_method
    assert gsu_jax.METHODS is methods.METHODS
    assert gsu_jax.RECOMMENDED_METHOD in gsu_jax.METHODS
    assert gsu_jax.project_normal_plane is surgery.project_normal_plane
    assert gsu_jax.normal_plane_projection is projections.normal_plane_projection
    assert gsu_jax.per_example_projected_mean is per_example.per_example_projected_mean
    assert set(gsu_jax.__all__) <= set(dir(gsu_jax))


def test_import_is_cheap_and_loads_the_methods_on_first_use():
    done = _python(
        "import sys, gsu_jax\n"
        "heavy = sorted(m for m in ('flax', 'gsu_jax.methods', 'gsu_jax.models') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert callable(gsu_jax.make_method) and 'gsu_jax.methods' in sys.modules\n"
        "try:\n"
        "    gsu_jax.no_such_name\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_name' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_import_cycles():
    done = _python(
        "import importlib, sys\n"
        f"for module in {MODULES!r}:\n"
        "    for name in [name for name in sys.modules if name == 'gsu_jax' or name.startswith('gsu_jax.')]:\n"
        "        del sys.modules[name]\n"
        "    importlib.import_module('gsu_jax.' + module)\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
