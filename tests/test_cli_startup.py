"""`kvprime --help` stays fast: importing the command line loads no heavy library (each command imports what it
needs when it starts), and the commands whose imports moved into them still run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvprime.commands.cli import app

HEAVY = ("pandas", "scipy", "statsmodels", "torch", "transformers", "hydra")


@pytest.mark.integration
def test_importing_the_cli_loads_no_heavy_library():
    probe = f"import sys\nimport kvprime.commands.cli\nprint([m for m in {HEAVY!r} if m in sys.modules])\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_and_a_command_with_its_imports_inside_run():
    runner = CliRunner()
    said = runner.invoke(app, ["--help"])
    assert said.exit_code == 0 and "bench-scale" in said.output and "merge" in said.output
    said = runner.invoke(app, ["conditions"])
    assert said.exit_code == 0, said.output
    assert "builders (settings in brackets):" in said.output and "truncated_oracle" in said.output
    said = runner.invoke(app, ["power", "/nonexistent-run", "--effect", "0.02"])
    assert said.exit_code == 2 and "does not exist" in said.output
