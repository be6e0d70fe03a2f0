"""Revision 0005 works out the ServiceRequest identifier tokens of a stored record by itself (fast: no
full conversion); they must be exactly the ones the FHIR index writes on a save
(``fhir_index.rows_of_record``), for records as a case manager enters them and as they come from FHIR
(a partner's identifiers kept beside the record, or the record's own taken away)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from mappings import fhir_input, ids
from mappings.importer import import_graph
from service import fhir_index, schemas
from tests import strategies

ROOT = Path(__file__).resolve().parents[2]
MIGRATION = ROOT / "service" / "migrations" / "versions" / "0005_service_request_identifiers.py"
FIXTURES = ROOT / "tests" / "fixtures" / "cases"
GOLDEN = ROOT / "tests" / "golden"


def _migration():
    spec = importlib.util.spec_from_file_location("revision_0005", MIGRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REVISION = _migration()


def by_the_index(data: dict) -> dict[str, list]:
    return {rid: [(system, code) for param, system, code in tokens if param == "identifier"]
            for rtype, rid, _, tokens in fhir_index.rows_of_record(data) if rtype == "ServiceRequest"}


def by_the_migration(data: dict) -> dict[str, list]:
    return dict(REVISION.service_request_identifiers(data))


def imported(paths) -> list[dict]:
    """The records FHIR files import to (those the case rules take)."""
    records = []
    for path in paths:
        for case in import_graph(fhir_input.ResourceGraph(fhir_input.parse(path.read_bytes()))).cases:
            data = schemas.dump_case(case)
            try:
                schemas.load_case(data)
            except Exception:  # noqa: BLE001 - a record the rules refuse is never stored
                continue
            records.append(data)
    return records


def test_records_entered_and_imported_give_the_tokens_a_save_writes():
    records = [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]
    records += imported(sorted(GOLDEN.glob("*.json")))
    with_requests = [r for r in records if r.get("services")]
    assert len(with_requests) >= 8
    for data in records:
        assert by_the_migration(data) == by_the_index(data), data["id"]


def test_a_partners_identifiers_replace_the_records_own():
    """A referral an EHR posted reads back with the EHR's identifier only; one posted without any, with none."""
    def request(rid: str, **elements) -> dict:
        return {"fullUrl": f"urn:uuid:{rid}", "resource": {
            "resourceType": "ServiceRequest", "id": rid, "status": "active", "intent": "order",
            "code": {"text": "Food pantry"}, "subject": {"reference": "urn:uuid:patient"}, **elements}}

    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:patient", "resource": {"resourceType": "Patient", "id": "patient"}},
        request("ehr", identifier=[{"system": "urn:ehr:referral", "value": "R-1"}, {"value": "R-1-local"},
                                   {"system": "urn:ehr:referral"}]),
        request("bare"),
        request("own", identifier=[{"system": ids.SID_SERVICE, "value": "svc-7"}]),
    ]}
    (case,) = import_graph(fhir_input.ResourceGraph(fhir_input.parse(bundle))).cases
    data = schemas.dump_case(case)
    found = by_the_migration(data)
    assert found == by_the_index(data)
    assert sorted(found.values()) == [[], [(ids.SID_SERVICE, "svc-7")],
                                      [("urn:ehr:referral", "R-1"), (None, "R-1-local")]]


def test_the_published_examples_give_the_tokens_a_save_writes(corpus_dir):
    records = imported(sorted(corpus_dir.glob("*/*.json")))
    assert sum(bool(r.get("services")) for r in records) >= 10
    for data in records:
        assert by_the_migration(data) == by_the_index(data), data["id"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.cases())
def test_any_record_gives_the_tokens_a_save_writes(case):
    data = schemas.dump_case(case)
    assert by_the_migration(data) == by_the_index(data)


@pytest.mark.parametrize("name", ["realistic", "discharge"])
def test_each_service_is_found_by_the_records_identifier(name):
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    found = by_the_migration(data)
    assert sorted(found.values()) == sorted([[(ids.SID_SERVICE, s["id"])] for s in data["services"]])
