"""The README's "Use the transform in your own training loop" examples run."""

from __future__ import annotations

import pathlib
import re

import chex

import gsu_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use the transform in your own training loop"


def python_blocks_under(heading: str, text: str) -> list[str]:
    """The ```python blocks after ``heading`` and before the next heading of the same or a higher level."""
    start = text.index(heading) + len(heading)
    level = heading.split()[0]
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start:], re.MULTILINE)
    section = text[start : start + following.start()] if following else text[start:]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert blocks, f"no ```python block under {heading!r} in {README}"
    return blocks


def test_training_loop_examples_run():
    blocks = python_blocks_under(HEADING, README.read_text())
    namespace = {"__name__": "readme_example"}
    # Later blocks continue the first one, as a reader would run them.
    for number, code in enumerate(blocks):
        exec(compile(code, f"{README}:{HEADING}:block{number}", "exec"), namespace)  # noqa: S102
    chex.assert_tree_all_finite(namespace["params"])
    assert int(namespace["opt_state"][0].count) == 3
    if len(blocks) > 1:
        assert int(namespace["masked_state"][0].inner_state.count) == 1
        # On conflict the per-sample update does not oppose the retain gradient.
        assert float(gsu_jax.trees.tree_vdot(namespace["per_sample"], namespace["retain_grad"])) >= -1e-6
