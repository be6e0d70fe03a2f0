"""The FHIR R4 API over the Flask test client: every interaction and status, the search parameters,
paging, _include/_revinclude, writes that change the case record, the inbound referral loop,
transaction and batch, and output that is valid R4 (fhir.resources)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
FHIR = "application/fhir+json"
TYPES = ("Patient", "CarePlan", "Goal", "ServiceRequest", "Condition", "Task")


def case_json(name: str = "realistic", case_id: str | None = None, org: str = "org-1") -> dict:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data["organization"] = {**data["organization"], "id": org}
    if case_id:
        data["id"] = case_id
    return data


def valid(resource: dict) -> None:
    """Valid R4 (fhir.resources R4B), each entry of a Bundle too."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for entry in resource.get("entry", ()) if resource["resourceType"] == "Bundle" else ():
        if "resource" in entry:
            valid(entry["resource"])


@pytest.fixture
def store(app):
    return app.extensions["casebridge"].store


@pytest.fixture
def headers(make_key):
    return make_key()


@pytest.fixture
def seeded(store):
    """The realistic case and the discharge case in org-1, another case in org-2."""
    store.add_case("org-1", case_json("realistic"))
    store.add_case("org-1", case_json("discharge"))
    store.add_case("org-2", case_json("behavioral_referral", org="org-2"))
    return store


