"""The command line's error paths that need no use case: bad input is a readable error, never a traceback."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from service.cli import EXIT_INTERNAL, EXIT_INVALID, cli, reports_errors
from service.errors import Invalid, Problem


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_the_commands_are_there(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["convert", "--help"])
    assert result.exit_code == 0
    assert "to-fhir" in result.stdout and "from-fhir" in result.stdout
    result = runner.invoke(cli, ["convert", "to-fhir", "--help"])
    assert "--bundle-type" in result.stdout and "--validate" in result.stdout


def test_to_fhir_reports_a_file_that_is_not_json(runner: CliRunner, tmp_path: Path) -> None:
    source = tmp_path / "case.json"
    source.write_text('{"id": "case-1", ', encoding="utf-8")
    result = runner.invoke(cli, ["convert", "to-fhir", str(source)])
    assert result.exit_code == EXIT_INVALID
    assert result.stderr.startswith("error: input is not valid JSON: ")
    assert result.stdout == ""
    assert "Traceback" not in result.output


@pytest.mark.parametrize("text", ["", "not json", "[1, 2", "\xff"])
def test_to_fhir_reports_standard_input_that_is_not_json(runner: CliRunner, text: str) -> None:
    result = runner.invoke(cli, ["convert", "to-fhir", "-"], input=text.encode("latin-1"))
    assert result.exit_code == EXIT_INVALID
    assert result.stderr.startswith("error: input is not valid JSON: ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", ["to-fhir", "from-fhir"])
def test_a_missing_file_is_a_usage_error(runner: CliRunner, tmp_path: Path, command: str) -> None:
    result = runner.invoke(cli, ["convert", command, str(tmp_path / "nowhere.json")])
    assert result.exit_code == 2
    assert "nowhere.json" in result.stderr
    assert "Traceback" not in result.output


def test_a_bad_bundle_type_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["convert", "to-fhir", "--bundle-type", "document", "-"], input=b"{}")
    assert result.exit_code == 2


def _command(error: Exception) -> click.Command:
    @click.command()
    @reports_errors
    def fails() -> None:
        raise error

    return fails


def test_problems_are_listed_one_per_line(runner: CliRunner) -> None:
    error = Invalid("the case record is not valid (2 problems)", [
        Problem("goals.0.status", "must be one of: proposed, active"), Problem("", "whole record"),
    ])
    result = runner.invoke(_command(error))
    assert result.exit_code == EXIT_INVALID
    assert result.stderr.splitlines() == [
        "error: the case record is not valid (2 problems)",
        "  goals.0.status: must be one of: proposed, active",
        "  whole record",
    ]


def test_an_unexpected_exception_is_an_internal_error(runner: CliRunner) -> None:
    result = runner.invoke(_command(KeyError("boom")))
    assert result.exit_code == EXIT_INTERNAL == 70
    assert result.stderr == "internal error: KeyError: 'boom'\n"
    assert "Traceback" not in result.output
