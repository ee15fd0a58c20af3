"""CLI basics: the help listing is instant (no torch import), every listed command exists, ``facepipe models``."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from facepipe.cli import eval_group, main

TOP_LEVEL = ["align", "detect", "embed", "eval", "index", "models", "train"]
EVAL_COMMANDS = ["cfp", "compare-detectors", "ijbc", "lfw", "verify", "widerface"]


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from facepipe.cli import main\n"
        "result = CliRunner().invoke(main, ['--help'])\n"
        "print(result.exit_code)\n"
        "print(result.output)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.startswith("0\n")
    commands = output.split("Commands:")[1]
    for name in TOP_LEVEL:
        assert f"\n  {name} " in commands
    assert "torch imported: False" in output


def test_version_and_unknown_command():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output
    result = runner.invoke(main, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_eval_help_lists_protocols():
    result = CliRunner().invoke(main, ["eval", "--help"])
    assert result.exit_code == 0
    for name in EVAL_COMMANDS:
        assert f"  {name} " in result.output


@pytest.mark.parametrize("group, name", [(main, n) for n in TOP_LEVEL] + [(eval_group, n) for n in EVAL_COMMANDS])
def test_every_listed_command_resolves(group, name):
    command = group.get_command(click.Context(group), name)
    assert isinstance(command, click.Command)
    result = CliRunner().invoke(main, ([name] if group is main else ["eval", name]) + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_models_lists_contracts():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert rows["retinaface_mnet025"][1:5] == ["detector", "any", "BGR", "104,117,123"]
    assert rows["retinaface_mnet025"][-1] == "retinaface_mobilenet0.25.pth"
    assert rows["mobilefacenet"][1:4] == ["embedder", "112x112", "RGB"]
    assert "128" in rows["mobilefacenet"]
    assert "iresnet50" in rows and "retinaface_r50" in rows

    detectors = CliRunner().invoke(main, ["models", "--kind", "detector"])
    names = [line.split()[0] for line in detectors.output.splitlines()[1:]]
    assert "retinaface_mnet025" in names and "mobilefacenet" not in names