def get(client, url, headers, status=200):
    response = client.get(url, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == FHIR
    return response.json


def all_of(client, rtype, headers):
    bundle = get(client, f"/fhir/{rtype}?_count=500", headers)
    return [e["resource"] for e in bundle.get("entry", ())]


def ids(bundle, mode="match"):
    return [e["resource"]["id"] for e in bundle.get("entry", ()) if e["search"]["mode"] == mode]


# -- metadata, auth, formats ---------------------------------------------------------------------
def test_metadata_needs_no_key_and_states_what_is_supported(client):
    response = client.get("/fhir/metadata")
    assert response.status_code == 200 and response.mimetype == FHIR
    statement = response.json
    valid(statement)
    rest = statement["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) == {*TYPES, "AuditEvent"}
    plan, audit = by_type["CarePlan"], by_type["AuditEvent"]
    assert {p["name"]: p["type"] for p in plan["searchParam"]} == {
        "_id": "token", "_lastUpdated": "date", "patient": "reference", "subject": "reference", "category": "token",
        "goal": "reference", "date": "date", "status": "token"}
    assert sorted(plan["searchInclude"]) == ["CarePlan:goal", "CarePlan:patient", "CarePlan:subject"]
    assert [i["code"] for i in plan["interaction"]] == [
        "read", "vread", "update", "history-instance", "create", "search-type"]
    assert plan["conditionalCreate"] is True
    assert {p["name"]: p["type"] for p in by_type["ServiceRequest"]["searchParam"]}["identifier"] == "token"
    assert [i["code"] for i in by_type["Goal"]["interaction"]] == [
        "read", "vread", "update", "history-instance", "create", "search-type"]
    assert [i["code"] for i in audit["interaction"]] == ["read", "search-type"]
    assert {p["name"]: p["type"] for p in audit["searchParam"]} == {"date": "date", "entity": "reference"}
    assert [i["code"] for i in rest["interaction"]] == ["transaction", "batch"]
    assert [o["name"] for o in by_type["Patient"]["operation"]] == ["everything"] and "operation" not in rest
    assert statement["fhirVersion"] == "4.0.1"
    # every claim, and everything served, against the app itself: tests/e2e/test_fhir_capabilities.py


def test_auth_scopes_and_organizations(client, seeded, make_key):
    outcome = get(client, "/fhir/CarePlan", {}, 401)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "login"
    read_only = make_key(["fhir:read"])
    plan = all_of(client, "CarePlan", read_only)[0]
    response = client.put(f"/fhir/CarePlan/{plan['id']}", json=plan, headers=read_only)
    assert response.status_code == 403 and response.json["issue"][0]["code"] == "forbidden"
    assert get(client, "/fhir/CarePlan", make_key(["cases:read"]), 403)["resourceType"] == "OperationOutcome"
    # org-2's plan is not found by org-1, exactly as if absent
    other = all_of(client, "CarePlan", make_key(organization="org-2"))[0]
    assert get(client, f"/fhir/CarePlan/{other['id']}", read_only, 404)["issue"][0]["code"] == "not-found"
    assert other["id"] not in [p["id"] for p in all_of(client, "CarePlan", read_only)]


def test_formats(client, seeded, headers):
    plan = all_of(client, "CarePlan", headers)[0]
    for fmt in ("json", "application/json", "application/fhir+json"):
        assert client.get(f"/fhir/CarePlan/{plan['id']}?_format={fmt}", headers=headers).status_code == 200
    assert client.get(f"/fhir/CarePlan/{plan['id']}?_format=xml", headers=headers).status_code == 406
    response = client.get(f"/fhir/CarePlan/{plan['id']}", headers={**headers, "Accept": "application/fhir+xml"})
    assert response.status_code == 406 and response.json["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/CarePlan", headers={**headers, "Accept": "application/json"}).status_code == 200
    response = client.post("/fhir/Patient", data="<Patient/>", headers={**headers, "Content-Type": "application/fhir+xml"})
    assert response.status_code == 415 and response.json["resourceType"] == "OperationOutcome"
    response = client.post("/fhir/Patient", data="{}", headers={**headers, "Content-Type": "text/plain"})
    assert response.status_code == 415
    assert get(client, "/fhir/Observation", headers, 404)["resourceType"] == "OperationOutcome"


# -- read, vread, history ------------------------------------------------------------------------
def test_read_vread_history(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    for rtype in TYPES:
        resource = all_of(client, rtype, headers)[0]
        response = client.get(f"/fhir/{rtype}/{resource['id']}", headers=headers)
        assert response.status_code == 200
        assert response.headers["ETag"] == 'W/"1"' and response.headers["Last-Modified"]
        assert response.json == resource and resource["meta"]["versionId"] == "1"
        valid(response.json)
    goal = all_of(client, "Goal", headers)[0]
    changed = {**goal, "lifecycleStatus": "cancelled"}
    assert client.put(f"/fhir/Goal/{goal['id']}", json=changed, headers=headers).status_code == 200
    assert get(client, f"/fhir/Goal/{goal['id']}/_history/1", headers)["lifecycleStatus"] == goal["lifecycleStatus"]
    assert get(client, f"/fhir/Goal/{goal['id']}/_history/2", headers)["lifecycleStatus"] == "cancelled"
    get(client, f"/fhir/Goal/{goal['id']}/_history/9", headers, 404)
    get(client, f"/fhir/Goal/{goal['id']}/_history/x", headers, 404)
    history = get(client, f"/fhir/Goal/{goal['id']}/_history", headers)
    valid(history)
    assert history["type"] == "history" and [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    get(client, "/fhir/Goal/no-such-goal", headers, 404)
    get(client, "/fhir/Goal/no-such-goal/_history", headers, 404)
    assert get(client, f"/fhir/Goal/{goal['id']}?foo=1", headers, 400)["issue"][0]["expression"] == ["foo"]


def test_deleted_case_resources_are_gone(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    plan = all_of(client, "CarePlan", headers)[0]
    response = client.delete("/fhir/CarePlan/" + plan["id"], headers=headers)
    assert response.status_code == 405
    response = client.delete(f"/cases/{case_json()['id']}", headers=headers)  # the JSON API: entered in error
    assert response.status_code == 200, response.get_data(as_text=True)
    outcome = get(client, f"/fhir/CarePlan/{plan['id']}", headers, 410)
    assert outcome["issue"][0]["code"] == "deleted"
    assert get(client, "/fhir/CarePlan", headers)["total"] == 0


def test_shared_patient_is_one_resource_read_from_the_newest_case(client, store, headers):
    first = case_json("realistic", "case-a")
    store.add_case("org-1", first)
    second = case_json("realistic", "case-b")
    second["client"] = {**second["client"], "phone": "555-0199"}
    store.add_case("org-1", second)
    patients = get(client, "/fhir/Patient", headers)
    assert patients["total"] == 1
    patient = patients["entry"][0]["resource"]
    assert any(t.get("value") == "555-0199" for t in patient["telecom"])
    assert get(client, f"/fhir/CarePlan?patient={patient['id']}", headers)["total"] == 2
    # a Patient update changes both cases
    patient["gender"] = "other"
    response = client.put(f"/fhir/Patient/{patient['id']}", json=patient, headers=headers)
    assert response.status_code == 200, response.json
    assert store.get_case("org-1", "case-a").data["client"]["gender"] == "other"
    assert store.get_case("org-1", "case-b").data["client"]["gender"] == "other"
    assert get(client, f"/fhir/Patient/{patient['id']}", headers)["meta"]["versionId"] == response.headers["ETag"][3:-1]


# -- search --------------------------------------------------------------------------------------
def _codes(concepts):
    return [(c.get("system"), c["code"]) for concept in concepts for c in concept.get("coding", ())]


SEARCHES = [
    ("CarePlan", lambda r: f"category={_codes(r['category'])[0][0]}|{_codes(r['category'])[0][1]}",
     lambda r, q: _codes(r["category"])[0] in _codes(q["category"])),
    ("CarePlan", lambda r: f"status={r['status']}", lambda r, q: q["status"] == r["status"]),
    ("CarePlan", lambda r: f"date=ge{r['period']['start'][:10]}", lambda r, q: "period" in q),
    ("CarePlan", lambda r: "date=lt1900-01-01", lambda r, q: False),
    ("Goal", lambda r: f"lifecycle-status={r['lifecycleStatus']}",
     lambda r, q: q["lifecycleStatus"] == r["lifecycleStatus"]),
    ("Goal", lambda r: f"target-date={r['target'][0]['dueDate']}",
     lambda r, q: any(t.get("dueDate") == r["target"][0]["dueDate"] for t in q.get("target", ()))),
    ("Goal", lambda r: f"target-date=gt{r['target'][0]['dueDate']}",
     lambda r, q: any(t.get("dueDate", "") > r["target"][0]["dueDate"] for t in q.get("target", ()))),
    ("ServiceRequest", lambda r: f"category={_codes(r['category'])[0][1]}",
     lambda r, q: _codes(r["category"])[0][1] in [c for _, c in _codes(q["category"])]),
    ("ServiceRequest", lambda r: f"code={r['code']['coding'][0]['system']}|{r['code']['coding'][0]['code']}",
     lambda r, q: (r["code"]["coding"][0]["system"], r["code"]["coding"][0]["code"]) in _codes([q["code"]])),
    ("ServiceRequest", lambda r: f"authored=le{r['authoredOn'][:10]}",
     lambda r, q: q.get("authoredOn", "9")[:10] <= r["authoredOn"][:10]),
    ("ServiceRequest", lambda r: f"status={r['status']}", lambda r, q: q["status"] == r["status"]),
    ("Patient", lambda r: f"_id={r['id']}", lambda r, q: q["id"] == r["id"]),
    ("Patient", lambda r: f"identifier={r['identifier'][0]['system']}|{r['identifier'][0]['value']}",
     lambda r, q: r["identifier"][0] in q["identifier"]),
    ("Patient", lambda r: f"identifier={r['identifier'][0]['value']}",
     lambda r, q: r["identifier"][0]["value"] in [i.get("value") for i in q["identifier"]]),
    ("Patient", lambda r: "identifier=|" + r["identifier"][0]["value"], lambda r, q: False),
    ("Patient", lambda r: f"name={r['name'][0]['family'][:3].lower()}",
     lambda r, q: any(n.get("family", "").lower().startswith(r["name"][0]["family"][:3].lower()) for n in q["name"])),
    ("Patient", lambda r: f"birthdate={r['birthDate']}", lambda r, q: q.get("birthDate") == r["birthDate"]),
    ("Patient", lambda r: f"gender={r['gender']}", lambda r, q: q.get("gender") == r["gender"]),
    ("Condition", lambda r: f"category={_codes(r['category'])[0][0]}|{_codes(r['category'])[0][1]}",
     lambda r, q: _codes(r["category"])[0] in _codes(q["category"])),
    ("Task", lambda r: f"status={r['status']}", lambda r, q: q["status"] == r["status"]),
    ("Task", lambda r: f"focus={r['focus']['reference']}", lambda r, q: q["focus"] == r["focus"]),
    ("Task", lambda r: f"patient={r['for']['reference']}", lambda r, q: q["for"] == r["for"]),
]


@pytest.mark.parametrize("rtype, query, matches", SEARCHES)
def test_search_parameter(client, seeded, headers, rtype, query, matches):
    everything = all_of(client, rtype, headers)
    sample = next(r for r in everything if _usable(query, r))
    q = query(sample)
    expected = sorted(r["id"] for r in everything if matches(sample, r))
    for bundle in (get(client, f"/fhir/{rtype}?{q}", headers),
                   client.post(f"/fhir/{rtype}/_search", data=dict([q.split("=", 1)]), headers=headers).json):
        valid(bundle)
        assert bundle["type"] == "searchset" and bundle["total"] == len(expected), q
        assert sorted(ids(bundle)) == expected, q


def _usable(query, resource) -> bool:
    try:
        query(resource)
        return True
    except (KeyError, IndexError):
        return False


def test_search_by_patient_on_every_type(client, seeded, headers):
    patient = all_of(client, "Patient", headers)[0]
    for rtype in ("CarePlan", "Goal", "ServiceRequest", "Condition", "Task"):
        element = "for" if rtype == "Task" else "subject"
        expected = sorted(r["id"] for r in all_of(client, rtype, headers)
                          if r[element]["reference"] == f"Patient/{patient['id']}")
        assert expected
        for value in (patient["id"], f"Patient/{patient['id']}"):
            assert sorted(ids(get(client, f"/fhir/{rtype}?patient={value}", headers))) == expected


def test_last_updated_and_combined_params(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    plan = all_of(client, "CarePlan", headers)[0]
    stamp = plan["meta"]["lastUpdated"]
    day = stamp[:10]
    assert get(client, f"/fhir/CarePlan?_lastUpdated={day}", headers)["total"] == 1
    assert get(client, f"/fhir/CarePlan?_lastUpdated=gt{day}", headers)["total"] == 0
    assert get(client, f"/fhir/CarePlan?_lastUpdated=lt{day}", headers)["total"] == 0
    assert get(client, f"/fhir/CarePlan?_lastUpdated=ge{day}&_lastUpdated=le{day}", headers)["total"] == 1
    assert get(client, "/fhir/CarePlan?status=active,completed&category=assess-plan", headers)["total"] == 1


@pytest.mark.parametrize("query, where", [
    ("colour=blue", "colour"), ("patient:missing=true", "patient:missing"), ("date=zz2024", "date"),
    ("date=2024-13-01", "date"), ("_count=many", "_count"), ("_include=Goal:subject", "_include"),
    ("_include:iterate=CarePlan:goal", "_include:iterate"), ("_revinclude=Task:focus", "_revinclude"),
    ("_sort=date", "_sort"),
])
def test_unknown_or_bad_search_parameter_is_400(client, seeded, headers, query, where):
    outcome = get(client, f"/fhir/CarePlan?{query}", headers, 400)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [where]


def test_paging_follows_next_links_to_the_end_without_duplicates(client, store, headers):
    for i in range(3):
        store.add_case("org-1", case_json("realistic", f"case-{i}"))
    everything = {g["id"] for g in all_of(client, "Goal", headers)}
    assert len(everything) == 15
    seen, url, pages = [], "/fhir/Goal?_count=4", 0
    while url:
        bundle = get(client, url.replace("http://testserver", ""), headers)
        assert bundle["total"] == 15
        assert len(bundle.get("entry", ())) <= 4
        seen += ids(bundle)
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        pages += 1
    assert pages == 4 and len(seen) == len(set(seen)) == 15 and set(seen) == everything
    assert get(client, "/fhir/Goal?_count=0", headers)["total"] == 15


def test_include_and_revinclude(client, seeded, headers):
    plan = next(p for p in all_of(client, "CarePlan", headers) if p.get("goal"))
    patient_id = plan["subject"]["reference"].split("/")[1]
    bundle = get(client, f"/fhir/CarePlan?_id={plan['id']}&_include=CarePlan:goal&_include=CarePlan:subject", headers)
    valid(bundle)
    assert ids(bundle) == [plan["id"]]
    included = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]
                if e["search"]["mode"] == "include"}
    assert included == {("Goal", g["reference"].split("/")[1]) for g in plan["goal"]} | {("Patient", patient_id)}
    # revinclude on Patient
    bundle = get(client, f"/fhir/Patient?_id={patient_id}&_revinclude=CarePlan:subject&_revinclude=Goal:subject",
                 headers)
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"] if e["search"]["mode"] == "include"}
    assert kinds == {"CarePlan", "Goal"} and ids(bundle) == [patient_id] and bundle["total"] == 1
    # Task:focus on ServiceRequest, ServiceRequest:subject
    task = all_of(client, "Task", headers)[0]
    request_id = task["focus"]["reference"].split("/")[1]
    bundle = get(client, f"/fhir/ServiceRequest?_id={request_id}&_revinclude=Task:focus"
                         f"&_include=ServiceRequest:subject", headers)
    assert {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]
            if e["search"]["mode"] == "include"} == {("Task", task["id"]), ("Patient", task["for"]["reference"][8:])}


def test_everything(client, seeded, headers):
    patient = all_of(client, "Patient", headers)[0]
    bundle = get(client, f"/fhir/Patient/{patient['id']}/$everything", headers)
    valid(bundle)
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert {"Patient", "CarePlan", "CareTeam", "Organization"} <= kinds
    assert bundle["total"] == len(bundle["entry"])
    keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
    assert len(keys) == len(set(keys))
    get(client, "/fhir/Patient/nobody/$everything", headers, 404)


# -- writes --------------------------------------------------------------------------------------
def new_patient(family="Okafor", mrn="MRN-1"):
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
            "name": [{"family": family, "given": ["Ada"]}], "gender": "female", "birthDate": "1980-02-03"}


def test_create_patient_and_goal(client, store, headers):
    response = client.post("/fhir/Patient", json=new_patient(), headers=headers)
    assert response.status_code == 201, response.json
    patient = response.json
    valid(patient)
    assert response.headers["Location"] == f"http://testserver/fhir/Patient/{patient['id']}/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    assert patient["name"][0]["family"] == "Okafor" and patient["birthDate"] == "1980-02-03"
    assert get(client, "/fhir/Patient?name=oka", headers)["total"] == 1
    # the Patient is a new intake case's client
    plans = get(client, f"/fhir/CarePlan?patient={patient['id']}", headers)
    assert plans["total"] == 1 and plans["entry"][0]["resource"]["status"] == "draft"
    goal = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "Stable housing"},
            "subject": {"reference": f"Patient/{patient['id']}"}, "target": [{"dueDate": "2025-01-31"}]}
    response = client.post("/fhir/Goal", json=goal, headers={**headers, "Prefer": "return=minimal"})
    assert response.status_code == 201 and response.get_data() == b""
    goal_id = response.headers["Location"].split("/Goal/")[1].split("/")[0]
    read = get(client, f"/fhir/Goal/{goal_id}", headers)
    assert read["description"]["text"] == "Stable housing" and read["meta"]["versionId"] == "2"
    plan = get(client, f"/fhir/CarePlan?patient={patient['id']}", headers)["entry"][0]["resource"]
    assert {"reference": f"Goal/{goal_id}"} in plan["goal"]
    case = store.get_case("org-1", plan["identifier"][0]["value"])
    assert [g["description"] for g in case.data["goals"]] == ["Stable housing"]
    response = client.post("/fhir/Goal", json={**goal, "lifecycleStatus": "proposed"},
                           headers={**headers, "Prefer": "return=OperationOutcome"})
    assert response.status_code == 201 and response.json["resourceType"] == "OperationOutcome"


