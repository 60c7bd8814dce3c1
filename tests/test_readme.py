"""The README's promises: its Python runs, its two set-up commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_blocks_run() -> None:
    python_blocks = blocks("python")
    assert python_blocks, "README has no python example"
    for code in python_blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    commands = [block.strip() for block in blocks("bash")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("memsched-demo")
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
