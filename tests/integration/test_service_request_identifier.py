"""ServiceRequest?identifier= on SQLite and PostgreSQL: an EHR sending the same referral several times at
once, with If-None-Exist naming its own identifier, makes one ServiceRequest and one intake case; and
revision 0005 gives the referrals stored before identifier tokens exactly as a save writes them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select

from service import migrations
from service.store import cases, fhir_tokens
from tests.integration.simultaneous import at_once
from tests.integration.test_fhir_concurrency import (  # noqa: F401 - app, headers: fixtures
    ORG, THREADS, app, counted, headers, one_created_the_rest_found, patient, referral, search, shown,
)

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
EHR = "urn:ehr:referral"
ROUNDS = 4


def new_patient(client, headers, mrn: str) -> str:
    created = client.post("/fhir/Patient", json=patient(mrn), headers=headers)
    assert created.status_code == 201, created.get_data(as_text=True)
    return created.get_json()["id"]


# -- conditional create by identifier, at once ---------------------------------------------------
def test_the_same_referral_at_once_by_its_identifier_makes_one_request_and_one_case(app, headers):
    client = app.test_client()
    patient_id = new_patient(client, headers, "MRN-EHR")
    for round_ in range(ROUNDS):
        authored = f"2024-07-{round_ + 1:02d}"  # referral() gives it the identifier R-<authored>
        identifier = f"{EHR}|R-{authored}"
        cases_before = counted(app, cases)

        def post(c, i):
            return c.post("/fhir/ServiceRequest", json=referral(patient_id, authored),
                          headers={**headers, "If-None-Exist": f"identifier={identifier}"})

        responses = at_once(app, post, THREADS)
        request_id = one_created_the_rest_found(responses, "ServiceRequest")
        assert all(r.get_json()["identifier"] == [{"system": EHR, "value": f"R-{authored}"}] for r in responses), \
            shown(responses)
        assert counted(app, cases) == cases_before + 1
        for query in (f"identifier={identifier}", f"identifier=R-{authored}"):
            found = search(client, headers, f"ServiceRequest?{query}")
            assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == request_id
        assert search(client, headers, f"Task?focus=ServiceRequest/{request_id}")["total"] == 1
    assert search(client, headers, f"ServiceRequest?patient={patient_id}")["total"] == ROUNDS
    assert counted(app, cases) == ROUNDS + 1  # the patient's own case, and an intake case a referral


# -- revision 0005 ---------------------------------------------------------------------------------
def fixture_case(name: str, case_id: str) -> dict:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return {**data, "id": case_id, "organization": {**data["organization"], "id": ORG}}


def tokens(app) -> list[tuple]:
    t = fhir_tokens
    with app.extensions["casebridge"].store.engine.connect() as conn:
        rows = conn.execute(select(t.c.organization_id, t.c.case_id, t.c.resource_type, t.c.resource_id,
                                   t.c.param, t.c.system, t.c.code))
        return sorted((tuple(row) for row in rows), key=repr)


def identifiers_of_requests(rows: list[tuple]) -> list[tuple]:
    return [r for r in rows if r[2] == "ServiceRequest" and r[4] == "identifier"]


def test_0005_writes_the_identifier_tokens_a_save_writes_and_nothing_else(app, headers, database_url):
    client, store = app.test_client(), app.extensions["casebridge"].store
    for name in ("realistic", "discharge", "behavioral_referral", "minimal"):  # as a case manager enters them
        response = client.post("/cases", json=fixture_case(name, f"case-{name.replace('_', '-')}"), headers=headers)
        assert response.status_code == 201, response.get_json()
    patient_id = new_patient(client, headers, "MRN-0005")
    sent = referral(patient_id, "2024-08-01")  # an EHR's referral with its identifier, and one without
    assert client.post("/fhir/ServiceRequest", json=sent, headers=headers).status_code == 201
    bare = {k: v for k, v in referral(patient_id, "2024-08-02").items() if k != "identifier"}
    assert client.post("/fhir/ServiceRequest", json=bare, headers=headers).status_code == 201
    deleted = client.delete("/cases/case-discharge", headers={**headers, "If-Match": 'W/"1"'})
    assert deleted.status_code == 200, deleted.get_json()
    saved = tokens(app)
    written = identifiers_of_requests(saved)
    assert {(r[5], r[6]) for r in written} >= {(EHR, "R-2024-08-01")}
    assert len({r[1] for r in written}) == 4  # realistic, behavioral_referral, discharge (deleted) and R-2024-08-01

    # the database as revision 0004's code left it: no ServiceRequest identifier tokens
    command.downgrade(migrations.config(database_url), "0004")
    assert tokens(app) == [r for r in saved if r not in written]
    migrations.upgrade(store)
    assert tokens(app) == saved

    # only the cases that need it: one saved under 0005's code keeps its tokens, once
    command.downgrade(migrations.config(database_url), "0004")
    again = referral(patient_id, "2024-08-03")
    created = client.post("/fhir/ServiceRequest", json=again, headers=headers)
    assert created.status_code == 201
    before = tokens(app)
    assert len(identifiers_of_requests(before)) == 1
    migrations.upgrade(store)
    after = tokens(app)
    assert len(set(after)) == len(after) and set(before) <= set(after)
    assert identifiers_of_requests(after) == sorted(written + identifiers_of_requests(before), key=repr)
    found = search(client, headers, f"ServiceRequest?identifier={EHR}|R-2024-08-01")
    assert found["total"] == 1
