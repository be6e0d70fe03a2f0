"""The test FHIR server (Medplum's in-memory router behind tests/fhir_server/server.mjs) behaves as each
partner profile says: the adapters' integration tests rely on these behaviours, so they are pinned here
with plain HTTP."""
from __future__ import annotations

import base64
import json
import time

import pytest
import requests

from fhir_server.fixtures import fhir_server

pytestmark = pytest.mark.integration

full = fhir_server("full")
epic = fhir_server("epic")
oracle = fhir_server("oracle")
flaky = fhir_server("full", fault_503=0.3, seed=7)

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
TIMEOUT = 10


def patient(family: str, birth_date: str = "1970-01-01", **extra) -> dict:
    return {"resourceType": "Patient", "name": [{"family": family, "given": ["Ann"]}], "birthDate": birth_date, **extra}


def care_plan(subject: str = "Patient/p1") -> dict:
    return {"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": {"reference": subject}}


def post(server, path: str, body: dict, **headers) -> requests.Response:
    return requests.post(f"{server.base_url}/{path}", json=body, headers={**FHIR_JSON, **headers}, timeout=TIMEOUT)


def put(server, path: str, body: dict, **headers) -> requests.Response:
    return requests.put(f"{server.base_url}/{path}", json=body, headers={**FHIR_JSON, **headers}, timeout=TIMEOUT)


def get(server, path_or_url: str, **headers) -> requests.Response:
    url = path_or_url if path_or_url.startswith("http") else f"{server.base_url}/{path_or_url}"
    return requests.get(url, headers={"Accept": "application/fhir+json", **headers}, timeout=TIMEOUT)


def link(bundle: dict, relation: str) -> str | None:
    return next((item["url"] for item in bundle.get("link", []) if item["relation"] == relation), None)


def issue_text(reply: requests.Response) -> str:
    body = reply.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(issue.get("details", {}).get("text", "") + issue.get("diagnostics", "") for issue in body["issue"])


