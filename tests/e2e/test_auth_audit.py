"""Who may call, and the audit trail of what they did: API keys (401 with ``WWW-Authenticate``, 403 for
a missing scope, 404 for another organization's case), one audit row per case read or write (refusals
included), ``GET /audit`` and ``GET /fhir/AuditEvent`` for an organization's admins, and logs that
carry no client data."""
from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import select

from service import auth, create_app
from service import audit
from service.store import audit_events

pytestmark = pytest.mark.e2e

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
CLIENT_NAME = "Wilhelmina Quarrington-Okafor"


def _case(case_id: str = "case-a1", organization: str = "org-1") -> dict:
    case = copy.deepcopy(json.loads((CASES / "minimal.json").read_text()))
    case["id"] = case_id
    case["organization"] = {"id": organization}
    return case


def _store(app):
    return app.extensions["casebridge"].store


def _events(app) -> list:
    audit.flush(app)  # rows are written in batches, in the background
    with _store(app).engine.connect() as conn:
        return conn.execute(select(audit_events).order_by(audit_events.c.id)).all()


@pytest.fixture
def writer(make_key) -> dict:
    return make_key(("cases:read", "cases:write"))


@pytest.fixture
def admin(make_key) -> dict:
    return make_key(("admin",))


@pytest.fixture
def stored_case(client, writer) -> str:
    response = client.post("/cases", json=_case(), headers=writer)
    assert response.status_code == 201, response.get_data(as_text=True)
    return "case-a1"


# -- authentication ------------------------------------------------------------------------------
def _revoked(app, make_key) -> dict:
    headers = make_key(("cases:read",))
    key_id = headers["Authorization"].split("_")[1]
    assert auth.revoke_key(_store(app), key_id)
    return headers


BAD_KEYS = {
    "none": lambda app, make_key: {},
    "not bearer": lambda app, make_key: {"Authorization": "Basic dXNlcjpwYXNz"},
    "malformed": lambda app, make_key: {"Authorization": "Bearer not-a-casebridge-key"},
    "unknown id": lambda app, make_key: {"Authorization": "Bearer cb_0000000000000000_secret"},
    "wrong secret": lambda app, make_key: {
        "Authorization": make_key(("cases:read",))["Authorization"].rsplit("_", 1)[0] + "_wrong"},
    "revoked": _revoked,
}


@pytest.mark.parametrize("kind", BAD_KEYS)
def test_a_missing_or_bad_key_is_a_401_problem_with_www_authenticate(app, client, make_key, kind: str) -> None:
    response = client.get("/cases/case-a1", headers=BAD_KEYS[kind](app, make_key))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["status"] == 401


def _routed(app, path: str) -> bool:
    try:
        app.url_map.bind("testserver").match(path, method="GET")
    except Exception:  # noqa: BLE001 - NotFound, MethodNotAllowed
        return False
    return True


@pytest.mark.parametrize("kind", BAD_KEYS)
@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/Patient/p-1", "/fhir/AuditEvent"])
def test_a_missing_or_bad_key_under_fhir_is_a_401_operation_outcome(app, client, make_key, kind: str,
                                                                      path: str) -> None:
    if not _routed(app, path):
        pytest.xfail(f"the FHIR API does not serve {path} yet")
    response = client.get(path, headers=BAD_KEYS[kind](app, make_key))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.mimetype == "application/fhir+json"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"


def test_a_revoked_key_stops_working_at_once(app, client, make_key) -> None:
    headers = make_key(("admin",))
    assert client.get("/audit", headers=headers).status_code == 200
    auth.revoke_key(_store(app), headers["Authorization"].split("_")[1])
    assert client.get("/audit", headers=headers).status_code == 401


def test_health_needs_no_key(client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").get_json() == {"status": "ok", "database": "reachable"}


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path) -> None:
    app = create_app({"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/casebridge?connect_timeout=2",
                      "migrate": False})
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "unavailable"


def test_a_missing_scope_is_a_403(client, make_key) -> None:
    reader = make_key(("cases:read",))
    response = client.post("/cases", json=_case(), headers=reader)
    assert response.status_code == 403
    assert response.mimetype == "application/problem+json"
    fhir_only = make_key(("fhir:read",))
    assert client.get("/cases/case-a1", headers=fhir_only).status_code == 403


