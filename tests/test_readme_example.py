"""The README's "Use the transform in your own training loop" example runs."""

from __future__ import annotations

import pathlib
import re

import chex

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use the transform in your own training loop"


def first_python_block_under(heading: str, text: str) -> str:
    """The first ```python block after ``heading`` and before the next heading
    of the same or a higher level."""
    start = text.index(heading) + len(heading)
    level = heading.split()[0]
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start:], re.MULTILINE)
    section = text[start : start + following.start()] if following else text[start:]
    match = re.search(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert match, f"no ```python block under {heading!r} in {README}"
    return match.group(1)


def test_training_loop_example_runs():
    code = first_python_block_under(HEADING, README.read_text())
    namespace = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:{HEADING}", "exec"), namespace)  # noqa: S102
    chex.assert_tree_all_finite(namespace["params"])
    assert int(namespace["opt_state"][0].count) == 3
