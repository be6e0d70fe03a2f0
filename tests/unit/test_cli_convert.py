"""The convert commands end to end, as a person at a shell would run them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from fhir.resources.R4B.bundle import Bundle

from service.cli import EXIT_INVALID, cli
from service.schemas import load_case

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("bundle_type", ["collection", "transaction"])
def test_to_fhir_writes_a_valid_bundle(runner, bundle_type):
    result = runner.invoke(cli, ["convert", "to-fhir", str(CASES / "discharge.json"), "--bundle-type", bundle_type,
                                 "--validate"])
    assert result.exit_code == 0, result.stderr
    bundle = json.loads(result.stdout)
    assert bundle["type"] == bundle_type
    Bundle.model_validate(bundle)


def test_from_fhir_reads_what_to_fhir_wrote_from_standard_input(runner):
    bundle = runner.invoke(cli, ["convert", "to-fhir", str(CASES / "realistic.json")]).stdout
    result = runner.invoke(cli, ["convert", "from-fhir", "-", "--validate"], input=bundle)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    original = load_case(json.loads((CASES / "realistic.json").read_text()))
    assert [load_case(c) for c in out["cases"]] == [original]
    assert out["unmapped"] == [] and out["warnings"] == []


def test_from_fhir_takes_ndjson(runner):
    bundle = json.loads(runner.invoke(cli, ["convert", "to-fhir", str(CASES / "minimal.json")]).stdout)
    ndjson = "\n".join(json.dumps(e["resource"]) for e in bundle["entry"])
    result = runner.invoke(cli, ["convert", "from-fhir"], input=ndjson)
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["cases"]) == 1


def test_invalid_fhir_lists_every_problem_by_element_path(runner):
    goal = {"resourceType": "Goal", "lifecycleStatus": "bogus", "description": {"text": "x"},
            "subject": {"reference": "Patient/1"}, "startDate": "2024-02-30", "colour": "red"}
    result = runner.invoke(cli, ["convert", "from-fhir"], input=json.dumps(goal))
    assert result.exit_code == EXIT_INVALID
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ")
    paths = {line.strip().split(":", 1)[0] for line in lines[1:]}
    assert {"Goal.lifecycleStatus", "Goal.startDate", "Goal.colour"} <= paths
    assert "Traceback" not in result.output


def test_an_invalid_case_record_names_its_fields(runner, tmp_path):
    case = json.loads((CASES / "minimal.json").read_text())
    case["status"] = "open"
    case["client"]["birth_date"] = "2023-02-30"
    path = tmp_path / "case.json"
    path.write_text(json.dumps(case))
    result = runner.invoke(cli, ["convert", "to-fhir", str(path)])
    assert result.exit_code == EXIT_INVALID
    assert "  status: " in result.stderr and "  client.birth_date: " in result.stderr


def test_the_installed_command_runs():
    """The console script itself (not just the click group), as the README uses it."""
    result = subprocess.run([sys.executable, "-m", "service.cli", "convert", "to-fhir", str(CASES / "minimal.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resourceType"] == "Bundle"