def test_update_with_if_match(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    goal = all_of(client, "Goal", headers)[0]
    changed = {**goal, "lifecycleStatus": "on-hold"}
    response = client.put(f"/fhir/Goal/{goal['id']}", json=changed, headers={**headers, "If-Match": 'W/"1"'})
    assert response.status_code == 200 and response.headers["ETag"] == 'W/"2"'
    assert response.json["lifecycleStatus"] == "on-hold"
    stale = client.put(f"/fhir/Goal/{goal['id']}", json=changed, headers={**headers, "If-Match": 'W/"1"'})
    assert stale.status_code == 412 and stale.json["issue"][0]["code"] == "conflict"
    assert get(client, f"/fhir/Goal/{goal['id']}", headers)["meta"]["versionId"] == "2"
    # the case record changed: the goal is on hold there too
    case = store.get_case("org-1", case_json()["id"])
    assert "on_hold" in [g["status"] for g in case.data["goals"]]
    # id in body must be the URL's; update of an absent resource is 404 (no update-as-create)
    assert client.put(f"/fhir/Goal/{goal['id']}", json={**changed, "id": "x"}, headers=headers).status_code == 400
    assert client.put("/fhir/Goal/absent", json={**changed, "id": "absent"}, headers=headers).status_code == 404
    # a CarePlan update changes the case
    plan = all_of(client, "CarePlan", headers)[0]
    plan["title"] = "New title"
    response = client.put(f"/fhir/CarePlan/{plan['id']}", json=plan, headers=headers)
    assert response.status_code == 200, response.json
    assert store.get_case("org-1", case_json()["id"]).data["title"] == "New title"


def test_invalid_fhir_is_400_with_every_problem_and_nothing_changes(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    goal = all_of(client, "Goal", headers)[0]
    before = store.get_case("org-1", case_json()["id"]).version
    bad = {**goal, "lifecycleStatus": "sort-of", "target": [{"dueDate": "2024-02-30"}]}
    response = client.put(f"/fhir/Goal/{goal['id']}", json=bad, headers=headers)
    assert response.status_code == 400
    expressions = {e for issue in response.json["issue"] for e in issue.get("expression", ())}
    assert {"Goal.lifecycleStatus", "Goal.target[0].dueDate"} <= expressions
    response = client.post("/fhir/Goal", json={"resourceType": "Goal", "subject": "nope"}, headers=headers)
    assert response.status_code == 400 and len(response.json["issue"]) >= 2
    assert client.post("/fhir/Goal", json={"resourceType": "Patient"}, headers=headers).status_code == 400
    assert client.post("/fhir/Goal", data="{not json", headers={**headers, "Content-Type": FHIR}).status_code == 400
    assert client.post("/fhir/Goal", json=[1], headers=headers).status_code == 400
    assert store.get_case("org-1", case_json()["id"]).version == before
    assert get(client, "/fhir/Goal", headers)["total"] == 5


def test_conditional_create_gives_one_resource(client, store, headers):
    condition = {"If-None-Exist": "identifier=urn:oid:1.2.3|MRN-7"}
    first = client.post("/fhir/Patient", json=new_patient(mrn="MRN-7"), headers={**headers, **condition})
    second = client.post("/fhir/Patient", json=new_patient(mrn="MRN-7"), headers={**headers, **condition})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json["id"] == second.json["id"]
    assert get(client, "/fhir/Patient?identifier=MRN-7", headers)["total"] == 1
    bad = client.post("/fhir/Patient", json=new_patient(), headers={**headers, "If-None-Exist": "shoe=9"})
    assert bad.status_code == 400


def test_conditional_create_at_once_from_threads_gives_one(app, store, headers):
    results, barrier = [], threading.Barrier(6)

    def post():
        client = app.test_client()
        barrier.wait()
        response = client.post("/fhir/Patient", json=new_patient(mrn="MRN-RACE"),
                               headers={**headers, "If-None-Exist": "identifier=urn:oid:1.2.3|MRN-RACE"})
        results.append((response.status_code, response.json["id"]))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in results) == [200] * 5 + [201]
    assert len({i for _, i in results}) == 1
    assert get(app.test_client(), "/fhir/Patient?identifier=MRN-RACE", headers)["total"] == 1


# -- the inbound referral, closed loop -----------------------------------------------------------
def referral(subject: str) -> dict:
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-category",
                                      "code": "sdoh"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "464131000124100",
                                 "display": "Referral to food pantry program"}]},
            "subject": {"reference": subject}, "authoredOn": "2024-06-03",
            "requester": {"display": "Dr. Ehr"}}


