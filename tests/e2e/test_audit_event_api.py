"""GET /fhir/AuditEvent and /fhir/AuditEvent/{id} keep the rules of every /fhir route (JSON only: XML asked
for by ``_format`` or ``Accept`` is a 406 OperationOutcome; an unknown parameter is a 400 naming it, never
ignored), and GET /audit refuses an unknown parameter with a problem+json 400 naming it. Over HTTP."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
FHIR = "application/fhir+json"


@pytest.fixture
def admin(make_key) -> dict:
    """A key that may read the audit trail and the FHIR API, to compare AuditEvent with Patient."""
    return make_key(("admin", "fhir:read"))


@pytest.fixture
def event_id(client, make_key, admin) -> str:
    """The newest AuditEvent of org-1, after a case was stored and read twice."""
    writer = make_key(("cases:read", "cases:write"))
    case = copy.deepcopy(json.loads((CASES / "minimal.json").read_text()))
    case["id"], case["organization"] = "case-a1", {"id": "org-1"}
    assert client.post("/cases", json=case, headers=writer).status_code == 201
    for _ in range(2):
        assert client.get("/cases/case-a1", headers=writer).status_code == 200
    response = client.get("/fhir/AuditEvent?_count=1", headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["entry"][0]["resource"]["id"]


def outcome(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == FHIR
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    return body


# -- formats -------------------------------------------------------------------------------------
XML_REQUESTS = {
    "_format=xml": ("_format=xml", {}),
    "_format=fhir+xml": ("_format=application/fhir%2Bxml", {}),
    "_format=text/xml": ("_format=text/xml", {}),
    "Accept fhir+xml": ("", {"Accept": "application/fhir+xml"}),
    "Accept xml": ("", {"Accept": "application/xml"}),
}
JSON_REQUESTS = {
    "no preference": ("", {}),
    "_format=json": ("_format=json", {}),
    "_format=fhir+json": ("_format=application/fhir%2Bjson", {}),
    "Accept fhir+json": ("", {"Accept": "application/fhir+json"}),
    "Accept json": ("", {"Accept": "application/json"}),
    "Accept anything": ("", {"Accept": "*/*"}),
    "_format over Accept": ("_format=json", {"Accept": "application/fhir+xml"}),
}


@pytest.mark.parametrize("kind", XML_REQUESTS)
@pytest.mark.parametrize("route", ["search", "read"])
def test_xml_is_a_406_operation_outcome_as_on_every_fhir_route(client, admin, event_id, route, kind) -> None:
    query, headers = XML_REQUESTS[kind]
    path = "/fhir/AuditEvent" if route == "search" else f"/fhir/AuditEvent/{event_id}"
    body = outcome(client.get(f"{path}?{query}", headers={**admin, **headers}), 406)
    assert body["issue"][0]["code"] == "not-supported"
    patient_path = "/fhir/Patient" if route == "search" else "/fhir/Patient/p-1"
    same = outcome(client.get(f"{patient_path}?{query}", headers={**admin, **headers}), 406)
    assert same["issue"][0]["code"] == body["issue"][0]["code"]


@pytest.mark.parametrize("kind", JSON_REQUESTS)
@pytest.mark.parametrize("route", ["search", "read"])
def test_json_asked_for_in_any_way_is_served(client, admin, event_id, route, kind) -> None:
    query, headers = JSON_REQUESTS[kind]
    path = "/fhir/AuditEvent" if route == "search" else f"/fhir/AuditEvent/{event_id}"
    response = client.get(f"{path}?{query}", headers={**admin, **headers})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == FHIR
    assert response.get_json()["resourceType"] == ("Bundle" if route == "search" else "AuditEvent")


# -- parameters ----------------------------------------------------------------------------------
UNKNOWN_SEARCH = {
    "foo=1": ["foo"],
    "_sort=-date": ["_sort"],
    "_offset=1": ["_offset"],
    "_id=1": ["_id"],
    "patient=Patient/p-1": ["patient"],
    "date:missing=false": ["date:missing"],
    "entity:CarePlan=x": ["entity:CarePlan"],
    "entity=case-a1&entity=case-b1": ["entity"],
    "_count=1&_count=2": ["_count"],
    "foo=1&bar=2&date=ge2024": ["foo", "bar"],
}


@pytest.mark.parametrize("query", UNKNOWN_SEARCH)
def test_an_unknown_or_repeated_search_parameter_is_a_400_naming_it(client, admin, event_id, query) -> None:
    body = outcome(client.get(f"/fhir/AuditEvent?{query}", headers=admin), 400)
    assert [issue["expression"] for issue in body["issue"]] == [[name] for name in UNKNOWN_SEARCH[query]]
    assert all(issue["code"] == "invalid" and issue["diagnostics"] for issue in body["issue"])


def test_the_unknown_parameter_message_lists_what_is_supported(client, admin, event_id) -> None:
    issue = outcome(client.get("/fhir/AuditEvent?foo=1", headers=admin), 400)["issue"][0]
    for name in ("date", "entity", "_count"):
        assert name in issue["diagnostics"]
    # as on the searches of the case resources
    assert outcome(client.get("/fhir/Patient?foo=1", headers=admin), 400)["issue"][0]["expression"] == ["foo"]


def test_the_known_parameters_still_work_and_the_next_link_is_accepted(client, admin, event_id) -> None:
    query = "date=ge2000-01-01&date=lt2999-01-01&entity=case-a1&_count=1&_format=json"
    response = client.get(f"/fhir/AuditEvent?{query}", headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)
    bundle = response.get_json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [event_id]
    following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert following
    response = client.get(following[0].replace("http://testserver", ""), headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["entry"]) == 1


@pytest.mark.parametrize("query", ["foo=1", "_count=1", "date=2024", "entity=case-a1", "_summary=true"])
def test_a_read_takes_no_parameter_but_format(client, admin, event_id, query) -> None:
    body = outcome(client.get(f"/fhir/AuditEvent/{event_id}?{query}", headers=admin), 400)
    assert body["issue"][0]["expression"] == [query.split("=")[0]]
    assert client.get(f"/fhir/AuditEvent/{event_id}?_format=json", headers=admin).status_code == 200


UNKNOWN_AUDIT = {
    "foo=1": ["foo"],
    "_count=5": ["_count"],
    "date=2024-01-01": ["date"],
    "_format=json": ["_format"],
    "limit=1&limit=2": ["limit"],
    "entity=case-a1&entity=case-b1": ["entity"],
    "foo=1&bar=2&limit=1": ["foo", "bar"],
}


@pytest.mark.parametrize("query", UNKNOWN_AUDIT)
def test_get_audit_refuses_an_unknown_or_repeated_parameter_naming_it(client, admin, event_id, query) -> None:
    response = client.get(f"/audit?{query}", headers=admin)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert [error["field"] for error in body["errors"]] == UNKNOWN_AUDIT[query]
    assert all(error["message"] for error in body["errors"])


def test_get_audit_known_parameters_and_next_link_still_work(client, admin, event_id) -> None:
    response = client.get("/audit?entity=case-a1&since=2000-01-01&limit=1", headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert len(body["items"]) == 1 and body["next"]
    response = client.get(body["next"].replace("http://testserver", ""), headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["items"]) == 1
