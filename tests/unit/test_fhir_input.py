"""mappings.fhir_input: reading FHIR input. Small inline fixtures first, then the published examples
in ../shared/corpus (read in place, never copied here)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from mappings.fhir_input import (
    CASE_TYPES, MAPPED_TYPES, CaseGroup, Entries, Entry, ResourceGraph, group_cases, parse, unmapped, validate,
    validate_resource,
)
from service.errors import Invalid, Problem

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
US_CORE_PATIENT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient|9.0.0"


def patient(pid="p1", **extra):
    return {"resourceType": "Patient", "id": pid, "name": [{"family": "Doe", "given": ["Jo"]}], **extra}


def careplan(cid="cp1", subject="Patient/p1", **extra):
    return {"resourceType": "CarePlan", "id": cid, "status": "active", "intent": "plan",
            "subject": {"reference": subject}, **extra}


def goal(gid="g1", subject="Patient/p1", **extra):
    return {"resourceType": "Goal", "id": gid, "lifecycleStatus": "active",
            "description": {"text": "Stable housing"}, "subject": {"reference": subject}, **extra}


def condition(cid="c1", subject="Patient/p1", **extra):
    return {"resourceType": "Condition", "id": cid, "code": {"text": "Homelessness"},
            "subject": {"reference": subject}, **extra}


def service_request(sid="sr1", subject="Patient/p1", **extra):
    return {"resourceType": "ServiceRequest", "id": sid, "status": "active", "intent": "order",
            "subject": {"reference": subject}, **extra}


def task(tid="t1", focus="ServiceRequest/sr1", **extra):
    resource = {"resourceType": "Task", "id": tid, "status": "requested", "intent": "order", **extra}
    if focus:
        resource["focus"] = {"reference": focus}
    return resource


def bundle(kind, *resources, base="http://example.org/fhir", **extra):
    entries = []
    for resource in resources:
        entry = {"resource": resource}
        if base is not None:
            entry["fullUrl"] = f"{base}/{resource['resourceType']}/{resource['id']}"
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries, **extra}


def problems_of(raw):
    return validate(parse(raw))


# --------------------------------------------------------------------------------------------------
# parse


def test_single_resource_from_dict_str_and_bytes():
    resource = careplan()
    for raw in (resource, json.dumps(resource), orjson.dumps(resource), "\ufeff" + json.dumps(resource)):
        entries = parse(raw)
        assert len(entries) == 1
        entry = entries[0]
        assert entry.resource == resource
        assert (entry.path, entry.element_path, entry.full_url) == ("", "CarePlan", None)
        assert entry.request_method is None and entry.request_url is None
    assert parse(resource)[0].resource is resource  # the caller's own dict, not a copy


@pytest.mark.parametrize("kind", ["collection", "searchset", "document", "message", "history"])
def test_bundle_of_each_reading_kind(kind):
    raw = bundle(kind, patient(), careplan(), goal())
    entries = parse(raw)
    assert [e.resource["resourceType"] for e in entries] == ["Patient", "CarePlan", "Goal"]
    assert [e.path for e in entries] == [f"Bundle.entry[{i}].resource" for i in range(3)]
    assert entries[1].full_url == "http://example.org/fhir/CarePlan/cp1"
    assert entries[1].resource is raw["entry"][1]["resource"]
    assert entries.warnings == [] and [b.resource for b in entries.bundles] == [raw]
    assert problems_of(raw) == []


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_transaction_and_batch_keep_requests_and_skip_deletes_with_a_warning(kind):
    raw = {"resourceType": "Bundle", "type": kind, "entry": [
        {"fullUrl": "urn:uuid:5b2a1a43-9f0a-4d8a-9a2c-1c3e5f6a7b8c", "resource": patient(),
         "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": "Goal/old"}},
        {"fullUrl": "http://example.org/fhir/Goal/g1", "resource": goal(),
         "request": {"method": "PUT", "url": "Goal/g1"}},
        {"request": {"method": "GET", "url": "Patient?name=doe"}},
    ]}
    entries = parse(raw)
    assert [(e.path, e.request_method, e.request_url) for e in entries] == [
        ("Bundle.entry[0].resource", "POST", "Patient"), ("Bundle.entry[2].resource", "PUT", "Goal/g1")]
    assert [w.path for w in entries.warnings] == ["Bundle.entry[1]", "Bundle.entry[3]"]
    assert "DELETE Goal/old" in entries.warnings[0].message
    assert "GET Patient?name=doe" in entries.warnings[1].message
    assert problems_of(raw) == []


def test_response_bundles_take_only_entries_with_a_resource_and_flatten_nested_bundles():
    inner = bundle("searchset", condition("c1"), condition("c2"))
    raw = {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": patient(), "response": {"status": "200 OK"}},
        {"response": {"status": "204 No Content"}},
        {"resource": inner, "response": {"status": "200 OK"}},
    ]}
    entries = parse(raw)
    assert [e.path for e in entries] == [
        "Bundle.entry[0].resource",
        "Bundle.entry[2].resource.entry[0].resource", "Bundle.entry[2].resource.entry[1].resource"]
    assert entries.warnings == []
    assert [b.path for b in entries.bundles] == ["", "Bundle.entry[2].resource"]
    raw["type"] = "transaction-response"
    assert len(parse(raw)) == 3


def test_ndjson_with_blank_lines_crlf_and_a_bundle_line():
    lines = [orjson.dumps(patient()), b"", orjson.dumps(bundle("document", careplan(), goal())),
             b"   ", orjson.dumps(condition())]
    for raw in (b"\n".join(lines) + b"\n", b"\r\n".join(lines), b"\n".join(lines).decode()):
        entries = parse(raw)
        assert [e.path for e in entries] == [
            "line 1", "line 3: Bundle.entry[0].resource", "line 3: Bundle.entry[1].resource", "line 5"]
        assert [e.element_path for e in entries] == [
            "line 1: Patient", "line 3: Bundle.entry[0].resource", "line 3: Bundle.entry[1].resource",
            "line 5: Condition"]


def test_a_list_of_resources():
    entries = parse([patient(), bundle("collection", goal())])
    assert [e.path for e in entries] == ["[0]", "[1]: Bundle.entry[0].resource"]


def test_bad_json_is_invalid_with_a_readable_message():
    with pytest.raises(Invalid) as caught:
        parse(b'{"resourceType": "Patient",\n "id": "p1",\n')
    assert [p.path for p in caught.value.problems] == [""]
    assert "not valid JSON" in caught.value.problems[0].message
    assert caught.value.status == 400


def test_bad_ndjson_line_is_reported_by_line_number():
    raw = b"\n".join([orjson.dumps(patient()), orjson.dumps(goal()), b'{"resourceType": "Goal",',
                      orjson.dumps(condition())])
    with pytest.raises(Invalid) as caught:
        parse(raw)
    assert [p.path for p in caught.value.problems] == ["line 3"]
    assert "not valid JSON" in caught.value.problems[0].message


def test_something_that_is_not_a_resource_is_invalid_naming_the_path():
    with pytest.raises(Invalid) as caught:
        parse({"id": "x"})
    assert caught.value.problems == [Problem("", "not a FHIR resource: the object has no resourceType")]
    raw = bundle("collection", patient(), goal())
    raw["entry"][1]["resource"] = {"id": "g1"}
    raw["entry"].append({"resource": ["not", "a", "resource"]})
    with pytest.raises(Invalid) as caught:
        parse(raw)
    assert [p.path for p in caught.value.problems] == ["Bundle.entry[1].resource", "Bundle.entry[2].resource"]
    with pytest.raises(Invalid) as caught:
        parse(b'"just a string"')
    assert caught.value.problems == [
        Problem("", "not a FHIR resource: expected an object with a resourceType, got a string")]
    with pytest.raises(Invalid) as caught:
        parse(b"\n".join([orjson.dumps(patient()), b"[1, 2]", orjson.dumps(goal())]))
    assert [p.path for p in caught.value.problems] == ["line 2"]


def test_nothing_is_mutated():
    raw = bundle("collection", patient(meta={"profile": [US_CORE_PATIENT]}),
                 careplan(contained=[goal("cg", subject="Patient/p1")], goal=[{"reference": "#cg"}]),
                 careplan("bad", period={"start": "2024-13-01"}, note=[None]),
                 service_request(), task())
    before = copy.deepcopy(raw)
    entries = parse(raw)
    validate(entries)
    graph = ResourceGraph(entries)
    for node in graph.nodes:
        graph.references(node)
    unmapped(graph, group_cases(graph))
    assert raw == before


# --------------------------------------------------------------------------------------------------
# validate


def test_a_resource_with_three_problems_reports_all_three_with_paths():
    # the bad date hides the missing status from fhir.resources (a model's own checks run only
    # when all its fields are valid); the activity status binding it does not check at all
    resource = careplan(period={"start": "2024-13-45"},
                        activity=[{"detail": {"status": "begun", "kind": "Task"}}])
    del resource["status"]
    problems = validate_resource(resource, "")
    assert {p.path for p in problems} == {
        "CarePlan.period.start", "CarePlan.status", "CarePlan.activity[0].detail.status"}
    assert len(problems) == 3
    by_path = {p.path: p.message for p in problems}
    assert by_path["CarePlan.period.start"] == "not a valid dateTime (got '2024-13-45')"
    assert by_path["CarePlan.status"] == "required element is missing"
    assert "'begun'" in by_path["CarePlan.activity[0].detail.status"]
    assert "care-plan-activity-status" in by_path["CarePlan.activity[0].detail.status"]


def test_paths_inside_a_bundle_and_in_ndjson():
    bad = careplan(period={"start": "2024-13-45"})
    problems = problems_of(bundle("collection", patient(), goal(), patient("p2"), bad))
    assert [p.path for p in problems] == ["Bundle.entry[3].resource.period.start"]
    problems = problems_of(b"\n".join([orjson.dumps(patient()), orjson.dumps(bad)]))
    assert [p.path for p in problems] == ["line 2: CarePlan.period.start"]


def test_every_problem_of_every_resource():
    first = goal(startDate="someday", lifecycleStatus="dreaming")
    second = service_request(status="pending", intent="order", authoredOn="yesterday", unknownThing=1)
    del second["subject"]
    problems = problems_of(bundle("collection", first, second))
    assert [p.path for p in problems] == [
        "Bundle.entry[0].resource.lifecycleStatus", "Bundle.entry[0].resource.startDate",
        "Bundle.entry[1].resource.authoredOn", "Bundle.entry[1].resource.status",
        "Bundle.entry[1].resource.subject", "Bundle.entry[1].resource.unknownThing"]


def test_problems_hidden_by_fhir_resources_own_checks_are_found():
    resource = careplan(
        note=[None, {"text": "ok"}],
        activity=[{"detail": {"status": "scheduled", "scheduledString": "weekly",
                              "scheduledPeriod": {"start": "2024"}}}],
        contained=[{"resourceType": "Goal", "id": "g", "description": {"text": "x"},
                    "subject": {"reference": "Patient/p1"}, "startDate": "soon"},
                   {"resourceType": "NotAType", "id": "n"},
                   {"id": "no-type"}],
        created="not a date")
    del resource["intent"]
    assert {(p.path, p.message) for p in validate_resource(resource)} == {
        ("CarePlan.activity[0].detail.scheduled[x]", "only one of scheduledPeriod, scheduledString may be present"),
        ("CarePlan.contained[0].lifecycleStatus", "required element is missing"),
        ("CarePlan.contained[0].startDate", "not a valid date (got 'soon')"),
        ("CarePlan.contained[1].resourceType", "unknown resource type 'NotAType'"),
        ("CarePlan.contained[2].resourceType", "a contained resource needs a resourceType"),
        ("CarePlan.created", "not a valid dateTime (got 'not a date')"),
        ("CarePlan.intent", "required element is missing"),
        ("CarePlan.note[0]", "null is not allowed in an array of objects"),
    }


def test_unknown_resource_type():
    entries = parse(bundle("collection", {"resourceType": "CaseRecord", "id": "x"}))
    assert validate(entries) == [Problem("Bundle.entry[0].resource.resourceType",
                                         "unknown resource type 'CaseRecord'")]
    assert validate_resource({"resourceType": "Reference", "id": "x"}) == [
        Problem("Reference.resourceType", "unknown resource type 'Reference'")]


def test_versioned_profile_and_unknown_extensions_are_accepted():
    resource = patient(
        meta={"profile": [US_CORE_PATIENT, "http://example.org/StructureDefinition/p|1.0"]},
        extension=[{"url": "http://example.org/fhir/StructureDefinition/never-heard-of-it",
                    "extension": [{"url": "inner", "valueCodeableConcept": {"text": "x"}}]}],
        _gender={"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                "valueCode": "unknown"}]},
        address=[{"line": ["1 Main St"], "extension": [{"url": "urn:example:ext", "valueString": "x"}]}])
    assert validate_resource(resource) == []
    plan = careplan(instantiatesCanonical=["http://example.org/fhir/PlanDefinition/pd|2.1"])
    assert validate_resource(plan) == []


REQUIRED_CODES = [
    ("CarePlan", careplan, "status", "active", "open"),
    ("CarePlan", careplan, "intent", "option", "idea"),
    ("Goal", goal, "lifecycleStatus", "on-hold", "paused"),
    ("ServiceRequest", service_request, "status", "revoked", "cancelled"),
    ("ServiceRequest", service_request, "intent", "filler-order", "wish"),
    ("ServiceRequest", service_request, "priority", "asap", "soon"),
    ("Task", task, "status", "in-progress", "started"),
    ("Task", task, "intent", "unknown", "order-ish"),
    ("Task", task, "priority", "stat", "now"),
    ("Patient", patient, "gender", "unknown", "M"),
]


@pytest.mark.parametrize("resource_type, make, element, good, bad", REQUIRED_CODES)
def test_required_bindings_fhir_resources_does_not_check(resource_type, make, element, good, bad):
    assert validate_resource(make(**{element: good})) == []
    problems = validate_resource(make(**{element: bad}))
    assert [p.path for p in problems] == [f"{resource_type}.{element}"]
    assert f"'{bad}'" in problems[0].message
    contained = careplan(contained=[make(**{element: bad})])
    assert [p.path for p in validate_resource(contained)] == [f"CarePlan.contained[0].{element}"]


def test_the_bundle_envelope_is_validated_too():
    raw = bundle("searchset", patient(), goal())
    raw["entry"][0]["search"] = {"mode": "match", "score": "high"}
    raw["entry"][1]["search"] = {"mode": "matched"}
    raw["entry"].append({"fullUrl": 42, "resource": condition()})
    raw["timestamp"] = "today"
    assert {p.path for p in problems_of(raw)} == {
        "Bundle.timestamp", "Bundle.entry[0].search.score", "Bundle.entry[1].search.mode",
        "Bundle.entry[2].fullUrl"}
    raw = bundle("collection", patient())
    raw["type"] = "pile"
    assert [p.path for p in problems_of(raw)] == ["Bundle.type"]
    raw = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(), "request": {"method": "UPSERT", "url": "Patient/p1"}},
        {"resource": goal(), "request": {"method": "POST"}}]}
    assert {p.path for p in problems_of(raw)} == {"Bundle.entry[0].request.method",
                                                  "Bundle.entry[1].request.url"}


def test_per_resource_validation_finds_what_bundle_validation_finds():
    # the reason validate() may validate resource by resource: the same problems, same paths
    raw = bundle("collection", careplan(period={"start": "2024-13-45"}, extra=1),
                 goal(startDate="x"), patient(birthDate="1990-02-30"), condition(onsetDateTime=7))
    with pytest.raises(ValidationError) as caught:
        get_fhir_model_class("Bundle").model_validate(raw)
    from_bundle = {"Bundle" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
                   for e in caught.value.errors()}
    assert from_bundle == {p.path for p in problems_of(raw)}


def test_valid_examples_have_no_problems():
    raw = bundle("collection", patient(gender="female", birthDate="1970"),
                 careplan(activity=[{"detail": {"status": "not-started", "kind": "ServiceRequest"}}]),
                 goal(), condition(), service_request(priority="routine"), task(**{"for": {"reference": "Patient/p1"}}))
    assert problems_of(raw) == []


# --------------------------------------------------------------------------------------------------
# the resource graph


def graph_of(raw):
    graph = ResourceGraph(parse(raw))
    return graph, {node.key: node for node in graph.nodes}


def test_reference_forms_in_a_bundle():
    raw = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "http://example.org/fhir/Patient/p1", "resource": patient()},
        {"fullUrl": "urn:uuid:0c3a7d2e-6f4b-4a8e-9d1c-2b5e8f7a6c3d",
         "resource": {"resourceType": "Practitioner", "name": [{"family": "Who"}]}},
        {"fullUrl": "urn:oid:1.2.3.4.5", "resource": {"resourceType": "Organization", "name": "Org"}},
        {"fullUrl": "http://example.org/fhir/Condition/c1", "resource": condition()},
        {"fullUrl": "http://example.org/fhir/Goal/g1", "resource": goal(
            addresses=[{"reference": "Condition/c1"},
                       {"reference": "http://example.org/fhir/Condition/c1"},
                       {"reference": "Condition/c1/_history/3"}],
            expressedBy={"reference": "urn:uuid:0c3a7d2e-6f4b-4a8e-9d1c-2b5e8f7a6c3d"},
            note=[{"authorReference": {"reference": "urn:oid:1.2.3.4.5"}}])},
        {"fullUrl": "http://other.example/fhir/Goal/g9", "resource": goal(
            "g9", subject="Patient/p1", addresses=[{"reference": "http://elsewhere.example/Condition/c1"}])},
    ]}
    graph, nodes = graph_of(raw)
    goal_node = nodes["Goal/g1"]
    resolve = graph.resolve
    assert resolve("Patient/p1", goal_node) is nodes["Patient/p1"]
    assert resolve("Condition/c1", goal_node) is nodes["Condition/c1"]
    assert resolve("http://example.org/fhir/Condition/c1", goal_node) is nodes["Condition/c1"]
    assert resolve("Condition/c1/_history/3", goal_node) is nodes["Condition/c1"]  # has no versionId
    assert resolve("urn:uuid:0c3a7d2e-6f4b-4a8e-9d1c-2b5e8f7a6c3d", goal_node).resource_type == "Practitioner"
    assert resolve("urn:oid:1.2.3.4.5", goal_node).resource_type == "Organization"
    assert resolve("Condition/nope", goal_node) is None
    assert resolve("http://elsewhere.example/Condition/c1", goal_node) is None  # another server's c1
    # the source lives on another server: its relative Patient/p1 is that server's, not ours
    assert resolve("Patient/p1", nodes["Goal/g9"]) is None
    assert resolve("", goal_node) is None and resolve(None, goal_node) is None
    # no id: the key is the fullUrl
    assert set(nodes) >= {"urn:uuid:0c3a7d2e-6f4b-4a8e-9d1c-2b5e8f7a6c3d", "urn:oid:1.2.3.4.5"}


def test_versions_and_duplicate_ids():
    first = patient("p45", meta={"versionId": "1"})
    second = patient("p45", meta={"versionId": "2"})
    raw = {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "http://example.org/fhir/Patient/p45", "resource": first},
        {"fullUrl": "http://example.org/fhir/Patient/p45", "resource": second},
        {"fullUrl": "http://example.org/fhir/Goal/g1", "resource": goal(subject="Patient/p45/_history/2")},
        {"fullUrl": "http://example.org/fhir/Goal/g2", "resource": goal("g2", subject="Patient/p45/_history/7")},
    ]}
    graph, nodes = graph_of(raw)
    assert len(nodes) == 4  # keys are unique even for the same Type/id twice
    assert graph.resolve("Patient/p45/_history/2", nodes["Goal/g1"]).resource is second
    assert graph.resolve("http://example.org/fhir/Patient/p45/_history/1", nodes["Goal/g1"]).resource is first
    assert graph.resolve("Patient/p45/_history/7", nodes["Goal/g2"]) is None


def test_relative_references_without_full_urls():
    ndjson = b"\n".join(orjson.dumps(r) for r in (patient(), goal(), careplan(goal=[{"reference": "Goal/g1"}])))
    graph, nodes = graph_of(ndjson)
    plan = nodes["CarePlan/cp1"]
    assert graph.resolve("Goal/g1", plan) is nodes["Goal/g1"]
    assert graph.resolve("http://example.org/fhir/Goal/g1", plan) is nodes["Goal/g1"]  # then by Type/id
    assert plan.path == "line 3: CarePlan" and plan.full_url is None


def test_contained_resources_and_local_references():
    plan = careplan(
        contained=[goal("g", subject="#"), condition("c", subject="Patient/p1"),
                   {"resourceType": "Practitioner", "id": "pr"}],
        goal=[{"reference": "#g"}], addresses=[{"reference": "#c"}],
        activity=[{"detail": {"status": "scheduled", "performer": [{"reference": "#pr"}]}}])
    plan["contained"][0]["addresses"] = [{"reference": "#c"}]
    graph, nodes = graph_of(bundle("collection", patient(), plan))
    container = nodes["CarePlan/cp1"]
    contained_goal = nodes["CarePlan/cp1#g"]
    assert contained_goal.container is container and contained_goal.full_url is None
    assert contained_goal.path == "Bundle.entry[1].resource.contained[0]"
    assert graph.resolve("#g", container) is contained_goal
    assert graph.resolve("#c", contained_goal) is nodes["CarePlan/cp1#c"]  # a sibling
    assert graph.resolve("#", contained_goal) is container
    assert graph.resolve("#nope", container) is None
    assert graph.resolve("Patient/p1", nodes["CarePlan/cp1#c"]) is nodes["Patient/p1"]
    assert [n.key for n in graph.by_type("Goal")] == ["CarePlan/cp1#g"]
    assert [n.key for n in graph.by_type("CarePlan")] == ["CarePlan/cp1"]


def test_conditional_references():
    raw = bundle("transaction", patient(identifier=[{"system": "urn:mrn", "value": "123"}]),
                 goal(subject="Patient?identifier=urn:mrn|123"))
    graph, nodes = graph_of(raw)
    assert graph.resolve("Patient?identifier=urn:mrn|123", nodes["Goal/g1"]) is nodes["Patient/p1"]
    assert graph.resolve("Patient?identifier=urn:mrn|999", nodes["Goal/g1"]) is None
    assert graph.resolve("Patient?name=doe", nodes["Goal/g1"]) is None


def test_references_lists_every_reference_with_its_path_but_not_inside_contained():
    plan = careplan(contained=[goal("g", subject="Patient/p1")], goal=[{"reference": "#g"}],
                    author={"reference": "Practitioner/x", "display": "Dr X"},
                    extension=[{"url": "urn:ext", "valueReference": {"reference": "Organization/o"}}],
                    activity=[{"reference": {"reference": "ServiceRequest/sr1"}},
                              {"detail": {"status": "scheduled", "goal": [{"reference": "#g"}]}}])
    graph, nodes = graph_of(plan)
    found = graph.references(nodes["CarePlan/cp1"])
    assert [path for path, _ in found] == [
        "CarePlan.subject", "CarePlan.goal[0]", "CarePlan.author", "CarePlan.extension[0].valueReference",
        "CarePlan.activity[0].reference", "CarePlan.activity[1].detail.goal[0]"]
    assert found[2][1] is plan["author"]
    assert [path for path, _ in graph.references(nodes["CarePlan/cp1#g"])] == ["CarePlan.contained[0].subject"]


# --------------------------------------------------------------------------------------------------
# case groups


def keys(nodes):
    return [node.key for node in nodes]


def test_a_careplan_and_everything_it_refers_to_make_one_case():
    raw = bundle(
        "collection",
        patient(generalPractitioner=[{"reference": "Practitioner/gp"}]),
        careplan(goal=[{"reference": "Goal/g1"}, {"reference": "#cg"}],
                 contained=[goal("cg", addresses=[{"reference": "Condition/c2"}])],
                 addresses=[{"reference": "Condition/c1"}], careTeam=[{"reference": "CareTeam/team"}],
                 activity=[{"reference": {"reference": "ServiceRequest/sr1"}},
                           {"outcomeReference": [{"reference": "Observation/o1"}],
                            "detail": {"status": "completed", "performer": [{"reference": "Organization/org"}]}}]),
        goal(),
        condition(), condition("c2"), condition("c3"),
        service_request(reasonReference=[{"reference": "Condition/c3"}]),
        task(owner={"reference": "PractitionerRole/role"}),
        task("t-sub", focus="ServiceRequest/sub", partOf=[{"reference": "Task/t1"}]),
        service_request("sub", basedOn=[{"reference": "ServiceRequest/sr1"}]),
        {"resourceType": "CareTeam", "id": "team", "subject": {"reference": "Patient/p1"},
         "participant": [{"member": {"reference": "RelatedPerson/rp"}}]},
        {"resourceType": "Practitioner", "id": "gp"},
        {"resourceType": "Organization", "id": "org"},
        {"resourceType": "PractitionerRole", "id": "role", "organization": {"reference": "Organization/org2"}},
        {"resourceType": "Organization", "id": "org2"},
        {"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": "Patient/p1"}},
        {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}},
        {"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "y"}},
    )
    graph = ResourceGraph(parse(raw))
    groups = group_cases(graph)
    assert len(groups) == 1
    case = groups[0]
    assert case.careplan.key == "CarePlan/cp1" and case.patient.key == "Patient/p1" and case.subject is None
    assert keys(case.goals) == ["CarePlan/cp1#cg", "Goal/g1"]
    assert keys(case.conditions) == ["Condition/c1", "Condition/c2", "Condition/c3"]
    assert keys(case.service_requests) == ["ServiceRequest/sr1", "ServiceRequest/sub"]
    assert keys(case.tasks) == ["Task/t1", "Task/t-sub"]
    assert keys(case.care_teams) == ["CareTeam/team"]
    assert keys(case.others) == ["Practitioner/gp", "Organization/org", "PractitionerRole/role",
                                 "Organization/org2", "RelatedPerson/rp", "Observation/o1"]
    assert keys(unmapped(graph, groups)) == ["Observation/o2"]


def test_referrals_without_a_careplan_make_a_case_per_patient():
    raw = bundle("collection", patient(), patient("p2"), patient("p3"),
                 service_request(reasonReference=[{"reference": "Condition/c1"}]), task(),
                 goal(), condition(), condition("c-other"),
                 service_request("sr2", subject="Patient/p2"),
                 careplan("cp3", subject="Patient/p3"))
    groups = group_cases(ResourceGraph(parse(raw)))
    assert [(g.careplan and g.careplan.key, g.patient.key) for g in groups] == [
        ("CarePlan/cp3", "Patient/p3"), (None, "Patient/p1"), (None, "Patient/p2")]
    p1 = groups[1]
    assert keys(p1.service_requests) == ["ServiceRequest/sr1"]
    assert keys(p1.tasks) == ["Task/t1"]
    assert keys(p1.goals) == ["Goal/g1"]
    assert keys(p1.conditions) == ["Condition/c1", "Condition/c-other"]
    assert keys(groups[2].service_requests) == ["ServiceRequest/sr2"]


def test_a_patient_alone_is_a_case():
    groups = group_cases(ResourceGraph(parse(patient())))
    assert [(g.careplan, g.patient.key, g.goals) for g in groups] == [(None, "Patient/p1", [])]


def test_nothing_is_dropped_when_patients_or_requests_are_absent():
    raw = bundle("collection",
                 task("orphan", focus="ServiceRequest/absent", **{"for": {"reference": "Patient/absent"}}),
                 goal("g-absent", subject="Patient/absent"),
                 condition("c-elsewhere", subject="Patient/elsewhere"),
                 task("no-subject", focus=None),
                 {"resourceType": "Provenance", "id": "prov", "target": [{"reference": "Task/orphan"}],
                  "recorded": "2024-01-01T00:00:00Z", "agent": [{"who": {"display": "x"}}]})
    graph = ResourceGraph(parse(raw))
    groups = group_cases(graph)
    assert [(g.patient, g.subject, keys(g.nodes())) for g in groups] == [
        (None, "Patient/absent", ["Task/orphan", "Goal/g-absent"]),
        (None, "Patient/elsewhere", ["Condition/c-elsewhere"]),
        (None, "", ["Task/no-subject"]),
    ]
    assert keys(unmapped(graph, groups)) == ["Provenance/prov"]


def test_contained_and_non_patient_subjects():
    referral = service_request(subject="#pat", contained=[patient("pat")])
    plan = careplan(subject="Group/g", goal=[{"reference": "Goal/g1"}])
    raw = bundle("collection", referral, plan, goal(subject="Group/g"),
                 {"resourceType": "Group", "id": "g", "type": "person", "actual": True})
    groups = group_cases(ResourceGraph(parse(raw)))
    assert [(g.careplan and g.careplan.key, g.patient and g.patient.key, g.subject) for g in groups] == [
        ("CarePlan/cp1", None, "Group/g"), (None, "ServiceRequest/sr1#pat", None)]
    assert keys(groups[0].goals) == ["Goal/g1"] and keys(groups[0].others) == ["Group/g"]
    assert keys(groups[1].service_requests) == ["ServiceRequest/sr1"]


def test_a_case_shared_condition_is_in_each_case_that_refers_to_it():
    raw = bundle("collection", patient(),
                 careplan("a", addresses=[{"reference": "Condition/c1"}]),
                 careplan("b", addresses=[{"reference": "Condition/c1"}]), condition())
    groups = group_cases(ResourceGraph(parse(raw)))
    assert [keys(g.conditions) for g in groups] == [["Condition/c1"], ["Condition/c1"]]
    assert all(isinstance(g, CaseGroup) for g in groups)


# --------------------------------------------------------------------------------------------------
# the published examples

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no FHIR example corpus at {CORPUS}")
CORPUS_FILES = sorted(CORPUS.glob("*/*.json")) if CORPUS.is_dir() else []
# Published examples that break the R4 specification (they are expected to fail, with these problems).
KNOWN_INVALID = {
    # Narrative.div is 1..1 (and txt-1/txt-2): the example has text.status but no div.
    "us-core/diagnosticreport-cbc.json": [Problem("DiagnosticReport.text.div", "required element is missing")],
}
VALIDATED_TYPES = {"CarePlan", "Goal", "ServiceRequest", "Patient", "Condition", "Task", "Bundle"}


def corpus_id(path):
    return f"{path.parent.name}/{path.name}"


@needs_corpus
@pytest.mark.parametrize("path", CORPUS_FILES, ids=corpus_id)
def test_corpus_file_parses_and_validates(path):
    raw = path.read_bytes()
    entries = parse(raw)
    assert entries and all(isinstance(e, Entry) for e in entries) and isinstance(entries, Entries)
    problems = validate(entries)
    expected = KNOWN_INVALID.get(corpus_id(path), [])
    assert problems == expected
    assert orjson.loads(raw) == json.loads(raw)  # sanity: orjson reads it as the stdlib does


@needs_corpus
def test_corpus_covers_the_types_that_must_validate():
    seen = {orjson.loads(p.read_bytes())["resourceType"] for p in CORPUS_FILES}
    assert VALIDATED_TYPES <= seen


def inside_target(graph, source, reference):
    """Independently of ResourceGraph: what a reference points at inside the input, or None."""
    root = source.root
    if reference.startswith("#"):
        wanted = reference[1:]
        return [n for n in graph.nodes if n.container is root and (n.id == wanted)] if wanted else [root]
    top = [n for n in graph.nodes if n.container is None]
    plain = reference.split("/_history/")[0]
    by_url = [n for n in top if n.full_url == plain]
    if by_url or "://" in reference or reference.startswith("urn:") or "?" in reference:
        return by_url
    resource_type, _, rid = plain.partition("/")
    source_url = root.full_url or ""
    marker = f"/{root.resource_type}/"
    if source_url.startswith("http") and marker in source_url:  # RESTful: resolve against its base
        return [n for n in top if n.full_url == source_url.rsplit(marker, 1)[0] + "/" + plain]
    return [n for n in top if n.resource_type == resource_type and n.id == rid]


@needs_corpus
@pytest.mark.parametrize("path", [p for p in CORPUS_FILES
                                  if orjson.loads(p.read_bytes())["resourceType"] == "Bundle"], ids=corpus_id)
def test_corpus_bundle_references_that_point_inside_resolve(path):
    graph = ResourceGraph(parse(path.read_bytes()))
    checked = 0
    for node in graph.nodes:
        for element, ref in graph.references(node):
            expected = inside_target(graph, node, ref["reference"])
            if expected:
                assert graph.resolve(ref["reference"], node) in expected, element
                checked += 1
    if path.name == "Bundle-bundle-references.json":  # the specification's own resolution examples
        assert checked == 4  # 23 relative and absolute, the urn:uuid, the versioned 45
        nodes = {n.path: n for n in graph.nodes}
        assert graph.resolve("Patient/23", nodes["Bundle.entry[6].resource"]) is None  # other base
        assert graph.resolve("Patient/45/_history/2", nodes["Bundle.entry[9].resource"]) is nodes[
            "Bundle.entry[8].resource"]


@needs_corpus
def test_corpus_as_one_ndjson_stream_groups_without_losing_anything():
    raw = b"\n".join(orjson.dumps(orjson.loads(p.read_bytes())) for p in CORPUS_FILES)
    graph = ResourceGraph(parse(raw))
    groups = group_cases(graph)
    rest = unmapped(graph, groups)
    grouped = {node for group in groups for node in group.nodes()}
    assert not grouped & set(rest)
    for node in graph.nodes:
        if node.container is None and node not in grouped and node not in rest:
            # only people and organizations no case refers to are neither grouped nor reported
            assert node.resource_type in MAPPED_TYPES - CASE_TYPES, node.key
    for resource_type in ("CarePlan", "Patient", "Goal", "Condition", "ServiceRequest", "Task", "CareTeam"):
        for node in graph.by_type(resource_type):
            if node.container is None:
                assert node in grouped, node.key