def task_of(client, headers, request_id):
    bundle = get(client, f"/fhir/Task?focus=ServiceRequest/{request_id}", headers)
    assert bundle["total"] == 1
    return bundle["entry"][0]["resource"]


def test_inbound_referral_closed_loop(client, store, headers, make_key):
    store.add_case("org-1", case_json("realistic"))
    patient = all_of(client, "Patient", headers)[0]
    ehr = make_key(["fhir:read", "fhir:write"])
    cases_before = len(store.list_cases("org-1"))
    response = client.post("/fhir/ServiceRequest", json=referral(f"Patient/{patient['id']}"), headers=ehr)
    assert response.status_code == 201, response.json
    request_id = response.json["id"]
    valid(response.json)
    assert response.json["code"]["coding"][0]["code"] == "464131000124100"
    # a new intake case of the receiving organization, for the same client
    cases = store.list_cases("org-1")
    assert len(cases) == cases_before + 1
    intake = next(c for c in cases if c.data["status"] == "intake")
    assert intake.data["client"]["id"] == case_json()["client"]["id"]
    assert intake.data["services"][0]["kind"] == "referral"
    assert get(client, f"/fhir/Patient?_id={patient['id']}", headers)["total"] == 1
    task = task_of(client, ehr, request_id)
    assert task["status"] == "requested"
    # the case team accepts it with a FHIR Task update
    accepted = {**task, "status": "accepted"}
    response = client.put(f"/fhir/Task/{task['id']}", json=accepted, headers=headers)
    assert response.status_code == 200, response.json
    assert task_of(client, ehr, request_id)["status"] == "accepted"
    # ... schedules and completes it through the JSON API
    for status, task_status in (("scheduled", "accepted"), ("completed", "completed")):
        current = client.get(f"/cases/{intake.id}", headers=headers)
        assert current.status_code == 200
        record = current.json
        record = record.get("record", record) if "services" not in record else record
        record["services"][0]["status"] = status
        response = client.put(f"/cases/{intake.id}", json=record,
                              headers={**headers, "If-Match": current.headers["ETag"]})
        assert response.status_code == 200, response.json
        seen = task_of(client, ehr, request_id)
        assert seen["status"] == task_status
        if status == "scheduled":
            assert seen["businessStatus"]["text"]
    assert get(client, f"/fhir/ServiceRequest/{request_id}", ehr)["status"] == "completed"
    # a referral for a patient the server does not know is refused, naming the element
    response = client.post("/fhir/ServiceRequest", json=referral("Patient/unknown"), headers=ehr)
    assert response.status_code == 422 and response.json["issue"][0]["expression"] == ["ServiceRequest.subject"]


