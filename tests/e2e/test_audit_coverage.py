"""The audit trail covers every read and write of a case: each JSON API case route, the FHIR API's
reads, searches and writes, ``POST /import`` and FHIR transaction and batch Bundles (which name every
case they wrote), as admins read it back (JSON and FHIR AuditEvent); and rows made while the database
is down wait in the spool and are written once it is back (or at the next start), none twice, with
nothing of the client's in the logs."""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from service import audit, auth, create_app
from service.store import audit_events

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
DISCHARGE = "dc-2024-0517-0042"  # the case of the discharge golden Bundle
REALISTIC = "schc-geri-2024-0712"  # the case of the realistic fixture
SECRET = "Quarrington"


def _case(name: str = "minimal", case_id: str | None = None) -> dict:
    case = copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text()))
    case["organization"] = {**case.get("organization", {}), "id": "org-1"}
    if case_id is not None:
        case["id"] = case_id
    return case


def _key_id(headers: dict) -> str:
    return headers["Authorization"].split("_")[1]


def _rows(app) -> list:
    audit.flush(app)
    with app.extensions["casebridge"].store.engine.connect() as conn:
        return conn.execute(select(audit_events).order_by(audit_events.c.id)).all()


def _what(rows) -> list[tuple]:
    return [(r.action, r.operation, r.entity_type, r.entity_id, r.outcome) for r in rows]


def _rows_of(app, key: dict, since: int = 0) -> list:
    return [r for r in _rows(app) if r.key_id == _key_id(key) and r.id > since]


def _last_id(app) -> int:
    rows = _rows(app)
    return rows[-1].id if rows else 0


@pytest.fixture
def key(make_key) -> dict:
    return make_key(("cases:read", "cases:write", "fhir:read", "fhir:write"))


@pytest.fixture
def admin(make_key) -> dict:
    return make_key(("admin",))


# -- the JSON API --------------------------------------------------------------------------------
def _create(client, key):
    return client.post("/cases", json=_case(case_id="case-a1"), headers=key)


ROUTES = {
    "POST /cases": (lambda client, key: _create(client, key), ("C", "create", "Case", "case-a1", 201)),
    "GET /cases/{id}": (lambda client, key: client.get("/cases/case-a1", headers=key),
                        ("R", "read", "Case", "case-a1", 200)),
    "GET /cases/{id} missing": (lambda client, key: client.get("/cases/case-zz", headers=key),
                                ("R", "read", "Case", "case-zz", 404)),
    "PUT /cases/{id}": (lambda client, key: client.put("/cases/case-a1", json={**_case(case_id="case-a1"),
                                                                               "title": "Put"},
                                                       headers={**key, "If-Match": 'W/"1"'}),
                        ("U", "update", "Case", "case-a1", 200)),
    "PUT /cases/{id} stale": (lambda client, key: client.put("/cases/case-a1", json=_case(case_id="case-a1"),
                                                             headers={**key, "If-Match": 'W/"7"'}),
                              ("U", "update", "Case", "case-a1", 412)),
    "PATCH /cases/{id}": (lambda client, key: client.patch("/cases/case-a1", data=json.dumps({"title": "Patched"}),
                                                           content_type="application/merge-patch+json",
                                                           headers={**key, "If-Match": "*"}),
                          ("U", "patch", "Case", "case-a1", 200)),
    "DELETE /cases/{id}": (lambda client, key: client.delete("/cases/case-a1", headers=key),
                           ("D", "delete", "Case", "case-a1", 200)),
    "GET /cases": (lambda client, key: client.get("/cases?status=intake", headers=key),
                   ("E", "search-type", "Case", None, 200)),
    "GET /cases/{id}/history": (lambda client, key: client.get("/cases/case-a1/history", headers=key),
                                ("R", "history-instance", "Case", "case-a1", 200)),
    "GET /cases/{id}/fhir": (lambda client, key: client.get("/cases/case-a1/fhir?type=transaction", headers=key),
                             ("R", "read", "Case", "case-a1", 200)),
}


