"""Tenancy on the FHIR API: another organization's resource is not found, exactly as if it did not
exist. With a key of organization B, every interaction on organization A's resources (read, vread,
_history, update with If-Match, $everything, search, conditional create, a transaction or batch entry,
a reference from a created resource, AuditEvent) answers what the same interaction answers for an id
nobody has: the same status, headers and OperationOutcome, the id aside. A's data is unchanged after."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
TYPES = ("Patient", "CarePlan", "Goal", "ServiceRequest", "Condition", "Task")


def case_json(name: str, org: str) -> dict:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data["organization"] = {**data["organization"], "id": org}
    return data


def answer(response, rid: str):
    """What a response says, with the id put as <id>."""
    text = response.get_data(as_text=True).replace(rid, "<id>")
    headers = sorted(h for h in ("ETag", "Location", "Last-Modified", "Content-Location") if h in response.headers)
    return response.status_code, response.mimetype, json.loads(text) if text else None, headers


def same_as_missing(theirs: str, send, nobodys: str = ""):
    """``send(id)`` with their id answers what it answers with an id nobody has; that answer."""
    nobodys = nobodys or str(uuid.uuid4())
    got, control = answer(send(theirs), theirs), answer(send(nobodys), nobodys)
    assert got == control
    assert got[0] < 500, got
    return got


def with_id(value, rid: str):
    """``value`` (JSON) with each {id} in it put as ``rid``."""
    return json.loads(json.dumps(value).replace("{id}", rid))


class World:
    """Organization A (the realistic case) and B (the discharge case), a key of each."""

    def __init__(self, client, store, make_key):
        self.client, self.store = client, store
        store.add_case("org-a", case_json("realistic", "org-a"))
        store.add_case("org-b", case_json("discharge", "org-b"))
        self.a, self.b = make_key(organization="org-a"), make_key(organization="org-b")
        self.a_admin, self.b_admin = make_key(["admin"], "org-a"), make_key(["admin"], "org-b")
        self.theirs = {t: self.all(t, self.a) for t in TYPES}  # A's resources, as A sees them
        mine = {r["id"] for t in TYPES for r in self.all(t, self.b)}
        assert mine and not mine & {r["id"] for rs in self.theirs.values() for r in rs}

    def all(self, rtype: str, headers: dict) -> list[dict]:
        response = self.client.get(f"/fhir/{rtype}?_count=500", headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        return [e["resource"] for e in response.json.get("entry", ())]

    def first(self, rtype: str) -> dict:
        return self.theirs[rtype][0]

    def snapshot(self) -> dict:
        """A's cases (versions and records), and every resource and its history as A reads them."""
        cases = sorted((c.id, c.version, c.updated_at, c.data) for c in self.store.list_cases("org-a", limit=500))
        fhir = {t: sorted(self.all(t, self.a), key=lambda r: r["id"]) for t in TYPES}
        histories = {f"{t}/{r['id']}": self.client.get(f"/fhir/{t}/{r['id']}/_history", headers=self.a).json
                     for t, rs in fhir.items() for r in rs}
        return {"cases": cases, "fhir": fhir, "histories": histories}


@pytest.fixture
def world(client, app, make_key):
    return World(client, app.extensions["casebridge"].store, make_key)


@pytest.mark.parametrize("rtype", TYPES)
def test_read_vread_and_history_answer_as_if_missing(world, rtype):
    before = world.snapshot()
    for path in ("", "?_format=json", "/_history", "/_history/1", "/_history/2"):
        status, _, outcome, _ = same_as_missing(
            world.first(rtype)["id"], lambda rid: world.client.get(f"/fhir/{rtype}/{rid}{path}", headers=world.b))
        assert status == 404 and outcome["issue"][0]["code"] == "not-found", path
    assert world.snapshot() == before


def test_everything_answers_as_if_missing(world):
    before = world.snapshot()
    status, *_ = same_as_missing(world.first("Patient")["id"],
                                 lambda rid: world.client.get(f"/fhir/Patient/{rid}/$everything", headers=world.b))
    assert status == 404
    assert world.snapshot() == before


@pytest.mark.parametrize("rtype", TYPES)
def test_update_with_if_match_answers_as_if_missing_and_changes_nothing(world, rtype):
    before = world.snapshot()
    resource = world.first(rtype)
    body = json.loads(json.dumps({**resource, "meta": {}}).replace(resource["id"], "{id}"))
    for condition in ({"If-Match": 'W/"1"'}, {"If-Match": 'W/"7"'}, {}):
        status, _, outcome, _ = same_as_missing(resource["id"], lambda rid: world.client.put(
            f"/fhir/{rtype}/{rid}", json=with_id(body, rid), headers={**world.b, **condition}))
        assert status == 404 and outcome["issue"][0]["code"] == "not-found", outcome
    assert world.snapshot() == before