def transaction(*entries: dict, kind: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def entry(resource: dict, method: str = "POST", url: str | None = None, full_url: str | None = None, **request) -> dict:
    item = {"resource": resource, "request": {"method": method, "url": url or resource["resourceType"], **request}}
    if full_url:
        item["fullUrl"] = full_url
    return item


def total(server, query: str) -> int:
    return get(server, query).json()["total"]


# -- every profile -----------------------------------------------------------------------------------
def test_metadata_reflects_each_profile(full, epic, oracle):
    def capabilities(server):
        statement = get(server, "metadata").json()
        rest = statement["rest"][0]
        by_type = {resource["type"]: resource for resource in rest["resource"]}
        codes = lambda type_: {i["code"] for i in by_type[type_]["interaction"]}  # noqa: E731
        return statement, rest, by_type, codes

    statement, rest, by_type, codes = capabilities(full)
    assert statement["fhirVersion"] == "4.0.1" and statement["software"]["version"]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert by_type["CarePlan"]["conditionalCreate"] is True
    assert {"create", "update", "read", "search-type", "vread"} <= codes("CarePlan")

    statement, rest, by_type, codes = capabilities(epic)
    assert rest["interaction"] == []
    assert codes("CarePlan") == codes("Goal") == {"read", "search-type"}
    assert codes("ServiceRequest") == codes("Task") == codes("Patient") == codes("Condition") == {"read", "search-type", "create", "update"}
    assert not any(resource["conditionalCreate"] for resource in rest["resource"])

    statement, rest, by_type, codes = capabilities(oracle)
    assert [i["code"] for i in rest["interaction"]] == ["batch"]
    assert codes("CarePlan") == codes("Goal") == {"read", "search-type"}
    assert {"create", "update"} <= codes("Patient")
    assert not any(resource["conditionalCreate"] for resource in rest["resource"])
    assert by_type["Patient"]["operation"][0]["name"] == "member-match"


# -- full --------------------------------------------------------------------------------------------
def test_full_create_read_update_with_versions(full):
    created = post(full, "Patient", patient("Versions"))
    assert created.status_code == 201
    body = created.json()
    first_etag = created.headers["ETag"]
    assert first_etag == f'W/"{body["meta"]["versionId"]}"'
    assert created.headers["Location"].startswith(f"{full.base_url}/Patient/{body['id']}/_history/")

    read = get(full, f"Patient/{body['id']}")
    assert read.status_code == 200 and read.headers["ETag"] == first_etag

    body["gender"] = "female"
    updated = put(full, f"Patient/{body['id']}", body, **{"If-Match": first_etag})
    assert updated.status_code == 200 and updated.headers["ETag"] != first_etag

    history = get(full, f"Patient/{body['id']}/_history").json()
    assert [e["resource"].get("gender") for e in history["entry"]] == ["female", None]  # newest first
    assert get(full, f"Patient/{body['id']}/_history").json() == history  # reading history changes nothing
    old = get(full, f"Patient/{body['id']}/_history/{first_etag[3:-1]}")
    assert old.status_code == 200 and "gender" not in old.json()


def test_full_stale_if_match_is_412(full):
    body = post(full, "Patient", patient("Stale")).json()
    stale = f'W/"{body["meta"]["versionId"]}"'
    assert put(full, f"Patient/{body['id']}", {**body, "gender": "male"}, **{"If-Match": stale}).status_code == 200
    again = put(full, f"Patient/{body['id']}", {**body, "gender": "other"}, **{"If-Match": stale})
    assert again.status_code == 412
    assert get(full, f"Patient/{body['id']}").json()["gender"] == "male"


def test_full_search_pages_through_next_links(full):
    full.load(*[patient("Paged", birth_date=f"19{n:02d}-01-01") for n in range(45)] + [patient("Other")])
    page = get(full, "Patient?family=Paged&_count=20").json()
    assert page["total"] == 45
    seen, sizes = [], []
    while True:
        sizes.append(len(page.get("entry", [])))
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        assert all(e["fullUrl"].endswith(e["resource"]["id"]) for e in page.get("entry", []))
        next_url = link(page, "next")
        if not next_url:
            break
        page = get(full, next_url).json()
    assert sizes == [20, 20, 5]
    assert len(set(seen)) == 45


def test_full_search_by_post(full):
    full.load(patient("Posted"), patient("Other"))
    reply = requests.post(f"{full.base_url}/Patient/_search", data={"family": "Posted"}, timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json()["total"] == 1


def test_full_transaction_commits_all_or_nothing(full):
    goal = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "walk daily"},
            "subject": {"reference": "urn:uuid:0c8a5a4e-4b6c-4d2b-9a53-2f0b1a8b5f01"}}
    ok = post(full, "", transaction(
        entry(patient("Tx"), full_url="urn:uuid:0c8a5a4e-4b6c-4d2b-9a53-2f0b1a8b5f01"),
        entry(goal),
    ))
    assert ok.status_code == 200
    response = ok.json()
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201", "201"]
    patient_id = response["entry"][0]["resource"]["id"]
    assert response["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
    assert response["entry"][0]["response"]["etag"].startswith('W/"')

    existing = post(full, "Patient", patient("Existing")).json()
    failed = post(full, "", transaction(
        entry(patient("TxRolledBack")),
        entry({**existing, "gender": "female"}, method="PUT", url=f"Patient/{existing['id']}", ifMatch='W/"not-current"'),
    ))
    assert failed.status_code == 412
    assert total(full, "Patient?family=TxRolledBack") == 0  # the create before the failure was rolled back
    assert "gender" not in get(full, f"Patient/{existing['id']}").json()


def test_full_batch_entries_succeed_or_fail_alone(full):
    reply = post(full, "", transaction(
        entry(patient("Batch")),
        entry({"resourceType": "Patient", "bogus": True}),
        kind="batch",
    ))
    assert reply.status_code == 200
    assert [e["response"]["status"] for e in reply.json()["entry"]] == ["201", "400"]
    assert total(full, "Patient?family=Batch") == 1


def test_full_conditional_create(full):
    body = patient("Conditional", identifier=[{"system": "urn:test:mrn", "value": "C-1"}])
    first = post(full, "Patient", body, **{"If-None-Exist": "identifier=urn:test:mrn|C-1"})
    second = post(full, "Patient", body, **{"If-None-Exist": "identifier=urn:test:mrn|C-1"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert total(full, "Patient?identifier=urn:test:mrn|C-1") == 1


def test_invalid_resources_are_rejected(full):
    reply = post(full, "Patient", {"resourceType": "Patient", "birthDate": "yesterday"})
    assert reply.status_code == 400
    assert reply.json()["resourceType"] == "OperationOutcome"
    assert post(full, "Patient", {"resourceType": "Goal"}).status_code == 400
    assert get(full, "NoSuchType/1").status_code == 404


# -- epic --------------------------------------------------------------------------------------------
def test_epic_care_plans_and_goals_are_read_only(epic):
    stored = epic.load(care_plan())[0]
    assert get(epic, f"CarePlan/{stored['id']}").status_code == 200
    assert get(epic, "CarePlan?status=active").json()["total"] == 1
    for reply in (
        post(epic, "CarePlan", care_plan()),
        put(epic, f"CarePlan/{stored['id']}", {**stored, "status": "completed"}),
        post(epic, "Goal", {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
    ):
        assert reply.status_code == 405
        assert reply.headers["Allow"] in ("GET", "")
        assert "not supported" in issue_text(reply)
    assert get(epic, f"CarePlan/{stored['id']}").json()["status"] == "active"


def test_epic_writes_patient_condition_service_request_task(epic):
    resources = [
        patient("EpicWrite"),
        {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, "code": {"text": "asthma"}},
        {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Task", "status": "requested", "intent": "order"},
    ]
    for resource in resources:
        created = post(epic, resource["resourceType"], resource)
        assert created.status_code == 201, created.text
        body = created.json()
        path = f"{body['resourceType']}/{body['id']}"
        assert put(epic, path, body, **{"If-Match": created.headers["ETag"]}).status_code == 200
        assert requests.delete(f"{epic.base_url}/{path}", timeout=TIMEOUT).status_code == 405
    assert put(epic, "Patient/made-up-id", {**patient("New"), "id": "made-up-id"}).status_code == 404  # no update-as-create


def test_epic_ignores_if_none_exist(epic):
    body = patient("Dup", identifier=[{"system": "urn:test:mrn", "value": "D-1"}])
    replies = [post(epic, "Patient", body, **{"If-None-Exist": "identifier=urn:test:mrn|D-1"}) for _ in range(2)]
    assert [r.status_code for r in replies] == [201, 201]
    assert replies[0].json()["id"] != replies[1].json()["id"]
    assert total(epic, "Patient?identifier=urn:test:mrn|D-1") == 2


def test_epic_refuses_batch_and_transaction(epic):
    for kind in ("batch", "transaction"):
        reply = post(epic, "", transaction(entry(patient("NoBundles")), kind=kind))
        assert reply.status_code == 405
        assert reply.json()["resourceType"] == "OperationOutcome"
    assert total(epic, "Patient?family=NoBundles") == 0


def test_epic_clamps_page_size_to_100(epic):
    epic.load(*[care_plan(f"Patient/p{n}") for n in range(150)])
    page = get(epic, "CarePlan?_count=500").json()
    assert page["total"] == 150 and len(page["entry"]) == 100
    assert "_count=100" in link(page, "next")
    rest = get(epic, link(page, "next")).json()
    assert len(rest["entry"]) == 50 and link(rest, "next") is None


def test_epic_search_sessions_expire(epic):
    epic.control(session_ttl=0.5)
    epic.load(*[care_plan(f"Patient/p{n}") for n in range(5)])
    first = get(epic, "CarePlan?_count=2").json()
    assert get(epic, link(first, "next")).status_code == 200  # fresh: fine
    time.sleep(0.8)
    expired = get(epic, link(first, "next"))
    assert expired.status_code == 410
    assert "search session expired" in issue_text(expired)
    again = get(epic, "CarePlan?_count=2").json()  # a new search gets a new session
    assert get(epic, link(again, "next")).status_code == 200


# -- oracle ------------------------------------------------------------------------------------------
def test_oracle_care_plans_are_read_only(oracle):
    stored = oracle.load(care_plan())[0]
    assert get(oracle, f"CarePlan/{stored['id']}").status_code == 200
    assert post(oracle, "CarePlan", care_plan()).status_code == 405
    assert put(oracle, f"CarePlan/{stored['id']}", stored).status_code == 405


def test_oracle_stale_if_match_is_409(oracle):
    created = post(oracle, "Patient", patient("Oracle"))
    body = created.json()
    assert put(oracle, f"Patient/{body['id']}", {**body, "gender": "male"}, **{"If-Match": created.headers["ETag"]}).status_code == 200
    stale = put(oracle, f"Patient/{body['id']}", {**body, "gender": "other"}, **{"If-Match": created.headers["ETag"]})
    assert stale.status_code == 409
    assert stale.json()["issue"][0]["code"] == "conflict"


def test_oracle_batch_yes_transaction_no(oracle):
    batch = post(oracle, "", transaction(entry(patient("OracleBatch")), entry(care_plan()), kind="batch"))
    assert batch.status_code == 200
    assert [e["response"]["status"] for e in batch.json()["entry"]] == ["201", "405"]

    refused = post(oracle, "", transaction(entry(patient("OracleTx"))))
    assert refused.status_code == 400
    assert "transaction" in issue_text(refused)
    assert total(oracle, "Patient?family=OracleTx") == 0


def test_oracle_has_no_conditional_create(oracle):
    for _ in range(2):
        post(oracle, "Patient", patient("OracleDup"), **{"If-None-Exist": "family=OracleDup"})
    assert total(oracle, "Patient?family=OracleDup") == 2


# -- faults ------------------------------------------------------------------------------------------
def test_fault_503_answers_about_the_given_share(flaky):
    replies = [get(flaky, "Patient?_count=1") for _ in range(200)]
    unavailable = [r for r in replies if r.status_code == 503]
    assert 40 <= len(unavailable) <= 80, len(unavailable)  # p = 0.3: 60 ± 3 sd
    assert {r.status_code for r in replies} == {200, 503}
    assert any(r.headers.get("Retry-After") == "0" for r in unavailable)
    assert all(r.json()["issue"][0]["code"] == "transient" for r in unavailable)
    assert flaky.stats()["fault503"] == len(unavailable)

    flaky.control(fault_503=0)
    assert all(get(flaky, "Patient").status_code == 200 for _ in range(20))


def test_fault_drop_commits_writes_without_answering(full):
    full.control(fault_drop=0.5)
    dropped = 0
    for n in range(20):
        try:
            reply = requests.post(f"{full.base_url}/Patient", json=patient("Dropped"), headers=FHIR_JSON, timeout=TIMEOUT)
            assert reply.status_code == 201
        except requests.ConnectionError:
            dropped += 1
    stats = full.stats()
    assert 0 < dropped < 20
    assert stats["drops"] == dropped and stats["writes"] == 20
    full.control(fault_drop=0)
    assert total(full, "Patient?family=Dropped") == 20  # every write committed, answered or not


def test_reset_wipes_store_stats_and_runtime_settings(full):
    full.control(fault_503=0.9)
    full.load(patient("Gone"))
    full.reset()
    assert full.settings()["fault503"] == 0
    assert total(full, "Patient?family=Gone") == 0
    assert full.stats()["requests"] == 1


# -- auth --------------------------------------------------------------------------------------------
def unsigned_jwt(claims: dict) -> str:
    encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{encode({'alg': 'RS384', 'typ': 'JWT'})}.{encode(claims)}.c2lnbmF0dXJl"


def test_token_endpoint_and_expiry(full):
    full.control(token_ttl=1)
    reply = requests.post(full.token_url, data={
        "grant_type": "client_credentials", "scope": "system/*.read",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": unsigned_jwt({"iss": "casebridge", "sub": "casebridge", "aud": full.token_url, "exp": 9999999999}),
    }, timeout=TIMEOUT)
    assert reply.status_code == 200
    grant = reply.json()
    assert grant["token_type"] == "bearer" and grant["expires_in"] == 1
    bearer = {"Authorization": f"Bearer {grant['access_token']}"}
    assert get(full, "Patient", **bearer).status_code == 200
    time.sleep(1.2)
    expired = get(full, "Patient", **bearer)
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    assert get(full, "Patient").status_code == 200  # no token required in this set-up


def test_token_endpoint_rejects_bad_requests(full):
    def token(**form):
        return requests.post(full.token_url, data=form, timeout=TIMEOUT)

    assert token(grant_type="password").json()["error"] == "unsupported_grant_type"
    bad = token(grant_type="client_credentials", client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                client_assertion="not-a-jwt")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_client"


def test_required_token(full):
    full.control(require_token="s3cret")
    missing = get(full, "Patient")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert get(full, "Patient", Authorization="Bearer wrong").status_code == 401
    assert get(full, "Patient", Authorization="Bearer s3cret").status_code == 200
    assert get(full, "Patient", Authorization=f"Bearer {full.token()}").status_code == 200
    assert get(full, "metadata").status_code == 200  # the capability statement stays open
    assert full.stats()["unauthorized"] == 2


# -- $member-match -----------------------------------------------------------------------------------
def member_match(server, member: dict) -> requests.Response:
    coverage = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/1"},
                "payor": [{"display": "Old Payer"}], "subscriberId": "S-1"}
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": member},
        {"name": "CoverageToMatch", "resource": coverage},
    ]}
    return post(server, "Patient/$member-match", parameters)


@pytest.mark.parametrize("profile", ["full", "oracle"])
def test_member_match(profile, request):
    server = request.getfixturevalue(profile)
    member_id = {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]},
                 "system": "urn:test:payer", "value": "M-1001"}
    server.load(
        patient("Member", "1960-02-03", identifier=[{"system": "urn:test:mrn", "value": "X"}, member_id]),
        patient("Twin", "1990-01-01"), patient("Twin", "1990-01-01"),
    )
    found = member_match(server, patient("Member", "1960-02-03"))
    assert found.status_code == 200, found.text
    parameters = {p["name"]: p for p in found.json()["parameter"]}
    assert parameters["MemberIdentifier"]["valueIdentifier"]["value"] == "M-1001"

    by_identifier = member_match(server, {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "X"}]})
    assert by_identifier.status_code == 200

    assert member_match(server, patient("Nobody", "2001-01-01")).status_code == 422
    several = member_match(server, patient("Twin", "1990-01-01"))
    assert several.status_code == 422 and several.json()["issue"][0]["code"] == "multiple-matches"
    assert post(server, "Patient/$member-match", {"resourceType": "Parameters"}).status_code == 400