def test_inbound_referral_in_a_transaction_with_patient_and_task(client, store, headers):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": new_patient("Mensah", "MRN-T"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
         "resource": referral("urn:uuid:11111111-1111-4111-8111-111111111111"),
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": "urn:uuid:33333333-3333-4333-8333-333333333333",
         "resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                      "focus": {"reference": "urn:uuid:22222222-2222-4222-8222-222222222222"},
                      "for": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}},
         "request": {"method": "POST", "url": "Task"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.json
    result = response.json
    valid(result)
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created"] * 3
    patient_id, request_id, task_id = (e["resource"]["id"] for e in result["entry"])
    assert result["entry"][1]["resource"]["subject"] == {"reference": f"Patient/{patient_id}"}
    assert len(store.list_cases("org-1")) == 1
    task = task_of(client, headers, request_id)
    assert task["id"] == task_id and task["status"] == "requested"
    task["status"] = "in-progress"
    assert client.put(f"/fhir/Task/{task_id}", json=task, headers=headers).status_code == 200
    assert store.list_cases("org-1")[0].data["services"][0]["status"] == "in_progress"


def test_transaction_is_all_or_nothing(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    goal = all_of(client, "Goal", headers)[0]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": new_patient(),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**goal, "lifecycleStatus": "cancelled"}, "request": {"method": "PUT", "url": f"Goal/{goal['id']}"}},
        {"resource": {**goal, "id": "absent"}, "request": {"method": "PUT", "url": "Goal/absent"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 404
    assert response.json["issue"][0]["expression"] == ["Bundle.entry[2]"]
    assert len(store.list_cases("org-1")) == 1
    assert get(client, f"/fhir/Goal/{goal['id']}", headers)["meta"]["versionId"] == "1"
    # invalid FHIR anywhere: 400, every problem by path, nothing stored
    bundle["entry"][2] = {"resource": {**goal, "lifecycleStatus": "nope"}, "request": {"method": "PUT",
                                                                                     "url": f"Goal/{goal['id']}"}}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 400
    assert response.json["issue"][0]["expression"] == ["Bundle.entry[2].resource.lifecycleStatus"]
    assert len(store.list_cases("org-1")) == 1
    # and a good one commits everything
    bundle["entry"][2] = {"request": {"method": "GET", "url": f"Goal/{goal['id']}/_history/1"}}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.json
    assert response.json["entry"][2]["resource"]["meta"]["versionId"] == "1"
    assert len(store.list_cases("org-1")) == 2
    assert get(client, f"/fhir/Goal/{goal['id']}", headers)["lifecycleStatus"] == "cancelled"


def test_batch_answers_each_entry(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    plan = all_of(client, "CarePlan", headers)[0]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"CarePlan/{plan['id']}"}},
        {"request": {"method": "GET", "url": "CarePlan/absent"}},
        {"resource": new_patient(), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Goal", "lifecycleStatus": "bad"}, "request": {"method": "POST", "url": "Goal"}},
        {"request": {"method": "DELETE", "url": f"CarePlan/{plan['id']}"}},
        {"request": {"method": "GET", "url": "Goal?lifecycle-status=active&_count=1"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.json
    result = response.json
    valid(result)
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["200 OK", "404", "201 Created", "400", "405", "200 OK"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert result["entry"][5]["resource"]["type"] == "searchset"
    assert len(store.list_cases("org-1")) == 2
    assert client.post("/fhir", json={"resourceType": "Bundle", "type": "collection"}, headers=headers).status_code == 400


def test_never_a_500_on_odd_input(client, seeded, headers):
    odd = [None, 1, "x", [], {}, {"resourceType": 3}, {"resourceType": "Goal", "id": {"a": 1}},
           {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"reference": 5}}]
    for body in odd:
        for method, url in (("post", "/fhir/Goal"), ("post", "/fhir/ServiceRequest"), ("put", "/fhir/Goal/x"),
                            ("post", "/fhir")):
            response = getattr(client, method)(url, data=json.dumps(body), headers={**headers, "Content-Type": FHIR})
            assert 400 <= response.status_code < 500, (url, body, response.json)
            assert response.json["resourceType"] == "OperationOutcome"


# -- CarePlan create: a new case for the plan's patient ---------------------------------------------
SID_CASE = "https://casebridge.dev/fhir/sid/case"
SDOH = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"


def plans_case(store, plan: dict):
    """The case a CarePlan is the plan of (its case identifier names it)."""
    (case_id,) = [i["value"] for i in plan["identifier"] if i["system"] == SID_CASE]
    return store.get_case("org-1", case_id)


def sdoh_plan(patient_id: str, **elements) -> dict:
    """A US Core CarePlan as an SDOH app posts it."""
    return {"resourceType": "CarePlan",
            "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-careplan"]},
            "text": {"status": "additional", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Food security</div>'},
            "identifier": [{"system": "urn:sdoh-app:plan", "value": "P-1"}],
            "status": "active", "intent": "plan", "title": "Food security",
            "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                                      "code": "assess-plan"}]}, {"coding": [{"system": SDOH, "code": "sdoh"}]}],
            "subject": {"reference": f"Patient/{patient_id}", "display": "Malena"},
            "period": {"start": "2024-06-01"},
            "activity": [{"detail": {"status": "scheduled", "description": "Weekly food pantry visits"}}],
            **elements}


def test_create_care_plan_starts_a_case_for_its_patient(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    patient, old_plan = all_of(client, "Patient", headers)[0], all_of(client, "CarePlan", headers)[0]
    goal, condition = all_of(client, "Goal", headers)[0], all_of(client, "Condition", headers)[0]
    posted = sdoh_plan(patient["id"], careTeam=old_plan["careTeam"], goal=[{"reference": f"Goal/{goal['id']}"}],
                       addresses=[{"reference": f"Condition/{condition['id']}"}])
    response = client.post("/fhir/CarePlan", json=posted, headers=headers)
    assert response.status_code == 201, response.json
    plan = response.json
    valid(plan)
    assert response.headers["Location"] == f"http://testserver/fhir/CarePlan/{plan['id']}/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    assert get(client, f"/fhir/CarePlan/{plan['id']}", headers) == plan
    # as written: the goal and the condition it names are the patient's other case's
    for element in ("status", "intent", "title", "category", "subject", "period", "activity", "goal", "addresses",
                    "text", "meta"):
        assert plan[element] == {**posted, "meta": {**posted["meta"], **plan["meta"]}}[element], element
    assert plan["identifier"][0] == posted["identifier"][0]
    # a new case of the client, besides the one the plan names: the plan keeps the case's own care team
    case = plans_case(store, plan)
    assert case.id != case_json()["id"] and case.data["client"]["id"] == case_json()["client"]["id"]
    assert (case.data["status"], case.data["opened"]) == ("active", "2024-06-01")
    assert len(store.list_cases("org-1")) == 2
    assert plan["careTeam"][0] == old_plan["careTeam"][0] and len(plan["careTeam"]) == 2
    everything = get(client, f"/fhir/Patient/{patient['id']}/$everything", headers)
    assert plan["careTeam"][1]["reference"] in {f"CareTeam/{e['resource']['id']}" for e in everything["entry"]
                                                if e["resource"]["resourceType"] == "CareTeam"}
    # found as any plan: by patient, category and the goal it names (and with it)
    assert ids(get(client, f"/fhir/CarePlan?patient={patient['id']}&category={SDOH}|sdoh", headers)) == [plan["id"]]
    assert sorted(ids(get(client, f"/fhir/CarePlan?goal=Goal/{goal['id']}", headers))) == sorted(
        [plan["id"], old_plan["id"]])
    included = get(client, f"/fhir/CarePlan?_id={plan['id']}&_include=CarePlan:goal", headers)
    assert ids(included, "include") == [goal["id"]]
    # and changed with update, If-Match naming its version
    changed = {**plan, "title": "Food and housing"}
    response = client.put(f"/fhir/CarePlan/{plan['id']}", json=changed, headers={**headers, "If-Match": 'W/"1"'})
    assert response.status_code == 200, response.json
    assert response.headers["ETag"] == 'W/"2"' and response.json["careTeam"] == plan["careTeam"]
    assert plans_case(store, plan).data["title"] == "Food and housing"
    stale = client.put(f"/fhir/CarePlan/{plan['id']}", json=changed, headers={**headers, "If-Match": 'W/"1"'})
    assert stale.status_code == 412


def test_create_the_smallest_care_plan(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    patient = all_of(client, "Patient", headers)[0]
    posted = {"resourceType": "CarePlan", "status": "draft", "intent": "plan",
              "subject": {"reference": f"http://testserver/fhir/Patient/{patient['id']}"}}
    response = client.post("/fhir/CarePlan", json=posted, headers={**headers, "Prefer": "return=minimal"})
    assert response.status_code == 201 and response.get_data() == b""
    plan = get(client, response.headers["Location"], headers)
    valid(plan)
    assert plan["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert [t["reference"].split("/")[0] for t in plan["careTeam"]] == ["CareTeam"]  # its case's own
    case = plans_case(store, plan)
    assert case.data["status"] == "intake" and case.data["client"]["id"] == case_json()["client"]["id"]
    # a Goal posted next joins the newest open case of the patient: this plan's
    goal = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "Stable housing"},
            "subject": {"reference": f"Patient/{patient['id']}"}}
    response = client.post("/fhir/Goal", json=goal, headers=headers)
    assert response.status_code == 201, response.json
    plan = get(client, f"/fhir/CarePlan/{plan['id']}", headers)
    assert plan["goal"] == [{"reference": f"Goal/{response.json['id']}"}] and plan["meta"]["versionId"] == "2"
    assert [g["description"] for g in plans_case(store, plan).data["goals"]] == ["Stable housing"]


def test_conditional_create_of_a_care_plan(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    patient = all_of(client, "Patient", headers)[0]
    condition = {"If-None-Exist": f"patient={patient['id']}&category={SDOH}|sdoh"}
    first = client.post("/fhir/CarePlan", json=sdoh_plan(patient["id"]), headers={**headers, **condition})
    second = client.post("/fhir/CarePlan", json=sdoh_plan(patient["id"]), headers={**headers, **condition})
    assert (first.status_code, second.status_code) == (201, 200), second.json
    assert first.json["id"] == second.json["id"] and second.headers["ETag"] == 'W/"1"'
    assert len(store.list_cases("org-1")) == 2
    assert get(client, f"/fhir/CarePlan?patient={patient['id']}", headers)["total"] == 2
    bad = client.post("/fhir/CarePlan", json=sdoh_plan(patient["id"]), headers={**headers, "If-None-Exist": "shoe=9"})
    assert bad.status_code == 400 and bad.json["resourceType"] == "OperationOutcome"


def test_care_plan_in_a_transaction(client, store, headers):
    patient_url, goal_url, need_url = (f"urn:uuid:{n * 8}-{n * 4}-4{n * 3}-8{n * 3}-{n * 12}" for n in "123")
    second_plan_url = "urn:uuid:44444444-4444-4444-8444-444444444444"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_url, "resource": new_patient("Mensah", "MRN-P"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": need_url, "resource": {"resourceType": "Condition", "code": {"text": "Food insecurity"},
                                           "subject": {"reference": patient_url}},
         "request": {"method": "POST", "url": "Condition"}},
        {"fullUrl": goal_url, "resource": {"resourceType": "Goal", "lifecycleStatus": "active",
                                           "description": {"text": "Food security"},
                                           "subject": {"reference": patient_url}},
         "request": {"method": "POST", "url": "Goal"}},
        {"resource": {"resourceType": "CarePlan", "status": "active", "intent": "plan", "title": "Food",
                      "subject": {"reference": patient_url}, "goal": [{"reference": goal_url}],
                      "addresses": [{"reference": need_url}]},
         "request": {"method": "POST", "url": "CarePlan"}},
        {"fullUrl": second_plan_url, "resource": {"resourceType": "CarePlan", "status": "draft", "intent": "plan",
                                                  "title": "Housing", "subject": {"reference": patient_url}},
         "request": {"method": "POST", "url": "CarePlan"}},
    ]}
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.json
    result = response.json
    valid(result)
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created"] * 5
    patient_id, need_id, goal_id, plan_id, second_id = (e["resource"]["id"] for e in result["entry"])
    plan = get(client, f"/fhir/CarePlan/{plan_id}", headers)
    assert result["entry"][3]["response"]["location"] == f"http://testserver/fhir/CarePlan/{plan_id}/_history/1"
    assert plan["subject"] == {"reference": f"Patient/{patient_id}"}
    assert plan["goal"] == [{"reference": f"Goal/{goal_id}"}]  # once: the plan named it and the case holds it
    assert plan["addresses"] == [{"reference": f"Condition/{need_id}"}]
    case = plans_case(store, plan)
    assert ([g["description"] for g in case.data["goals"]], [n["description"] for n in case.data["needs"]]) == (
        ["Food security"], ["Food insecurity"])
    # a second plan for the new patient is a second case of the same client
    second = get(client, f"/fhir/CarePlan/{second_id}", headers)
    assert second["subject"] == {"reference": f"Patient/{patient_id}"} and second["title"] == "Housing"
    assert plans_case(store, second).id != case.id
    assert len(store.list_cases("org-1")) == 2
    assert get(client, f"/fhir/CarePlan?patient={patient_id}", headers)["total"] == 2
    # a plan for a patient of the server, in a transaction, conditionally
    entry = {"resource": sdoh_plan(patient_id), "request": {"method": "POST", "url": "CarePlan",
                                                            "ifNoneExist": f"patient={patient_id}&category=sdoh"}}
    for status in ("201 Created", "200 OK"):
        response = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
                               headers=headers)
        assert response.status_code == 200 and response.json["entry"][0]["response"]["status"] == status
    assert len(store.list_cases("org-1")) == 3


def test_an_invalid_care_plan_is_a_4xx_outcome_and_nothing_changes(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    patient = all_of(client, "Patient", headers)[0]
    plan = sdoh_plan(patient["id"])
    bad = [  # (body, status, expression)
        ({k: v for k, v in plan.items() if k != "subject"}, 400, "CarePlan.subject"),
        ({**plan, "status": "sort-of"}, 400, "CarePlan.status"),
        ({**plan, "period": {"start": "2024-02-30"}}, 400, "CarePlan.period.start"),
        ({**plan, "subject": {"reference": "Patient/unknown"}}, 422, "CarePlan.subject"),
        ({**plan, "subject": {"reference": f"Group/{patient['id']}"}}, 422, "CarePlan.subject"),
        ({**plan, "status": "entered-in-error"}, 422, "CarePlan.status"),
    ]
    for body, status, expression in bad:
        response = client.post("/fhir/CarePlan", json=body, headers=headers)
        assert response.status_code == status, (body, response.json)
        assert response.mimetype == FHIR and response.json["resourceType"] == "OperationOutcome"
        assert expression in [e for issue in response.json["issue"] for e in issue.get("expression", ())]
    response = client.post("/fhir", headers=headers, json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": new_patient(), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**plan, "status": "entered-in-error"}, "request": {"method": "POST", "url": "CarePlan"}}]})
    assert response.status_code == 422
    assert response.json["issue"][0]["expression"] == ["Bundle.entry[1].resource.status"]
    assert len(store.list_cases("org-1")) == 1


# -- ServiceRequest?identifier: an EHR's referral, found and kept single by its own identifier ------
EHR = "urn:ehr:referral"


def test_service_request_search_by_identifier(client, store, headers):
    store.add_case("org-1", case_json("realistic"))
    patient = all_of(client, "Patient", headers)[0]
    response = client.post("/fhir/ServiceRequest", headers=headers, json={
        **referral(f"Patient/{patient['id']}"), "identifier": [{"system": EHR, "value": "R-100"}]})
    assert response.status_code == 201, response.json
    request_id = response.json["id"]
    assert response.json["identifier"] == [{"system": EHR, "value": "R-100"}]
    for query, found in ((f"{EHR}|R-100", [request_id]), ("R-100", [request_id]),
                         (f"{EHR}|R-100,nothing", [request_id]), ("|R-100", []), ("urn:other|R-100", []),
                         (f"{EHR}|R-1", [])):
        assert ids(get(client, f"/fhir/ServiceRequest?identifier={query}", headers)) == found, query
    form = client.post("/fhir/ServiceRequest/_search", data={"identifier": f"{EHR}|R-100"}, headers=headers)
    assert form.status_code == 200 and ids(form.json) == [request_id]
    assert ids(get(client, f"/fhir/ServiceRequest?identifier=R-100&patient={patient['id']}&_revinclude=Task:focus",
                   headers)) == [request_id]
    # the record's own services, by the record's identifier
    own = next(r for r in all_of(client, "ServiceRequest", headers) if r["id"] != request_id)
    (identifier,) = own["identifier"]
    assert ids(get(client, f"/fhir/ServiceRequest?identifier={identifier['system']}|{identifier['value']}",
                   headers)) == [own["id"]]


def test_conditional_referral_by_identifier_gives_one_request_and_one_intake_case(client, store, headers, make_key):
    store.add_case("org-1", case_json("realistic"))
    patient = all_of(client, "Patient", headers)[0]
    ehr = make_key(["fhir:read", "fhir:write"])
    sent = {**referral(f"Patient/{patient['id']}"), "identifier": [{"system": EHR, "value": "R-200"}]}
    condition = {"If-None-Exist": f"identifier={EHR}|R-200"}
    responses = [client.post("/fhir/ServiceRequest", json=sent, headers={**ehr, **condition}) for _ in range(3)]
    assert [r.status_code for r in responses] == [201, 200, 200], responses[-1].json
    assert len({r.json["id"] for r in responses}) == 1 and len({r.headers["Location"] for r in responses}) == 1
    request_id = responses[0].json["id"]
    assert len(store.list_cases("org-1")) == 2
    assert len([c for c in store.list_cases("org-1") if c.data["status"] == "intake"]) == 1
    assert task_of(client, ehr, request_id)["status"] == "requested"
    # in a transaction too; another identifier is another referral
    entry = {"resource": sent, "request": {"method": "POST", "url": "ServiceRequest",
                                           "ifNoneExist": f"identifier={EHR}|R-200"}}
    other = {"resource": {**sent, "identifier": [{"system": EHR, "value": "R-201"}]},
             "request": {"method": "POST", "url": "ServiceRequest", "ifNoneExist": f"identifier={EHR}|R-201"}}
    response = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry, other]},
                           headers=ehr)
    assert response.status_code == 200, response.json
    assert [e["response"]["status"] for e in response.json["entry"]] == ["200 OK", "201 Created"]
    assert response.json["entry"][0]["resource"]["id"] == request_id
    assert len(store.list_cases("org-1")) == 3
