"""The README's examples run: "Use the transform in your own training loop" and "Unlearn your own model"."""

from __future__ import annotations

import pathlib
import re

import chex

import gsu_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use the transform in your own training loop"


def python_blocks_under(heading: str, text: str) -> list[str]:
    """The ```python blocks after ``heading`` and before the next heading of the same or a higher level (a ``#``
    line inside a code block is a comment, not a heading)."""
    start = text.index(heading) + len(heading)
    level = len(heading.split()[0])
    lines, in_code = [], False
    for line in text[start:].splitlines(keepends=True):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(rf"#{{1,{level}}} ", line):
            break
        lines.append(line)
    blocks = re.findall(r"^```python\n(.*?)^```", "".join(lines), re.MULTILINE | re.DOTALL)
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
        # On conflict the per-sample update does not oppose the retain gradient: its cosine with it is >= 0 up to
        # float32 rounding (a bound relative to the norms; an absolute one depends on the compiler's summation order).
        update, retain_grad = namespace["per_sample"], namespace["retain_grad"]
        inner = float(gsu_jax.trees.tree_vdot(update, retain_grad))
        norms = float(gsu_jax.trees.tree_norm(update) * gsu_jax.trees.tree_norm(retain_grad))
        assert inner >= -1e-5 * norms


def test_readme_example_forgets_and_keeps_the_rest():
    blocks = python_blocks_under("## Unlearn your own model (`gsu_jax.unlearn`)", README.read_text())
    namespace = {"__name__": "readme_unlearn_example"}
    for number, code in enumerate(blocks):
        exec(compile(code, f"{README}:unlearn:block{number}", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert result.stopped_at is not None and result.stopped_at <= 5
    assert namespace["after"] > 1.5 * namespace["before"]
    retain_before = float(namespace["mean_loss"](namespace["params"], namespace["retain"]))
    retain_after = float(namespace["mean_loss"](result.params, namespace["retain"]))
    assert retain_after <= 1.05 * retain_before
    assert gsu_jax.unlearn is gsu_jax.unlearner.unlearn