@pytest.mark.parametrize("route", ROUTES)
def test_each_case_route_records_who_what_when_and_outcome(app, client, key, route: str) -> None:
    call, expected = ROUTES[route]
    if route != "POST /cases":
        assert _create(client, key).status_code == 201
    since = _last_id(app)
    before = dt.datetime.now(dt.timezone.utc)
    response = call(client, key)
    after = dt.datetime.now(dt.timezone.utc)
    assert response.status_code == expected[-1], response.get_data(as_text=True)
    [row] = _rows_of(app, key, since)
    assert _what([row]) == [expected]
    assert (row.organization_id, row.key_id) == ("org-1", _key_id(key))
    recorded = row.recorded_at if row.recorded_at.tzinfo else row.recorded_at.replace(tzinfo=dt.timezone.utc)
    assert before <= recorded <= after


def test_an_import_names_each_case_it_made_changed_or_matched(app, client, key) -> None:
    bundle = json.loads((GOLDEN / "discharge.collection.json").read_text())
    assert client.post("/import", json=bundle, headers=key).status_code == 200
    assert client.post("/import", json=bundle, headers=key).status_code == 200
    changed = copy.deepcopy(bundle)
    next(e["resource"] for e in changed["entry"] if e["resource"]["resourceType"] == "CarePlan")["title"] = "New"
    assert client.post("/import", json=changed, headers=key).status_code == 200
    assert _what(_rows_of(app, key)) == [
        ("E", "operation", "Case", None, 200), ("C", "create", "Case", DISCHARGE, 200),
        ("E", "operation", "Case", None, 200), ("R", "read", "Case", DISCHARGE, 200),
        ("E", "operation", "Case", None, 200), ("U", "update", "Case", DISCHARGE, 200),
    ]


def test_an_ndjson_import_names_every_case_and_a_refused_one_names_none(app, client, key) -> None:
    patients = [{"resourceType": "Patient", "id": f"p-{n}", "name": [{"family": "Okafor"}],
                 "identifier": [{"system": "https://a.example/mrn", "value": str(n)}]} for n in (1, 2)]
    response = client.post("/import", data="\n".join(json.dumps(p) for p in patients),
                           content_type="application/fhir+ndjson", headers=key)
    assert response.status_code == 200, response.get_data(as_text=True)
    made = [c["id"] for c in response.get_json()["cases"]]
    assert len(made) == 2
    refused = client.post("/import", json={"resourceType": "Patient", "birthDate": "2023-02-30"}, headers=key)
    assert refused.status_code == 400
    assert _what(_rows_of(app, key)) == [("E", "operation", "Case", None, 200)] + [
        ("C", "create", "Case", case_id, 200) for case_id in made] + [("E", "operation", "Case", None, 400)]


# -- the FHIR API --------------------------------------------------------------------------------
def _patient(mrn: str = "MRN-1") -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
            "name": [{"family": "Okafor", "given": ["Ada"]}], "gender": "female", "birthDate": "1980-02-03"}


def _referral(subject: str) -> dict:
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "464131000124100"}]},
            "subject": {"reference": subject}, "authoredOn": "2024-06-03"}


def test_fhir_reads_searches_creates_and_updates_are_recorded(app, client, key) -> None:
    created = client.post("/fhir/Patient", json=_patient(), headers=key)
    assert created.status_code == 201, created.get_json()
    patient = created.get_json()
    assert client.get(f"/fhir/Patient/{patient['id']}", headers=key).status_code == 200
    assert client.get("/fhir/Patient?name=oka", headers=key).status_code == 200
    assert client.put(f"/fhir/Patient/{patient['id']}", json={**patient, "gender": "other"},
                      headers=key).status_code == 200
    assert client.get("/fhir/Patient/no-such", headers=key).status_code == 404
    rows = _rows_of(app, key)
    (case_id,) = _new_cases(client, key, set())
    assert _what(rows) == [
        ("C", "create", "Patient", patient["id"], 201),
        ("C", "create", "Case", case_id, 201),  # the case the new Patient is a view of
        ("R", "read", "Patient", patient["id"], 200),
        ("E", "search-type", "Patient", None, 200),
        ("U", "update", "Patient", patient["id"], 200),
        ("U", "update", "Case", case_id, 200),
        ("R", "read", "Patient", "no-such", 404),
    ]
    assert {r.key_id for r in rows} == {_key_id(key)}


