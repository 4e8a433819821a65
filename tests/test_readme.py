"""README's setup / demo / test commands are the ones CI runs (.ci/run reads them from .ci/commands)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, str]:
    pairs = (line.split(":", 1) for line in (ROOT / ".ci" / "commands").read_text().splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def test_readme_shows_exactly_the_commands_ci_runs():
    commands = _commands()
    assert set(commands) == {"SETUP", "DEMO", "TEST"}
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = {line.strip() for block in blocks for line in block.splitlines()}
    for key, command in commands.items():
        assert command in lines, f"README has no bash line `{command}` ({key})"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "SETUP:" in ci and "TEST:" in ci  # .ci/run executes the same lines


def test_demo_recipes_ship_with_the_package_and_validate():
    from dskd.stages.demo import demo_recipe

    for quick in (True, False):
        recipe = demo_recipe(quick)
        assert recipe.data.task == "docstrings"
        assert recipe.distill.student_pt_ratio == 0.5 and recipe.distill.sources == ["gold", "teacher_pt"]