def test_search_never_shows_another_organizations_resources(world):
    before = world.snapshot()
    client, b = world.client, world.b
    theirs = {r["id"] for rs in world.theirs.values() for r in rs}
    for rtype in TYPES:
        shown = {r["id"] for r in world.all(rtype, b)}
        assert shown and not shown & theirs, rtype
    patient, goal = world.first("Patient"), world.first("Goal")
    mrn = next(i for i in patient["identifier"] if "casebridge.dev" not in i["system"])
    searches = [  # (type, query with {id}, their value)
        ("Patient", "_id={id}", patient["id"]),
        ("Patient", f"identifier={mrn['system']}|{{id}}", mrn["value"]),
        ("Patient", "identifier={id}", mrn["value"]),
        ("Patient", "_id={id}&_revinclude=CarePlan:patient&_revinclude=Task:patient", patient["id"]),
        ("CarePlan", "_id={id}&_include=CarePlan:goal&_include=CarePlan:subject", world.first("CarePlan")["id"]),
        ("CarePlan", "patient=Patient/{id}", patient["id"]),
        ("CarePlan", "goal={id}", goal["id"]),
        ("Goal", "_id={id}", goal["id"]),
        ("Goal", "subject={id}", patient["id"]),
        ("ServiceRequest", "_id={id}&_revinclude=Task:focus", world.first("ServiceRequest")["id"]),
        ("Task", "patient={id}", patient["id"]),
        ("Task", "focus=ServiceRequest/{id}", world.first("Task")["focus"]["reference"].split("/")[1]),
    ]
    form = {**b, "Content-Type": "application/x-www-form-urlencoded"}
    for rtype, query, value in searches:
        for send in (lambda rid: client.get(f"/fhir/{rtype}?{query.replace('{id}', rid)}", headers=b),
                     lambda rid: client.post(f"/fhir/{rtype}/_search", data=query.replace("{id}", rid), headers=form)):
            status, _, bundle, _ = same_as_missing(value, send)
            assert status == 200 and bundle["total"] == 0 and "entry" not in bundle, (rtype, query)
    assert world.snapshot() == before


@pytest.mark.parametrize("condition,which", [
    ("identifier={system}|{value}", "casebridge"), ("identifier={system}|{value}", "mrn"),
    ("identifier={value}", "mrn"), ("_id={id}", "mrn")])
def test_conditional_create_matching_another_organizations_patient_creates_for_the_caller(world, condition, which):
    before = world.snapshot()
    client, b = world.client, world.b
    theirs = world.first("Patient")
    identifier = next(i for i in theirs["identifier"] if ("casebridge.dev" in i["system"]) == (which == "casebridge"))

    def post(value: str, rid: str):
        body = {"resourceType": "Patient", "identifier": [{"system": identifier["system"], "value": value}],
                "name": [{"family": "Tenant", "given": ["Bea"]}], "gender": "female", "birthDate": "1990-01-02"}
        query = condition.format(system=identifier["system"], value=value, id=rid)
        return client.post("/fhir/Patient", json=body, headers={**b, "If-None-Exist": query})

    created = post(identifier["value"], theirs["id"])
    control = post("MRN-" + uuid.uuid4().hex[:8], str(uuid.uuid4()))  # a condition nothing meets
    assert (created.status_code, control.status_code) == (201, 201), created.json
    assert created.json["name"][0]["family"] == "Tenant" and created.json["meta"]["versionId"] == "1"
    assert client.get(f"/fhir/Patient/{created.json['id']}", headers=b).json["name"][0]["family"] == "Tenant"
    # A still has its own patient, as it was, and nothing of B's
    found = client.get(f"/fhir/Patient?identifier={identifier['system']}|{identifier['value']}", headers=world.a).json
    assert [e["resource"]["name"] for e in found["entry"]] == [theirs["name"]]
    assert world.snapshot() == before