def test_a_conditional_create_that_finds_its_match_names_no_case_written(app, client, key) -> None:
    header = {**key, "If-None-Exist": "identifier=urn:oid:1.2.3|MRN-7"}
    assert client.post("/fhir/Patient", json=_patient("MRN-7"), headers=header).status_code == 201
    since = _last_id(app)
    assert client.post("/fhir/Patient", json=_patient("MRN-7"), headers=header).status_code == 200
    assert [(r.operation, r.entity_type) for r in _rows_of(app, key, since)] == [("create", "Patient")]


def _new_cases(client, key, before: set[str]) -> list[str]:
    return [i["id"] for i in client.get("/cases?limit=500", headers=key).get_json()["items"] if i["id"] not in before]


def _seeded(client, key) -> dict:
    """The realistic case, stored over the JSON API; its FHIR Goal and CarePlan."""
    assert client.post("/cases", json=_case("realistic"), headers=key).status_code == 201
    goal = client.get("/fhir/Goal?_count=1", headers=key).get_json()["entry"][0]["resource"]
    plan = client.get("/fhir/CarePlan?_count=1", headers=key).get_json()["entry"][0]["resource"]
    return {"goal": goal, "plan": plan}


def test_a_transaction_names_the_cases_it_made_and_changed(app, client, key) -> None:
    seeded = _seeded(client, key)
    since = _last_id(app)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": _patient("MRN-T"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
         "resource": _referral("urn:uuid:11111111-1111-4111-8111-111111111111"),
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"resource": {**seeded["goal"], "lifecycleStatus": "cancelled"},
         "request": {"method": "PUT", "url": f"Goal/{seeded['goal']['id']}"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=key)
    assert response.status_code == 200, response.get_json()
    rows = _rows_of(app, key, since)
    [made] = _new_cases(client, key, {REALISTIC})
    assert _what(rows) == [
        ("E", "transaction", "Bundle", None, 200),
        ("C", "create", "Case", made, 200),
        ("U", "update", "Case", REALISTIC, 200),
    ]


def test_a_failed_transaction_names_no_case(app, client, key) -> None:
    seeded = _seeded(client, key)
    since = _last_id(app)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": _patient("MRN-F"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**seeded["goal"], "id": "absent"}, "request": {"method": "PUT", "url": "Goal/absent"}},
    ]}
    assert client.post("/fhir", json=bundle, headers=key).status_code == 404
    assert _what(_rows_of(app, key, since)) == [("E", "transaction", "Bundle", None, 404)]
    assert _new_cases(client, key, {REALISTIC}) == []