@pytest.mark.parametrize("path", ["/audit", "/fhir/AuditEvent", "/fhir/AuditEvent/1"])
def test_the_audit_trail_needs_the_admin_scope(client, make_key, path: str) -> None:
    everything_but_admin = make_key(("cases:read", "cases:write", "fhir:read", "fhir:write"))
    response = client.get(path, headers=everything_but_admin)
    assert response.status_code == 403
    if path.startswith("/fhir"):
        assert response.get_json()["issue"][0]["code"] == "forbidden"


def test_another_organizations_case_is_not_found(client, make_key, stored_case) -> None:
    other = make_key(("cases:read", "cases:write"), organization="org-2")
    assert client.get(f"/cases/{stored_case}", headers=other).status_code == 404


# -- the audit trail -----------------------------------------------------------------------------
def test_reads_and_writes_are_recorded_with_their_outcome(app, client, writer, stored_case) -> None:
    key_id = writer["Authorization"].split("_")[1]
    assert client.get(f"/cases/{stored_case}", headers=writer).status_code == 200
    assert client.get("/cases/no-such-case", headers=writer).status_code == 404
    events = [e for e in _events(app) if e.key_id == key_id]
    assert [(e.action, e.operation, e.entity_type, e.entity_id, e.outcome) for e in events] == [
        ("C", "create", "Case", "case-a1", 201),
        ("R", "read", "Case", "case-a1", 200),
        ("R", "read", "Case", "no-such-case", 404),
    ]
    assert all(e.organization_id == "org-1" for e in events)
    assert events[1].detail == {"method": "GET", "path": "/cases/<case_id>"}
    assert all(isinstance(e.recorded_at, dt.datetime) for e in events)


def test_refused_attempts_on_cases_are_recorded(app, client, make_key) -> None:
    reader = make_key(("cases:read",))
    client.get("/cases/case-x")  # no key
    client.delete("/cases/case-y", headers=reader)  # no cases:write
    events = _events(app)
    assert [(e.organization_id, e.key_id, e.action, e.entity_type, e.entity_id, e.outcome) for e in events] == [
        (None, None, "R", "Case", "case-x", 401),
        ("org-1", reader["Authorization"].split("_")[1], "D", "Case", "case-y", 403),
    ]


def test_requests_that_touch_no_case_are_not_recorded(app, client, admin) -> None:
    client.get("/healthz")
    client.get("/audit", headers=admin)
    client.get("/no/such/route")
    assert _events(app) == []


def test_a_failing_audit_write_does_not_break_the_response(app, client, writer, stored_case, caplog) -> None:
    with _store(app).engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE audit_events")
    response = client.get(f"/cases/{stored_case}", headers=writer)
    assert response.status_code == 200
    audit.flush(app)
    assert "could not write" in caplog.text and "audit events" in caplog.text


def test_get_audit_shows_an_admins_own_organization_newest_first(app, client, writer, admin, make_key,
                                                                   stored_case) -> None:
    other_writer = make_key(("cases:read", "cases:write"), organization="org-2")
    assert client.post("/cases", json=_case("case-b1", "org-2"), headers=other_writer).status_code == 201
    client.get(f"/cases/{stored_case}", headers=writer)
    body = client.get("/audit", headers=admin).get_json()
    assert [(e["operation"], e["entity"], e["outcome"]) for e in body["items"]] == [
        ("read", {"type": "Case", "id": "case-a1"}, 200),
        ("create", {"type": "Case", "id": "case-a1"}, 201),
    ]
    assert body["next"] is None
    event = body["items"][0]
    assert event["organization_id"] == "org-1" and event["key_id"] == writer["Authorization"].split("_")[1]
    assert event["action"] == "R" and event["method"] == "GET" and event["path"] == "/cases/<case_id>"
    assert dt.datetime.fromisoformat(event["recorded"]).tzinfo is not None
    other_admin = make_key(("admin",), organization="org-2")
    assert [e["entity"]["id"] for e in client.get("/audit", headers=other_admin).get_json()["items"]] == ["case-b1"]


