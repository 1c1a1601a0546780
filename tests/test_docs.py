"""The README's promises: its test command is the one CI runs, and every command has help."""

from __future__ import annotations

import re

import click
from click.testing import CliRunner

from imgcluster.cli import cli
from tests.conftest import PROJECT


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (PROJECT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "README must open with a bash block of the two commands"
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    start, test = commands
    assert "streamlit run app.py" in start
    ci = (PROJECT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_help() -> None:
    for path, command in _commands(cli):
        assert command.help, f"`imgcluster {' '.join(path)}` has no help text"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
