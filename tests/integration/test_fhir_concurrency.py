"""FHIR writers racing each other over HTTP, on SQLite and on PostgreSQL: several copies of the same
conditional create (If-None-Exist) make one resource and one case, and the others are given it; two
writes naming the same version (If-Match) let exactly one win, and the case gets exactly one new version.

Each writer is a thread with its own test client; a barrier releases them together."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service import auth, create_app
from service.store import case_versions, cases
from tests.integration.simultaneous import at_once

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
ORG = "org-1"
THREADS = 8
ROUNDS = 4  # of conditional creates (each round: THREADS writers)
RACES = 10  # of two writers naming the same version
FHIR = "application/fhir+json"
PROBLEM = "application/problem+json"
MRN = "urn:oid:1.2.3"
FOOD_PANTRY = "http://snomed.info/sct|464131000124100"


@pytest.fixture
def app(database_url, tmp_path):
    app = create_app({"database_url": database_url, "base_url": "http://testserver", "home": tmp_path})
    yield app
    app.extensions["casebridge"].store.engine.dispose()


@pytest.fixture
def headers(app):
    key = auth.create_key(app.extensions["casebridge"].store, ORG,
                          ["cases:read", "cases:write", "fhir:read", "fhir:write"])
    return {"Authorization": f"Bearer {key}"}


def counted(app, table, **where) -> int:
    """Rows of ``table`` (with the given column values), read straight from the database."""
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with app.extensions["casebridge"].store.engine.connect() as conn:
        return conn.execute(query).scalar_one()


def shown(responses) -> list:
    return [(r.status_code, r.get_data(as_text=True)[:300]) for r in responses]


def search(client, headers, query: str) -> dict:
    response = client.get(f"/fhir/{query}", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def patient(mrn: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}],
            "name": [{"family": "Okafor", "given": ["Ada"]}], "gender": "female", "birthDate": "1980-02-03"}


def referral(patient_id: str, authored: str) -> dict:
    """An inbound referral, as an EHR sends it (with its own identifier, kept beside the record)."""
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "identifier": [{"system": "urn:ehr:referral", "value": f"R-{authored}"}],
            "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-category",
                                      "code": "sdoh"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "464131000124100",
                                 "display": "Referral to food pantry program"}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "authoredOn": authored,
            "requester": {"display": "Dr. Ehr"}}


def one_created_the_rest_found(responses, resource_type: str) -> str:
    """Every answer is 201 (exactly one) or 200, all naming the same resource at the same version; its id."""
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (len(responses) - 1) + [201], shown(responses)
    assert all(r.mimetype == FHIR for r in responses)
    bodies = [r.get_json() for r in responses]
    assert {b["resourceType"] for b in bodies} == {resource_type}
    ids = {b["id"] for b in bodies}
    assert len(ids) == 1, ids
    assert len({r.headers["ETag"] for r in responses}) == 1
    assert len({r.headers["Location"] for r in responses}) == 1
    (resource_id,) = ids
    assert all(f"/fhir/{resource_type}/{resource_id}/_history/" in r.headers["Location"] for r in responses)
    return resource_id


# -- conditional create ----------------------------------------------------------------------------
def test_the_same_conditional_patient_create_at_once_makes_one_patient_and_one_case(app, headers):
    client = app.test_client()
    for round_ in range(ROUNDS):
        mrn = f"MRN-RACE-{round_}"
        cases_before = counted(app, cases)

        def post(c, i):
            return c.post("/fhir/Patient", json=patient(mrn),
                          headers={**headers, "If-None-Exist": f"identifier={MRN}|{mrn}"})

        responses = at_once(app, post, THREADS)
        patient_id = one_created_the_rest_found(responses, "Patient")
        assert counted(app, cases) == cases_before + 1
        found = search(client, headers, f"Patient?identifier={MRN}|{mrn}")
        assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == patient_id
    assert counted(app, cases) == ROUNDS
    assert search(client, headers, "Patient")["total"] == ROUNDS


def test_the_same_conditional_referral_at_once_makes_one_service_request_and_one_case(app, headers):
    """An EHR sending the same inbound referral several times at once: one intake case, one Task.

    The match here is on the patient, the code and the date authored (the match on the referral's
    identifier: tests/integration/test_service_request_identifier.py)."""
    client = app.test_client()
    created = client.post("/fhir/Patient", json=patient("MRN-REFERRED"), headers=headers)
    assert created.status_code == 201, created.get_data(as_text=True)
    patient_id = created.get_json()["id"]
    for round_ in range(ROUNDS):
        authored = f"2024-06-{round_ + 1:02d}"
        query = f"patient={patient_id}&code={FOOD_PANTRY}&authored={authored}"
        cases_before = counted(app, cases)

        def post(c, i):
            return c.post("/fhir/ServiceRequest", json=referral(patient_id, authored),
                          headers={**headers, "If-None-Exist": query})

        responses = at_once(app, post, THREADS)
        request_id = one_created_the_rest_found(responses, "ServiceRequest")
        assert counted(app, cases) == cases_before + 1
        found = search(client, headers, f"ServiceRequest?{query}")
        assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == request_id
        assert search(client, headers, f"Task?focus=ServiceRequest/{request_id}")["total"] == 1
    assert search(client, headers, f"ServiceRequest?patient={patient_id}")["total"] == ROUNDS
    assert counted(app, cases) == ROUNDS + 1  # the patient's own case, and one intake case a referral


# -- If-Match --------------------------------------------------------------------------------------
def discharge_case(case_id: str) -> dict:
    data = json.loads((FIXTURES / "discharge.json").read_text())
    return {**data, "id": case_id, "organization": {**data["organization"], "id": ORG}}


def changed(resource: dict, text: str) -> dict:
    if resource["resourceType"] == "Goal":
        return {**resource, "description": {**resource.get("description", {}), "text": text}}
    return {**resource, "title": text}


def written(resource: dict) -> str:
    return resource["description"]["text"] if resource["resourceType"] == "Goal" else resource["title"]


@pytest.mark.parametrize("resource_type", ["Goal", "CarePlan"])
def test_two_fhir_updates_of_the_same_version_exactly_one_wins(app, headers, resource_type):
    client = app.test_client()
    assert client.post("/cases", json=discharge_case("raced"), headers=headers).status_code == 201
    first = search(client, headers, f"{resource_type}?_count=1")["entry"][0]["resource"]
    url = f"/fhir/{resource_type}/{first['id']}"
    for round_ in range(RACES):
        current = client.get(url, headers=headers)
        assert current.status_code == 200
        version = int(current.get_json()["meta"]["versionId"])
        assert current.headers["ETag"] == f'W/"{version}"'

        def put(c, i):
            body = changed(current.get_json(), f"round {round_} writer {i}")
            return c.put(url, json=body, headers={**headers, "If-Match": f'W/"{version}"'})

        responses = at_once(app, put, 2)
        assert sorted(r.status_code for r in responses) == [200, 412], shown(responses)
        winner = next(r for r in responses if r.status_code == 200)
        loser = next(r for r in responses if r.status_code == 412)
        assert loser.mimetype == FHIR
        assert loser.get_json()["resourceType"] == "OperationOutcome"
        assert loser.get_json()["issue"][0]["code"] == "conflict"
        assert winner.headers["ETag"] == f'W/"{version + 1}"'
        after = client.get(url, headers=headers)
        assert after.headers["ETag"] == winner.headers["ETag"]
        assert written(after.get_json()) == written(winner.get_json())
        assert written(after.get_json()).startswith(f"round {round_} writer ")
        assert client.get("/cases/raced", headers=headers).headers["ETag"] == f'W/"{version + 1}"'
        assert counted(app, case_versions, case_id="raced") == version + 1  # exactly one new version
    history = client.get("/cases/raced/history", headers=headers).get_json()["items"]
    assert [h["version"] for h in history] == list(range(RACES + 1, 0, -1))


def test_two_deletes_of_the_same_version_exactly_one_wins(app, headers):
    client = app.test_client()
    for round_ in range(RACES):
        case_id = f"deleted-{round_}"
        assert client.post("/cases", json=discharge_case(case_id), headers=headers).status_code == 201

        def delete(c, i):
            return c.delete(f"/cases/{case_id}", headers={**headers, "If-Match": 'W/"1"'})

        responses = at_once(app, delete, 2)
        assert sorted(r.status_code for r in responses) == [200, 412], shown(responses)
        winner = next(r for r in responses if r.status_code == 200)
        loser = next(r for r in responses if r.status_code == 412)
        assert loser.mimetype == PROBLEM
        assert winner.headers["ETag"] == 'W/"2"' and winner.get_json()["status"] == "entered_in_error"
        history = client.get(f"/cases/{case_id}/history", headers=headers).get_json()["items"]
        assert [(h["version"], h["action"]) for h in history] == [(2, "delete"), (1, "create")]
        assert counted(app, case_versions, case_id=case_id) == 2


def test_a_delete_and_an_update_of_the_same_version_exactly_one_wins(app, headers):
    client = app.test_client()
    for round_ in range(RACES):
        case_id = f"contested-{round_}"
        assert client.post("/cases", json=discharge_case(case_id), headers=headers).status_code == 201

        def write(c, i):
            if i == 0:
                return c.delete(f"/cases/{case_id}", headers={**headers, "If-Match": 'W/"1"'})
            return c.put(f"/cases/{case_id}", json={**discharge_case(case_id), "title": "kept"},
                         headers={**headers, "If-Match": 'W/"1"'})

        responses = at_once(app, write, 2)
        assert sorted(r.status_code for r in responses) == [200, 412], shown(responses)
        winner = 0 if responses[0].status_code == 200 else 1
        stored = client.get(f"/cases/{case_id}", headers=headers)
        assert stored.headers["ETag"] == 'W/"2"'
        if winner == 0:
            assert stored.get_json()["status"] == "entered_in_error"
        else:
            assert stored.get_json()["title"] == "kept" and stored.get_json()["status"] != "entered_in_error"
        assert counted(app, case_versions, case_id=case_id) == 2