def test_get_audit_filters_and_pages(app, client, writer, admin, stored_case) -> None:
    for _ in range(3):
        client.get(f"/cases/{stored_case}", headers=writer)
    client.get("/cases/case-other", headers=writer)
    assert len(client.get("/audit?entity=case-a1", headers=admin).get_json()["items"]) == 4
    assert len(client.get("/audit?entity=Case/case-other", headers=admin).get_json()["items"]) == 1
    assert client.get("/audit?entity=Goal/case-other", headers=admin).get_json()["items"] == []
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()
    assert client.get("/audit", query_string={"since": later}, headers=admin).get_json()["items"] == []
    assert len(client.get("/audit?since=2000-01-01", headers=admin).get_json()["items"]) == 5

    seen, url = [], "/audit?limit=2"
    while url:
        body = client.get(url, headers=admin).get_json()
        assert len(body["items"]) <= 2
        seen += [e["id"] for e in body["items"]]
        url = body["next"]
    assert len(seen) == 5 and len(set(seen)) == 5
    assert seen == sorted(seen, key=int, reverse=True)


@pytest.mark.parametrize("query", ["since=yesterday", "limit=0", "limit=x", "cursor=abc"])
def test_get_audit_names_a_bad_parameter(client, admin, query: str) -> None:
    response = client.get(f"/audit?{query}", headers=admin)
    assert response.status_code == 400
    assert response.get_json()["errors"][0]["field"] == query.split("=")[0]


# -- FHIR AuditEvent -----------------------------------------------------------------------------
def _validate(resource: dict):
    from fhir.resources.R4B.auditevent import AuditEvent

    return AuditEvent.model_validate(resource)


def test_fhir_audit_events_are_valid_r4b(app, client, writer, admin, stored_case) -> None:
    client.get(f"/cases/{stored_case}", headers=writer)
    client.get("/cases/case-x")
    response = client.get("/fhir/AuditEvent", headers=admin)
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    bundle = response.get_json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    from fhir.resources.R4B.bundle import Bundle
    Bundle.model_validate(bundle)
    read, create = [entry["resource"] for entry in bundle["entry"]]  # the 401 has no organization
    for resource in (read, create):
        _validate(resource)
        assert resource["type"] == {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                                    "code": "rest", "display": "RESTful Operation"}
        assert resource["agent"][0]["requestor"] is True
        assert resource["agent"][0]["who"]["identifier"]["value"] == writer["Authorization"].split("_")[1]
        assert resource["source"]["observer"]["display"] == "casebridge"
        assert resource["entity"][0]["what"]["reference"].startswith("CarePlan/")
        assert resource["entity"][0]["what"]["identifier"]["value"] == "case-a1"
    assert (read["action"], read["subtype"][0]["code"], read["outcome"]) == ("R", "read", "0")
    assert read["subtype"][0]["system"] == "http://hl7.org/fhir/restful-interaction"
    assert (create["action"], create["subtype"][0]["code"], create["outcome"]) == ("C", "create", "0")
    assert dt.datetime.fromisoformat(read["recorded"]).tzinfo is not None


def test_a_careplan_reference_is_the_one_the_case_exports_as(client, writer, admin, stored_case) -> None:
    export = client.get(f"/cases/{stored_case}/fhir", headers=writer)
    if export.status_code != 200:
        pytest.skip(f"GET /cases/<id>/fhir answered {export.status_code}")
    plans = [e["resource"]["id"] for e in export.get_json()["entry"]
             if e["resource"]["resourceType"] == "CarePlan"]
    entry = client.get("/fhir/AuditEvent?_count=1", headers=admin).get_json()["entry"][0]
    assert entry["resource"]["entity"][0]["what"]["reference"] == f"CarePlan/{plans[0]}"


def test_fhir_audit_event_read_and_failures(app, client, writer, admin, make_key, stored_case) -> None:
    client.get("/cases/case-missing", headers=writer)
    entry = client.get("/fhir/AuditEvent?_count=1", headers=admin).get_json()["entry"][0]
    event_id = entry["resource"]["id"]
    assert entry["fullUrl"] == f"http://testserver/fhir/AuditEvent/{event_id}"
    response = client.get(f"/fhir/AuditEvent/{event_id}", headers=admin)
    assert response.status_code == 200
    resource = _validate(response.get_json())
    assert resource.outcome == "4" and resource.action == "R"
    assert resource.entity[0].what.identifier.value == "case-missing"

    other_admin = make_key(("admin",), organization="org-2")
    for path, who in ((f"/fhir/AuditEvent/{event_id}", other_admin), ("/fhir/AuditEvent/999999", admin),
                      ("/fhir/AuditEvent/not-a-number", admin)):
        response = client.get(path, headers=who)
        assert response.status_code == 404
        assert response.get_json()["resourceType"] == "OperationOutcome"