def test_a_batch_names_the_cases_it_read_and_made(app, client, key) -> None:
    seeded = _seeded(client, key)
    since = _last_id(app)
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"CarePlan/{seeded['plan']['id']}"}},
        {"resource": _patient("MRN-B"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Goal", "lifecycleStatus": "bad"}, "request": {"method": "POST", "url": "Goal"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=key)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["entry"][2]["response"]["status"].startswith("4")
    rows = _rows_of(app, key, since)
    [made] = _new_cases(client, key, {REALISTIC})
    assert _what(rows) == [
        ("E", "batch", "Bundle", None, 200),
        ("R", "read", "Case", REALISTIC, 200),
        ("C", "create", "Case", made, 200),
    ]


# -- read back by an admin -----------------------------------------------------------------------
def test_an_admin_reads_every_event_back_as_json_and_as_fhir_audit_events(app, client, key, admin) -> None:
    for call, _expected in ROUTES.values():
        call(client, key)
    client.post("/import", json=json.loads((GOLDEN / "discharge.collection.json").read_text()), headers=key)
    client.post("/fhir", headers=key, json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": _patient("MRN-A"), "request": {"method": "POST", "url": "Patient"}}]})
    client.get("/fhir/Patient?name=oka", headers=key)
    rows = _rows(app)
    assert len(rows) == len(ROUTES) + 2 + 2 + 1

    items, url = [], "/audit?limit=7"
    while url:
        body = client.get(url, headers=admin).get_json()
        items += body["items"]
        url = body["next"]
    assert [(e["id"], e["key_id"], e["operation"], e["entity"], e["outcome"]) for e in reversed(items)] == [
        (str(r.id), r.key_id, r.operation, {"type": r.entity_type, "id": r.entity_id}, r.outcome) for r in rows]
    assert [e["entity"]["id"] for e in client.get(f"/audit?entity={DISCHARGE}", headers=admin).get_json()["items"]] \
        == [DISCHARGE]

    searchset = client.get("/fhir/AuditEvent?_count=100", headers=admin).get_json()
    Bundle.model_validate(searchset)
    events = [AuditEvent.model_validate(e["resource"]) for e in searchset["entry"]]
    assert [e.id for e in reversed(events)] == [str(r.id) for r in rows]
    for event, row in zip(reversed(events), rows):
        assert event.agent[0].who.identifier.value == row.key_id
        assert (event.action, event.subtype[0].code) == (row.action, row.operation)
        assert event.outcome == ("0" if row.outcome < 400 else "4")
        if row.entity_type == "Case" and row.entity_id:
            assert event.entity[0].what.identifier.value == row.entity_id
            assert event.entity[0].what.reference.startswith("CarePlan/")
    [imported] = client.get(f"/fhir/AuditEvent?entity=Case/{DISCHARGE}", headers=admin).get_json()["entry"]
    assert (imported["resource"]["action"], imported["resource"]["subtype"][0]["code"]) == ("C", "create")


# -- while the database is down ------------------------------------------------------------------
@pytest.fixture
def database(database_url: str, tmp_path: Path) -> str:
    """The test's database; on SQLite, in a folder of its own that an outage can take away."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'db' / 'casebridge.db'}"
    return database_url


def _app(database: str, home: Path):
    return create_app({"database_url": database, "base_url": "http://testserver", "home": home})


@contextlib.contextmanager
def database_down(app, database: str) -> Iterator[None]:
    """The database really unreachable: SQLite's folder moved away, PostgreSQL refusing connections
    (and those open cut), with the app's pooled connections closed as a restart would close them."""
    engine = app.extensions["casebridge"].store.engine
    url = make_url(database)
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database).parent
        away = folder.with_name(folder.name + "-away")
        engine.dispose()
        folder.rename(away)
        try:
            yield
        finally:
            away.rename(folder)
            engine.dispose()
        return
    server = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = url.database
    with server.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
    try:
        yield
    finally:
        with server.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        server.dispose()


def _spool(app) -> Path:
    return app.extensions["casebridge_audit"].spool.path


def _spooled(app) -> int:
    path = _spool(app)
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _during_outage(client, key: dict, tag: str) -> list[tuple[str, int]]:
    """Requests on cases while the database is down: (the case id each names, its status)."""
    made = []
    for n in range(3):
        case_id = f"{tag}-{n}"
        made.append((case_id, client.get(f"/cases/{case_id}").status_code))  # no key: 401, no database needed
        made.append((case_id, client.get(f"/cases/{case_id}", headers=key).status_code))
    client.get(f"/fhir/Patient?name={SECRET}")
    return made


def _count_by_case(app, prefix: str, flush: bool = True) -> dict[tuple[str, int], int]:
    """How many rows name each case whose id starts with ``prefix``, by outcome."""
    if flush:
        audit.flush(app)
    with app.extensions["casebridge"].store.engine.connect() as conn:
        rows = conn.execute(select(audit_events)).all()
    counts: dict[tuple[str, int], int] = {}
    for row in rows:
        if row.entity_id and row.entity_id.startswith(prefix):
            counts[(row.entity_id, row.outcome)] = counts.get((row.entity_id, row.outcome), 0) + 1
    return counts


def _expected(made: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = {}
    for item in made:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _no_client_data(caplog) -> None:
    text_ = "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert SECRET not in text_
    for record in caplog.records:
        if record.name == "casebridge.audit":
            assert all(isinstance(a, int) or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a) for a in record.args)


def test_rows_made_while_the_database_is_down_are_written_once_it_is_back(database: str, tmp_path: Path,
                                                                         caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="casebridge")
    app = _app(database, tmp_path / "home")
    client = app.test_client()
    store = app.extensions["casebridge"].store
    key = {"Authorization": "Bearer " + auth.create_key(store, "org-1", ["cases:read", "cases:write"])}
    admin = {"Authorization": "Bearer " + auth.create_key(store, "org-1", ["admin"])}
    assert client.post("/cases", json=_case(case_id="outage-0"), headers=key).status_code == 201
    assert _count_by_case(app, "outage-") == {("outage-0", 201): 1}

    with database_down(app, database):
        made = _during_outage(client, key, "outage")
        audit.flush(app)  # the database refuses them: into the spool, not dropped
        assert _spooled(app) == len(made) + 1
        more = _during_outage(client, key, "outage")  # behind them, in order
        audit.flush(app)
        assert _spooled(app) == 2 * (len(made) + 1)
        cut_short = _spool(app).read_bytes()
    assert any("could not write" in r.getMessage() for r in caplog.records)

    body = client.get("/audit?limit=500", headers=admin).get_json()  # the trail's read writes the spool first
    assert _spooled(app) == 0
    expected = _expected(made + more)
    expected[("outage-0", 201)] = 1
    assert _count_by_case(app, "outage-") == expected
    own = [r.id for r in _rows(app) if r.organization_id == "org-1" and r.entity_id.startswith("outage-")]
    assert sorted(int(e["id"]) for e in body["items"] if e["entity"]["id"].startswith("outage-")) == own

    # a replay cut short (the process killed after the commit, before the spool was emptied) is done
    # again at the next flush: it writes none of the rows twice
    _spool(app).write_bytes(cut_short)
    audit.flush(app)
    assert _spooled(app) == 0
    assert _count_by_case(app, "outage-") == expected
    fhir = client.get("/fhir/AuditEvent?_count=200", headers=admin).get_json()
    for entry in fhir["entry"]:
        AuditEvent.model_validate(entry["resource"])
    _no_client_data(caplog)


def test_the_spool_is_written_at_the_next_start(database: str, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="casebridge")
    home = tmp_path / "home"
    app = _app(database, home)
    client = app.test_client()
    key = {"Authorization": "Bearer " + auth.create_key(app.extensions["casebridge"].store, "org-1",
                                                        ["cases:read"])}
    client.get("/cases/restart-warmup", headers=key)
    audit.flush(app)
    with database_down(app, database):
        made = _during_outage(client, key, "restart")
        app.extensions["casebridge_audit"].close()  # the process ends with the database still down
        assert _spooled(app) == len(made) + 1
    assert _count_by_case(app, "restart-", flush=False) == {("restart-warmup", 404): 1}  # nothing written yet

    again = _app(database, home)  # the next start writes what the spool holds
    assert _spooled(again) == 0 and _spool(again) == _spool(app)
    assert _count_by_case(again, "restart-") == {**_expected(made), ("restart-warmup", 404): 1}
    again.extensions["casebridge_audit"].close()
    _no_client_data(caplog)


def test_a_spool_is_kept_per_database(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = create_app({"database_url": f"sqlite:///{tmp_path / 'one.db'}", "home": home})
    second = create_app({"database_url": f"sqlite:///{tmp_path / 'two.db'}", "home": home})
    assert _spool(first) != _spool(second) and _spool(first).parent == home / "audit-spool"


def test_a_line_cut_short_by_a_crash_costs_no_other_row(database: str, tmp_path: Path) -> None:
    app = _app(database, tmp_path / "home")
    client = app.test_client()
    with database_down(app, database):
        client.get("/cases/torn-1")
        audit.flush(app)
        with _spool(app).open("ab") as spool:
            spool.write(b'{"recorded_at": "2024-')  # a crash in the middle of an append
        client.get("/cases/torn-2")
        audit.flush(app)
    audit.flush(app)
    assert _count_by_case(app, "torn-") == {("torn-1", 401): 1, ("torn-2", 401): 1}
    assert _spooled(app) == 0


def test_an_entity_id_too_long_for_its_column_is_cut_not_lost(database: str, tmp_path: Path) -> None:
    app = _app(database, tmp_path / "home")
    client = app.test_client()
    long_id = "long-" + "x" * 300
    assert client.get(f"/cases/{long_id}").status_code == 401
    client.get("/cases/after-the-long-one")
    assert _count_by_case(app, "long-") == {(long_id[:128], 401): 1}
    assert _count_by_case(app, "after-") == {("after-the-long-one", 401): 1}
    assert _spooled(app) == 0