def test_creates_referencing_another_organizations_resources_answer_as_if_missing(world):
    before = world.snapshot()
    patient, request = world.first("Patient")["id"], world.first("ServiceRequest")["id"]
    focused = world.first("Task")["focus"]["reference"].split("/")[1]  # a request that has its Task
    subject = {"reference": "Patient/{id}"}
    creates = [  # (type, body with {id}, their id)
        ("Goal", {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "Housing"},
                  "subject": subject}, patient),
        ("Condition", {"resourceType": "Condition", "code": {"text": "Housing"}, "subject": subject}, patient),
        ("ServiceRequest", {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                            "code": {"text": "Food pantry"}, "subject": subject}, patient),
        ("CarePlan", {"resourceType": "CarePlan", "status": "draft", "intent": "plan", "subject": subject}, patient),
        ("Task", {"resourceType": "Task", "status": "requested", "intent": "order",
                  "focus": {"reference": "ServiceRequest/{id}"}}, request),
        ("Task", {"resourceType": "Task", "status": "requested", "intent": "order",
                  "focus": {"reference": "ServiceRequest/{id}"}}, focused),
    ]
    for rtype, body, theirs in creates:
        status, _, outcome, _ = same_as_missing(theirs, lambda rid: world.client.post(
            f"/fhir/{rtype}", json=with_id(body, rid), headers=world.b))
        assert status == 422, outcome
    assert world.snapshot() == before


def test_transaction_and_batch_entries_on_another_organizations_resources_answer_as_if_missing(world):
    before = world.snapshot()
    client, b = world.client, world.b
    goal, patient = world.first("Goal"), world.first("Patient")
    changed = json.loads(json.dumps({**goal, "lifecycleStatus": "cancelled"}).replace(goal["id"], "{id}"))
    new_goal = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "Housing"},
                "subject": {"reference": "Patient/{id}"}}
    entries = [  # (their id, an entry with {id}, the status of a transaction of it alone)
        (goal["id"], {"resource": changed, "request": {"method": "PUT", "url": "Goal/{id}", "ifMatch": 'W/"1"'}}, 404),
        (goal["id"], {"resource": changed, "request": {"method": "PUT", "url": "Goal/{id}"}}, 404),
        (goal["id"], {"request": {"method": "GET", "url": "Goal/{id}"}}, 404),
        (goal["id"], {"request": {"method": "GET", "url": "Goal/{id}/_history/1"}}, 404),
        (goal["id"], {"request": {"method": "GET", "url": "Goal?_id={id}"}}, 200),
        (patient["id"], {"resource": new_goal, "request": {"method": "POST", "url": "Goal"}}, 422),
    ]

    def post(kind: str, entry: list):
        return lambda rid: client.post("/fhir", json=with_id({"resourceType": "Bundle", "type": kind, "entry": entry},
                                                               rid), headers=b)

    for theirs, entry, status in entries:
        got, _, result, _ = same_as_missing(theirs, post("transaction", [entry]))
        assert got == status, result
    for theirs in (goal["id"], patient["id"]):
        mine = [(entry, status) for i, entry, status in entries if i == theirs]
        got, _, result, _ = same_as_missing(theirs, post("batch", [entry for entry, _ in mine]))
        assert got == 200 and [e["response"]["status"] for e in result["entry"]] == [
            "200 OK" if status == 200 else str(status) for _, status in mine]
    # a conditional create in a transaction: A's identifier creates for B
    identifier = patient["identifier"][0]
    entry = {"resource": {"resourceType": "Patient", "identifier": [identifier], "name": [{"family": "Tenant"}]},
             "request": {"method": "POST", "url": "Patient",
                         "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}"}}
    response = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, headers=b)
    assert response.status_code == 200 and response.json["entry"][0]["response"]["status"] == "201 Created"
    assert response.json["entry"][0]["resource"]["name"] == [{"family": "Tenant"}]
    assert world.snapshot() == before


def test_audit_events_of_another_organization_are_not_found(world):
    client, plan, patient = world.client, world.first("CarePlan")["id"], world.first("Patient")["id"]
    client.get(f"/fhir/CarePlan/{plan}", headers=world.a)  # an event of A, about the plan
    trail = client.get("/fhir/AuditEvent?_count=500", headers=world.a_admin).json
    events = {e["resource"]["id"] for e in trail["entry"]}
    for theirs in sorted(events):
        status, *_ = same_as_missing(theirs, lambda rid: client.get(f"/fhir/AuditEvent/{rid}", headers=world.b_admin),
                                     nobodys="987654321")
        assert status == 404
    for query in ("", f"entity=CarePlan/{plan}", f"entity={plan}", f"entity=Patient/{patient}"):
        bundle = client.get(f"/fhir/AuditEvent?{query}&_count=500", headers=world.b_admin).json
        assert "org-a" not in json.dumps(bundle)
        assert not {e["resource"]["id"] for e in bundle.get("entry", ())} & events