def test_fhir_audit_event_search_parameters(client, writer, admin, stored_case) -> None:
    for _ in range(4):
        client.get(f"/cases/{stored_case}", headers=writer)
    client.get("/cases/case-other", headers=writer)

    def ids(query: str) -> list[str]:
        response = client.get(f"/fhir/AuditEvent?{query}", headers=admin)
        assert response.status_code == 200, response.get_data(as_text=True)
        return [e["resource"]["id"] for e in response.get_json()["entry"]]

    assert len(ids("")) == 6
    assert len(ids("entity=case-a1")) == 5
    plan = client.get("/fhir/AuditEvent?entity=case-other", headers=admin).get_json()["entry"][0]
    reference = plan["resource"]["entity"][0]["what"]["reference"]
    assert reference.startswith("CarePlan/")
    today = dt.datetime.now(dt.timezone.utc).date()
    assert len(ids(f"date={today.isoformat()}")) == 6
    assert len(ids(f"date=ge{today.isoformat()}&date=lt{(today + dt.timedelta(days=1)).isoformat()}")) == 6
    assert ids(f"date=gt{today.isoformat()}") == []
    assert ids("date=lt2000-01") == []
    assert len(ids(f"date=le{today.year}")) == 6

    seen, response = [], client.get("/fhir/AuditEvent?_count=4", headers=admin).get_json()
    while True:
        seen += [e["resource"]["id"] for e in response["entry"]]
        following = [link["url"] for link in response["link"] if link["relation"] == "next"]
        if not following:
            break
        response = client.get(following[0].replace("http://testserver", ""), headers=admin).get_json()
    assert len(seen) == 6 and len(set(seen)) == 6

    bad = client.get("/fhir/AuditEvent?date=sometime", headers=admin)
    assert bad.status_code == 400 and bad.get_json()["issue"][0]["expression"] == ["date"]


# -- logs ----------------------------------------------------------------------------------------
def test_no_client_data_in_logs(client, writer, admin, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    case = _case("case-logged")
    case["client"] = {"name": {"given": [CLIENT_NAME.split()[0]], "family": CLIENT_NAME.split()[1]},
                      "birth_date": "1961-07-04"}
    secret = "Quarrington"
    create = client.post("/cases", json=case, headers=writer)
    client.post("/cases", data=json.dumps(case), headers=writer, content_type="text/plain")  # 415
    client.post("/cases", data=b'{"client": {"name": "' + secret.encode() + b'"', headers=writer,
                content_type="application/json")  # 400: bad JSON
    client.get("/cases", query_string={"identifier": secret, "status": CLIENT_NAME}, headers=writer)
    client.get(f"/cases/case-logged?name={secret}", headers=writer)
    client.get(f"/fhir/Patient?name={secret}", headers=writer)
    client.get(f"/audit?entity={secret}", headers=admin)
    client.get(f"/no/route?name={secret}")

    text = "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert secret not in text and "Wilhelmina" not in text and "1961-07-04" not in text
    requests = [r for r in caplog.records if r.name == "casebridge.request"]
    assert len(requests) == 8
    first = requests[0]
    assert (first.http_method, first.route, first.status) == ("POST", "/cases", create.status_code)
    assert first.key_id == writer["Authorization"].split("_")[1]
    assert first.getMessage().startswith(f"POST /cases {create.status_code} ")
    assert "GET /cases/<case_id> " in "\n".join(r.getMessage() for r in requests)
    assert requests[-1].route == "<no route>"


def test_the_audit_trail_on_each_database(database_url: str) -> None:
    app = create_app({"database_url": database_url, "base_url": "http://testserver"})
    client = app.test_client()
    writer = {"Authorization": "Bearer " + auth.create_key(_store(app), "org-1", ["cases:read", "cases:write"])}
    admin = {"Authorization": "Bearer " + auth.create_key(_store(app), "org-1", ["admin"])}
    assert client.post("/cases", json=_case(), headers=writer).status_code == 201
    assert client.get("/cases/case-a1", headers=writer).status_code == 200
    client.get("/cases/case-a1")
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    body = client.get(f"/audit?entity=case-a1&since={today}", headers=admin).get_json()
    assert [(e["operation"], e["outcome"]) for e in body["items"]] == [("read", 200), ("create", 201)]
    bundle = client.get(f"/fhir/AuditEvent?date=ge{today}&entity=Case/case-a1", headers=admin).get_json()
    assert [_validate(e["resource"]).action for e in bundle["entry"]] == ["R", "C"]
    assert len(_events(app)) == 3
