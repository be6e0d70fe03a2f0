"""MemoryEndpoint: the fake partner the rest of the tests use must behave like the real ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters import profiles
from adapters.base import Capabilities
from adapters.errors import (
    AmbiguousWrite,
    NotFound,
    NotSupported,
    PermanentError,
    SearchExpired,
    TransientError,
    VersionConflict,
)
from adapters.memory import MemoryEndpoint

GOLDEN = Path(__file__).parents[1] / "golden"
SYS = "https://casebridge.dev/fhir/sid/goal"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def goal(value: str, patient: str = "p1") -> dict:
    return {"resourceType": "Goal", "lifecycleStatus": "active", "identifier": [{"system": SYS, "value": value}],
            "subject": {"reference": f"Patient/{patient}"}, "description": {"text": value}}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def full(clock):
    return MemoryEndpoint(clock=clock, page_size=2)


# --- versions and capabilities -----------------------------------------------------------------------


def test_create_read_update_keeps_versions(full):
    created = full.create(goal("g"))
    assert created.version_id == "1" and created.etag == 'W/"1"'
    changed = dict(created.resource, lifecycleStatus="completed")
    updated = full.update(changed, if_match=created.etag)
    assert updated.version_id == "2"
    assert full.read("Goal", created.id).resource["lifecycleStatus"] == "completed"
    assert [v["meta"]["versionId"] for v in full.history("Goal", created.id)] == ["1", "2"]


def test_answers_are_copies(full):
    created = full.create(goal("g"))
    created.resource["lifecycleStatus"] = "cancelled"
    assert full.read("Goal", created.id).resource["lifecycleStatus"] == "active"


@pytest.mark.parametrize("profile, status", [("full", 412), ("oracle", 409)])
def test_stale_if_match_is_a_conflict_with_the_partner_status(profile, status):
    endpoint = MemoryEndpoint(profiles.capabilities(profile))
    first = endpoint.put({"resourceType": "Patient", "id": "p1", "name": [{"family": "Rivera"}]})
    endpoint.update(dict(first.resource, gender="female"), if_match="1")
    with pytest.raises(VersionConflict) as caught:
        endpoint.update(dict(first.resource, gender="male"), if_match="1")
    assert caught.value.status == status


def test_epic_like_partner_refuses_plan_writes_but_serves_reads():
    endpoint = MemoryEndpoint(profiles.capabilities("epic"))
    endpoint.put({"resourceType": "CarePlan", "id": "cp1", "status": "active"})
    assert endpoint.read("CarePlan", "cp1").version_id == "1"
    with pytest.raises(NotSupported) as caught:
        endpoint.create({"resourceType": "CarePlan", "status": "active"})
    assert caught.value.status == 405 and caught.value.outcome["issue"][0]["code"] == "not-supported"
    with pytest.raises(NotSupported):
        endpoint.update({"resourceType": "Goal", "id": "g1"})
    with pytest.raises(NotSupported):
        endpoint.create({"resourceType": "Condition"}, if_none_exist="identifier=a|b")


def test_read_of_unknown_resource_is_not_found(full):
    with pytest.raises(NotFound):
        full.read("Goal", "nope")


def test_update_as_create_only_where_client_ids_are_allowed(full):
    assert full.update({"resourceType": "Goal", "id": "ours-1"}).version_id == "1"
    no_client_ids = MemoryEndpoint(Capabilities.build({"Goal": ["read", "update"]}))
    with pytest.raises(NotSupported):
        no_client_ids.update({"resourceType": "Goal", "id": "ours-1"})


def test_oracle_like_partner_needs_if_match_on_update():
    endpoint = MemoryEndpoint(profiles.capabilities("oracle"))
    endpoint.put({"resourceType": "Patient", "id": "p1"})
    with pytest.raises(PermanentError) as caught:
        endpoint.update({"resourceType": "Patient", "id": "p1", "gender": "other"})
    assert caught.value.status == 428
    assert endpoint.update({"resourceType": "Patient", "id": "p1", "gender": "other"}, if_match='W/"1"').version_id == "2"


def test_conditional_create_finds_the_first_instead_of_a_duplicate(full):
    first = full.create(goal("g1"), if_none_exist=f"identifier={SYS}|g1")
    again = full.create(goal("g1"), if_none_exist=f"identifier={SYS}|g1")
    assert again.id == first.id and len(full.all("Goal")) == 1
    full.put(dict(goal("g1"), id="dup"))
    with pytest.raises(PermanentError) as caught:
        full.create(goal("g1"), if_none_exist=f"identifier={SYS}|g1")
    assert caught.value.status == 412


# --- search ------------------------------------------------------------------------------------------


def test_search_by_identifier_patient_id_and_last_updated(full, clock):
    a = full.create(goal("a", patient="p1"))
    clock.now += 60
    b = full.create(goal("b", patient="p2"))
    full.create({"resourceType": "Goal", "identifier": [{"value": "loose"}], "subject": {"reference": "Patient/p1"}})
    ids = lambda params: [r["id"] for r in full.search("Goal", params)]  # noqa: E731
    assert ids({"identifier": f"{SYS}|b"}) == [b.id]
    assert ids({"identifier": "|b"}) == []  # "|value": only identifiers without a system
    assert len(ids({"identifier": "|loose"})) == 1 and len(ids({"identifier": "loose"})) == 1
    assert ids({"identifier": f"{SYS}|"}) == [a.id, b.id]
    assert len(ids({"patient": "Patient/p1"})) == 2 and ids({"patient": "p2"}) == [b.id]
    assert ids({"_id": f"{a.id},{b.id}"}) == [a.id, b.id]
    stamp = a.resource["meta"]["lastUpdated"]
    assert a.id not in ids({"_lastUpdated": f"gt{stamp}"}) and b.id in ids({"_lastUpdated": f"gt{stamp}"})
    assert ids({"_lastUpdated": [f"ge{stamp}", f"le{stamp}"]}) == [a.id]


def test_unknown_search_parameter_is_a_400(full):
    with pytest.raises(PermanentError) as caught:
        full.search_page("Goal", {"category": "x"})
    assert caught.value.status == 400


def test_pages_follow_next_links_with_page_size_and_cap(full):
    for n in range(5):
        full.create(goal(f"g{n}"))
    page = full.search_page("Goal", {})
    assert len(page.resources) == 2 and page.total == 5 and page.next
    assert len(list(full.search("Goal"))) == 5
    capped = MemoryEndpoint(profiles.capabilities("full", max_page_size=3))
    for n in range(5):
        capped.create(goal(f"g{n}"))
    assert len(capped.search_page("Goal", {"_count": "50"}).resources) == 3


def test_expired_session_restarts_once_without_repeats(clock):
    endpoint = MemoryEndpoint(page_size=2, session_ttl=60, clock=clock)
    for n in range(5):
        endpoint.create(goal(f"g{n}"))
    seen = []
    for resource in endpoint.search("Goal"):
        seen.append(resource["id"])
        clock.now += 25  # slow consumer: the session expires before page three
    assert sorted(seen) == sorted(r["id"] for r in endpoint.all("Goal"))
    assert len(seen) == len(set(seen)) == 5
    assert sum(1 for method, detail in endpoint.calls if detail.startswith("Goal?")) == 2


def test_second_expiry_is_raised(full):
    for n in range(5):
        full.create(goal(f"g{n}"))
    search = full.search("Goal")
    next(search)
    with pytest.raises(SearchExpired):
        for _ in search:
            full.expire_searches()


# --- transaction and batch ---------------------------------------------------------------------------


def test_transaction_resolves_urn_uuid_references(full):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:goal-1", "resource": goal("g1", patient="x"), "request": {"method": "POST", "url": "Goal"}},
        {"fullUrl": "urn:uuid:plan-1", "request": {"method": "POST", "url": "CarePlan"},
         "resource": {"resourceType": "CarePlan", "status": "active", "intent": "plan",
                      "goal": [{"reference": "urn:uuid:goal-1"}]}},
    ]}
    answer = full.transaction(bundle)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "201 Created"]
    goal_id = answer["entry"][0]["resource"]["id"]
    assert answer["entry"][1]["resource"]["goal"] == [{"reference": f"Goal/{goal_id}"}]
    assert answer["entry"][0]["response"]["location"] == f"Goal/{goal_id}/_history/1"


def test_transaction_is_all_or_nothing(full):
    full.put({"resourceType": "Patient", "id": "p1"})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:g", "resource": goal("g1"), "request": {"method": "POST", "url": "Goal"}},
        {"resource": {"resourceType": "Patient", "id": "p1"},
         "request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 'W/"7"'}},
    ]}
    with pytest.raises(VersionConflict):
        full.transaction(bundle)
    assert full.all("Goal") == [] and full.get("Patient", "p1")["meta"]["versionId"] == "1"


def test_golden_transaction_bundle_lands_on_a_full_partner(full):
    bundle = json.loads((GOLDEN / "minimal.transaction.json").read_text())
    answer = full.transaction(bundle)
    assert len(answer["entry"]) == len(bundle["entry"])
    for entry in bundle["entry"]:
        rtype, rid = entry["request"]["url"].split("/")
        assert full.get(rtype, rid) is not None
    again = full.transaction(bundle)
    assert {e["response"]["status"] for e in again["entry"]} == {"200 OK"}


def test_oracle_like_partner_has_batch_not_transaction():
    endpoint = MemoryEndpoint(profiles.capabilities("oracle"))
    endpoint.put({"resourceType": "Patient", "id": "p1"})
    with pytest.raises(NotSupported):
        endpoint.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
    answer = endpoint.batch({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Condition"}, "request": {"method": "POST", "url": "Condition"}},
        {"resource": {"resourceType": "CarePlan"}, "request": {"method": "POST", "url": "CarePlan"}},
        {"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "PUT", "url": "Patient/p1",
                                                                        "ifMatch": 'W/"9"'}},
        {"request": {"method": "GET", "url": "Patient/p1"}},
    ]})
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "405", "409", "200 OK"]
    assert answer["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"


def test_conditional_update_in_a_bundle(full):
    first = full.create(goal("g1"))
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": dict(goal("g1"), lifecycleStatus="completed"),
         "request": {"method": "PUT", "url": f"Goal?identifier={SYS}|g1"}},
        {"resource": goal("g2"), "request": {"method": "PUT", "url": f"Goal?identifier={SYS}|g2"}},
    ]}
    answer = full.batch(bundle)
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "201 Created"]
    assert full.get("Goal", first.id)["lifecycleStatus"] == "completed"


# --- faults ------------------------------------------------------------------------------------------


def test_fail_next_raises_then_recovers(full):
    full.fail_next(2, TransientError("partner down", status=503, retry_after=10), on={"create"})
    full.put(goal("seed"))
    for _ in range(2):
        with pytest.raises(TransientError):
            full.create(goal("g"))
    assert full.all("Goal")[0]["identifier"][0]["value"] == "seed"
    assert full.create(goal("g")).version_id == "1"


def test_dropped_answer_applies_the_write_then_raises_ambiguous(full):
    full.drop_answer_next(1)
    with pytest.raises(AmbiguousWrite):
        full.create(goal("g1"))
    assert len(full.all("Goal")) == 1  # the caller must look before retrying
    assert [r["id"] for r in full.search("Goal", {"identifier": f"{SYS}|g1"})]
    full.create(goal("g2"))  # the fault is spent


# --- $member-match -----------------------------------------------------------------------------------


def member_params(family="Rivera", given="Ana", birth="1980-02-03") -> dict:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": {"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
                                               "birthDate": birth}},
        {"name": "CoverageToMatch", "resource": {"resourceType": "Coverage", "status": "active"}},
    ]}


def test_member_match_with_the_default_matcher(full):
    full.put({"resourceType": "Patient", "id": "m1", "name": [{"family": "RIVERA", "given": ["Ana"]}],
              "birthDate": "1980-02-03", "identifier": [{"type": {"coding": [
                  {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]},
                  "system": "https://payer.example/member", "value": "M-123"}]})
    answer = full.operation("Patient", "$member-match", member_params())
    params = {p["name"]: p for p in answer["parameter"]}
    assert params["MemberIdentifier"]["valueIdentifier"]["value"] == "M-123"
    assert params["MemberId"]["valueReference"] == {"reference": "Patient/m1"}
    with pytest.raises(PermanentError) as caught:
        full.operation("Patient", "member-match", member_params(family="Nobody"))
    assert caught.value.status == 422


def test_member_match_with_a_pluggable_matcher():
    endpoint = MemoryEndpoint(member_matcher=lambda params, ep: ep.get("Patient", "fixed"))
    endpoint.put({"resourceType": "Patient", "id": "fixed"})
    answer = endpoint.operation("Patient", "member-match", member_params(family="Anyone"))
    assert answer["parameter"][1]["valueReference"]["reference"] == "Patient/fixed"


def test_member_match_unsupported_where_the_partner_does_not_offer_it():
    with pytest.raises(NotSupported):
        MemoryEndpoint(profiles.capabilities("epic")).operation("Patient", "member-match", member_params())


def test_search_by_focus_reference(full):
    request = full.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order"})
    task = full.create({"resourceType": "Task", "status": "requested", "intent": "order",
                        "focus": {"reference": f"ServiceRequest/{request.id}"}})
    full.create({"resourceType": "Task", "status": "requested", "intent": "order",
                 "focus": {"reference": "ServiceRequest/other"}})
    found = [r["id"] for r in full.search("Task", {"focus": f"ServiceRequest/{request.id}"})]
    assert found == [task.id]
    assert [r["id"] for r in full.search("Task", {"status": "requested", "_id": task.id})] == [task.id]
