"""The README's two set-up commands are the ones the project actually runs.

CI (`.ci/run`) must call exactly the README's test command, and the README's main-job command must name the
entry point and config that exist in the tree; both drift silently otherwise.
"""

from __future__ import annotations

import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command_after(label: str) -> str:
    """The first line of the first ```bash block after the line containing ``label``."""
    start = README.index(label)
    match = re.search(r"^```bash\n(.*?)\n", README[start:], re.MULTILINE)
    assert match, f"no ```bash block after {label!r} in README.md"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _command_after("Install and run the tests")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"
    assert "pytest" in command


def test_main_job_command_names_existing_files():
    command = _command_after("Install and run the main job")
    words = shlex.split(command.replace("&&", " "))
    assert "unlearn.py" in words
    config = words[words.index("--config") + 1]
    assert (ROOT / config).is_file(), f"the README's main job names a missing config {config}"
    assert (ROOT / "unlearn.py").is_file()
