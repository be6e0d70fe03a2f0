"""Case record → FHIR: golden pairs written by the team, and the invariants every output must pass."""
import json
import os
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from mappings import codes
from mappings.export import case_bundle
from mappings.invariants import check_bundle
from service import schemas

TESTS = Path(__file__).resolve().parents[1]
SAMPLES = sorted((TESTS / "fixtures" / "cases").glob("*.json"))
GOLDEN = TESTS / "golden"
REGENERATE = os.environ.get("CASEBRIDGE_REGENERATE_GOLDEN") == "1"


def load(path: Path):
    return schemas.load_case(json.loads(path.read_text()))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("bundle_type", ["collection", "transaction"])
def test_golden_pair(sample, bundle_type):
    produced = case_bundle(load(sample), bundle_type)
    golden = GOLDEN / f"{sample.stem}.{bundle_type}.json"
    if REGENERATE:
        golden.write_text(json.dumps(produced, indent=2, ensure_ascii=False) + "\n")
    assert produced == json.loads(golden.read_text())


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("bundle_type", ["collection", "transaction"])
def test_every_output_is_valid_fhir_and_holds_together(sample, bundle_type):
    bundle = case_bundle(load(sample), bundle_type)
    Bundle.model_validate(bundle)
    assert check_bundle(bundle, strict=True) == []


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_ids_are_deterministic(sample):
    first, second = case_bundle(load(sample)), case_bundle(load(sample))
    assert first == second
    assert [e["resource"]["id"] for e in first["entry"]] == [e["resource"]["id"] for e in second["entry"]]


def test_a_transaction_puts_every_resource_to_its_own_id():
    bundle = case_bundle(load(TESTS / "fixtures" / "cases" / "discharge.json"), "transaction")
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}


def test_the_plan_follows_the_chronic_care_pattern():
    case = load(TESTS / "fixtures" / "cases" / "realistic.json")
    bundle = case_bundle(case)
    plan = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CarePlan")
    assert plan["intent"] == "plan"
    assert {"system": codes.CAREPLAN_CATEGORY, "code": "assess-plan"}.items() <= plan["category"][0]["coding"][0].items()
    assert plan["text"]["status"] == "generated" and case.goals[0].description in plan["text"]["div"]
    assert len(plan["activity"]) == len(case.services)
    for activity, service in zip(plan["activity"], case.services):
        assert set(activity) <= {"reference", "extension"}
        pertains = [e for e in activity.get("extension", ()) if e["url"].endswith("resource-pertainsToGoal")]
        assert len(pertains) == len(service.goals)
    goals = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Goal"]
    assert all(g.get("addresses") for g, src in zip(goals, case.goals) if src.addresses)


def test_every_referral_has_a_task_carrying_its_status():
    case = load(TESTS / "fixtures" / "cases" / "realistic.json")
    bundle = case_bundle(case)
    tasks = {e["resource"]["focus"]["reference"]: e["resource"] for e in bundle["entry"]
             if e["resource"]["resourceType"] == "Task"}
    requests = {s.id: e["resource"] for s in case.services for e in bundle["entry"]
                if e["resource"]["resourceType"] == "ServiceRequest"
                and e["resource"]["identifier"][0]["value"] == s.id}
    for service in case.services:
        task = tasks.get(f"ServiceRequest/{requests[service.id]['id']}")
        assert (task is not None) == (service.kind == "referral")
        if task:
            assert task["status"] == codes.TASK_STATUS.fhir(service.status)


@pytest.mark.parametrize("table", [v for v in vars(codes).values() if isinstance(v, codes.CodeMap)],
                         ids=lambda t: t.name)
def test_every_code_table_has_a_rule_for_codes_it_does_not_know(table):
    for internal, code in table.to_fhir.items():
        assert table.fhir(internal) == code
    assert table.internal("no-such-code") == table.unmapped
    with pytest.raises(codes.UnmappedCode):
        table.fhir("no-such-code")


def test_resources_of_a_restricted_domain_carry_security_labels():
    case = load(TESTS / "fixtures" / "cases" / "behavioral_referral.json")
    assert case.sharing.restricted_domains == ["substance_use"]
    bundle = case_bundle(case)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        labels = {c["code"] for c in resource.get("meta", {}).get("security", ())}
        restricted = any(c.get("code") == "substance-use" for cat in resource.get("category", ())
                         for c in cat.get("coding", ()))
        if resource["resourceType"] in ("Condition", "Goal", "ServiceRequest") and restricted:
            assert {"R", "NORDSCLCD", "42CFRPart2"} <= labels
        elif resource["resourceType"] != "Task":
            assert not labels


def test_the_shareable_view_leaves_out_restricted_domains_and_confidential_notes():
    from service.domain import rule_violations, shareable

    case = load(TESTS / "fixtures" / "cases" / "behavioral_referral.json")
    shared = shareable(case)
    assert rule_violations(shared) == []
    assert all(x.domain != "substance_use" for x in [*shared.needs, *shared.goals, *shared.services])
    assert any(n.confidential for n in case.notes) and not any(n.confidential for n in shared.notes)
    bundle = case_bundle(shared)
    assert check_bundle(bundle) == []
    assert "substance-use" not in json.dumps([e["resource"] for e in bundle["entry"]
                                              if e["resource"]["resourceType"] != "CarePlan"])
