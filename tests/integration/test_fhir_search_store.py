"""FHIR reads and searches on SQLite and PostgreSQL: the statements built once per search shape and
run through the database driver give the same answers on both."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "case-record.md"
ORG = "org-search"


def example_case(case_id: str, client_id: str, member: str) -> dict:
    case = json.loads(re.search(r"## Example\n\n```json\n(.*?)```", DOCS.read_text(), re.S).group(1))
    case = copy.deepcopy(case)
    case["id"], case["organization"]["id"] = case_id, ORG
    case["client"]["id"] = client_id
    case["client"]["identifiers"][0]["value"] = member
    return case


@pytest.fixture
def fhir(database_url, tmp_path):
    from service import auth, create_app

    app = create_app({"database_url": database_url, "base_url": "http://testserver", "home": tmp_path})
    store = app.extensions["casebridge"].store
    key = auth.create_key(store, ORG, ["cases:read", "cases:write", "fhir:read", "fhir:write"])
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    for n in range(3):
        response = client.post("/cases", json=example_case(f"case-{n}", f"client-{n}", f"M-{n}"), headers=headers)
        assert response.status_code == 201, response.get_json()

    def get(path: str) -> dict:
        response = client.get(path, headers=headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    return get


def ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", ())]


def test_searches_give_the_same_answers_on_each_database(fhir):
    patients = fhir("/fhir/Patient")
    assert patients["total"] == 3
    first = patients["entry"][0]["resource"]
    assert fhir(f"/fhir/Patient?_id={first['id']}")["total"] == 1
    both = fhir(f"/fhir/Patient?_id={patients['entry'][0]['resource']['id']},{patients['entry'][1]['resource']['id']}")
    assert both["total"] == 2
    member = first["identifier"][0]
    assert ids(fhir(f"/fhir/Patient?identifier={member['system']}|{member['value']}")) == [first["id"]]
    assert fhir("/fhir/Patient?identifier=|nothing")["total"] == 0
    family = first["name"][0]["family"]
    assert fhir(f"/fhir/Patient?name={family[:3]}")["total"] == 3
    assert fhir(f"/fhir/Patient?birthdate={first['birthDate']}")["total"] == 3
    assert fhir("/fhir/Patient?gender=female,unknown")["total"] == (3 if first.get("gender") in ("female", "unknown") else 0)

    plans = fhir(f"/fhir/CarePlan?patient={first['id']}&category=assess-plan")
    assert plans["total"] == 1
    plan = plans["entry"][0]["resource"]
    assert plan["subject"]["reference"] == f"Patient/{first['id']}"
    assert fhir(f"/fhir/CarePlan?patient=Patient/{first['id']}&category=nothing")["total"] == 0
    assert fhir("/fhir/CarePlan?_lastUpdated=gt2000-01-01")["total"] == 3
    assert fhir("/fhir/CarePlan?_lastUpdated=lt2000-01-01")["total"] == 0
    assert fhir("/fhir/CarePlan?_lastUpdated=ge2000-01-01&_lastUpdated=le2999-01-01")["total"] == 3
    assert fhir(f"/fhir/CarePlan?status={plan['status']}")["total"] == 3


def test_paging_counts_and_includes_on_each_database(fhir):
    page = fhir("/fhir/Goal?_count=2")
    assert len(page["entry"]) == 2 and page["total"] > 2
    assert any(link["relation"] == "next" for link in page["link"])
    everything = fhir(f"/fhir/Goal?_count={page['total']}")
    assert len(everything["entry"]) == page["total"]
    included = fhir("/fhir/CarePlan?_include=CarePlan:subject&_include=CarePlan:goal")
    modes = [e["search"]["mode"] for e in included["entry"]]
    assert modes.count("match") == 3 and modes.count("include") > 3
    goal = page["entry"][0]["resource"]["id"]
    assert fhir(f"/fhir/Goal?_id={goal}&_revinclude=CarePlan:goal")["total"] == 1


def test_reads_on_each_database(fhir):
    plan = fhir("/fhir/CarePlan")["entry"][0]["resource"]
    assert fhir(f"/fhir/CarePlan/{plan['id']}")["meta"]["versionId"] == plan["meta"]["versionId"]
    bundle = fhir("/cases/case-0/fhir")
    assert bundle["resourceType"] == "Bundle" and bundle["entry"]


def test_a_token_search_matches_only_a_resources_current_form(database_url, tmp_path):
    """A client's Patient has a row per case; only the newest case's row is the resource. An
    identifier only an older case gave the client finds nothing, on each database."""
    from service import auth, create_app

    app = create_app({"database_url": database_url, "base_url": "http://testserver", "home": tmp_path})
    key = auth.create_key(app.extensions["casebridge"].store, ORG, ["cases:write", "fhir:read"])
    client, headers = app.test_client(), {"Authorization": f"Bearer {key}"}
    for case_id, member in (("older", "M-OLD"), ("newer", "M-NEW")):  # one client, a new member id
        assert client.post("/cases", json=example_case(case_id, "client-1", member), headers=headers).status_code == 201

    def total(query: str) -> int:
        response = client.get(f"/fhir/Patient?{query}", headers=headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["total"]

    assert total("identifier=M-NEW") == 1
    assert total("identifier=M-OLD") == 0
    assert total("identifier=M-OLD,M-NEW") == 1


@pytest.mark.parametrize("resource_type, params, index", [
    ("Patient", [("identifier", "M-1")], "ix_fhir_tokens_lookup"),
    ("Task", [("focus", "ServiceRequest/sr-1")], "ix_fhir_tokens_lookup"),
    ("CarePlan", [("patient", "p-1"), ("category", "assess-plan")], "ix_fhir_resources_search"),
])
def test_a_search_starts_from_its_most_selective_index(tmp_path, resource_type, params, index):
    """SQLite's plan for a search: an identifier or a focus is looked up in the token index, not
    checked against every resource of the type; a patient's plans are found by the patient."""
    from service import fhir_services, migrations
    from service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'plans.db'}")
    migrations.upgrade(store)
    request = fhir_services.parse_search(resource_type, params)
    statement = fhir_services._statements(resource_type, tuple(request.shape)).page
    bound = {"org": ORG, "limit": 10, "offset": 0, **{f"v{i}": v for i, v in enumerate(request.values)}}
    compiled = statement.compile(dialect=store.engine.dialect)
    with store.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled}", tuple({**compiled.params, **bound}[name] for name in compiled.positiontup))]
    assert any(index in step for step in plan), plan
    assert not any(step.startswith("SCAN") and "fhir_resources" in step for step in plan), plan
