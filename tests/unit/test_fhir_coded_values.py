"""Coded elements R4 binds *required* (mappings.bindings): a code outside its value set is a problem at
the element's path that lists the allowed codes; every allowed code passes. fhir.resources checks none of
these, so each row here would pass its model."""
from __future__ import annotations

import copy
import re

import pytest

from mappings import bindings
from mappings.fhir_input import model_class, parse, validate, validate_resource

CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"

BASE = {
    "Patient": {"resourceType": "Patient", "id": "p1"},
    "CarePlan": {"resourceType": "CarePlan", "id": "cp1", "status": "active", "intent": "plan",
                 "subject": {"reference": "Patient/p1"}},
    "Goal": {"resourceType": "Goal", "id": "g1", "lifecycleStatus": "active", "description": {"text": "Housing"},
             "subject": {"reference": "Patient/p1"}},
    "ServiceRequest": {"resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
                       "subject": {"reference": "Patient/p1"}},
    "Condition": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                  "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
                  "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed"}]}},
    "Task": {"resourceType": "Task", "id": "t1", "status": "requested", "intent": "order"},
    "Bundle": {"resourceType": "Bundle", "type": "collection"},
}
ACTIVITY = {"activity": [{"detail": {"status": "scheduled"}}]}
TASK_INPUT = {"input": [{"type": {"text": "how to reach the client"}}]}

# (path of the coded value, its value set, a good code, a bad code, what the resource needs besides)
CODED = [
    # Patient and the datatypes it holds
    ("Patient.gender", "administrative-gender", "unknown", "M", {}),
    ("Patient.telecom[0].system", "contact-point-system", "sms", "Vexmoor", {}),
    ("Patient.telecom[0].use", "contact-point-use", "mobile", "cell", {}),
    ("Patient.address[0].use", "address-use", "billing", "shelter", {}),
    ("Patient.address[0].type", "address-type", "both", "street", {}),
    ("Patient.name[0].use", "name-use", "maiden", "legal", {}),
    ("Patient.identifier[0].use", "identifier-use", "secondary", "primary", {}),
    ("Patient.contact[0].telecom[0].system", "contact-point-system", "email", "e-mail", {}),
    ("Patient.contact[0].telecom[0].use", "contact-point-use", "work", "office", {}),
    ("Patient.contact[0].name.use", "name-use", "usual", "given", {}),
    ("Patient.contact[0].address.type", "address-type", "postal", "mail", {}),
    ("Patient.contact[0].address.use", "address-use", "temp", "temporary", {}),
    ("Patient.contact[0].gender", "administrative-gender", "female", "F", {}),
    ("Patient.link[0].type", "link-type", "seealso", "sibling", {"link": [{"other": {"reference": "Patient/p2"}}]}),
    # CarePlan
    ("CarePlan.status", "request-status", "on-hold", "open", {}),
    ("CarePlan.intent", "care-plan-intent", "option", "directive", {}),
    ("CarePlan.identifier[0].use", "identifier-use", "official", "main", {}),
    ("CarePlan.activity[0].detail.status", "care-plan-activity-status", "stopped", "paused", {}),
    ("CarePlan.activity[0].detail.kind", "care-plan-activity-kind", "ServiceRequest", "Referral", ACTIVITY),
    ("CarePlan.activity[0].detail.scheduledTiming.repeat.periodUnit", "units-of-time", "wk", "week", ACTIVITY),
    ("CarePlan.activity[0].detail.scheduledTiming.repeat.durationUnit", "units-of-time", "min", "m", ACTIVITY),
    ("CarePlan.activity[0].detail.scheduledTiming.repeat.dayOfWeek[0]", "days-of-week", "fri", "friday",
     ACTIVITY),
    ("CarePlan.activity[0].detail.scheduledTiming.repeat.boundsDuration.comparator", "quantity-comparator",
     "<=", "=<", ACTIVITY),
    ("CarePlan.activity[0].detail.quantity.comparator", "quantity-comparator", "<", "~", ACTIVITY),
    # Goal
    ("Goal.lifecycleStatus", "goal-status", "on-hold", "paused", {}),
    ("Goal.identifier[0].use", "identifier-use", "temp", "temporary", {}),
    ("Goal.target[0].detailQuantity.comparator", "quantity-comparator", ">=", "at least", {}),
    ("Goal.target[0].detailRange.low.comparator", "quantity-comparator", ">", "gt", {}),
    ("Goal.target[0].detailRatio.numerator.comparator", "quantity-comparator", "<", "lt", {}),
    ("Goal.target[0].dueDuration.comparator", "quantity-comparator", "<", "before", {}),
    # ServiceRequest
    ("ServiceRequest.status", "request-status", "revoked", "cancelled", {}),
    ("ServiceRequest.intent", "request-intent", "filler-order", "wish", {}),
    ("ServiceRequest.priority", "request-priority", "asap", "soon", {}),
    ("ServiceRequest.identifier[0].use", "identifier-use", "usual", "local", {}),
    ("ServiceRequest.requisition.use", "identifier-use", "official", "group", {}),
    ("ServiceRequest.quantityQuantity.comparator", "quantity-comparator", ">=", "≥", {}),
    ("ServiceRequest.quantityRatio.denominator.comparator", "quantity-comparator", "<=", "le", {}),
    ("ServiceRequest.occurrenceTiming.repeat.when[1]", "event-timing", "MORN", "morning",
     {"occurrenceTiming": {"repeat": {"when": ["EVE"]}}}),
    # Condition: codes, and the CodeableConcepts of its two statuses
    ("Condition.clinicalStatus.coding[0].code", "condition-clinical", "remission", "cured", {}),
    ("Condition.verificationStatus.coding[0].code", "condition-ver-status", "provisional", "suspected", {}),
    ("Condition.identifier[0].use", "identifier-use", "secondary", "alt", {}),
    ("Condition.onsetAge.comparator", "quantity-comparator", ">", "over", {}),
    ("Condition.abatementRange.high.comparator", "quantity-comparator", "<", "under", {}),
    # Task
    ("Task.status", "task-status", "in-progress", "started", {}),
    ("Task.intent", "task-intent", "unknown", "directive", {}),
    ("Task.priority", "request-priority", "stat", "now", {}),
    ("Task.identifier[0].use", "identifier-use", "old", "previous", {}),
    ("Task.groupIdentifier.use", "identifier-use", "usual", "batch", {}),
    ("Task.input[0].valueContactPoint.system", "contact-point-system", "phone", "telephone", TASK_INPUT),
    ("Task.input[0].valueAddress.use", "address-use", "home", "house", TASK_INPUT),
    ("Task.input[0].valueHumanName.use", "name-use", "nickname", "alias", TASK_INPUT),
    ("Task.input[0].valueIdentifier.use", "identifier-use", "temp", "tmp", TASK_INPUT),
    ("Task.input[0].valueQuantity.comparator", "quantity-comparator", "<", "less", TASK_INPUT),
    ("Task.input[0].valueTiming.repeat.periodUnit", "units-of-time", "d", "day", TASK_INPUT),
    # Bundle, the envelope
    ("Bundle.type", "bundle-type", "searchset", "pile", {}),
    ("Bundle.identifier.use", "identifier-use", "official", "bundle", {}),
    ("Bundle.entry[0].request.method", "http-verb", "PUT", "UPSERT",
     {"type": "transaction", "entry": [{"request": {"url": "Patient/p1"}}]}),
    ("Bundle.entry[0].search.mode", "search-entry-mode", "include", "matched", {"type": "searchset"}),
]


def _ids(row) -> str:
    return f"{row[0]}={row[3]}"


_STEP = re.compile(r"(\w+)(?:\[(\d+)\])?")


def with_value(path: str, value: str, context: dict) -> dict:
    """The base resource of the path's type, with ``context`` merged in and ``value`` set at ``path``
    (arrays and objects on the way are made or extended)."""
    resource_type, *steps = path.split(".")
    resource = copy.deepcopy({**BASE[resource_type], **context})
    target = resource
    for position, step in enumerate(steps):
        name, index = _STEP.fullmatch(step).groups()
        last = position == len(steps) - 1
        if index is None:
            if last:
                target[name] = value
            else:
                target = target.setdefault(name, {})
            continue
        items = target.setdefault(name, [])
        index = int(index)
        while len(items) <= index:
            items.append(None if last else {})
        if last:
            items[index] = value
        else:
            target = items[index]
    return resource


def listed_codes(message: str) -> list[str]:
    """The codes a problem's message lists, in its parentheses."""
    return message[message.rindex("(") + 1:message.rindex(")")].split(", ")


@pytest.mark.parametrize("path, value_set, good, bad, context", CODED, ids=[_ids(row) for row in CODED])
def test_a_code_outside_its_required_value_set_is_named_by_path(path, value_set, good, bad, context):
    assert validate_resource(with_value(path, good, context)) == []
    resource = with_value(path, bad, context)
    model_class(resource["resourceType"]).model_validate(resource)  # fhir.resources lets it through
    problems = validate_resource(resource)
    assert [p.path for p in problems] == [path]
    message = problems[0].message
    assert repr(bad) in message and f"required value set {value_set} " in message
    assert listed_codes(message) == list(bindings.VALUE_SETS[value_set].codes)


@pytest.mark.parametrize("path, value_set, good, bad, context", CODED, ids=[_ids(row) for row in CODED])
def test_every_code_of_the_value_set_is_accepted(path, value_set, good, bad, context):
    for code in bindings.VALUE_SETS[value_set].codes:
        assert validate_resource(with_value(path, code, context)) == [], code


@pytest.mark.parametrize("path, value_set, good, bad, context", [row for row in CODED if row[0][:6] != "Bundle"],
                         ids=[_ids(row) for row in CODED if row[0][:6] != "Bundle"])
def test_the_path_is_the_full_path_where_the_resource_is(path, value_set, good, bad, context):
    resource = with_value(path, bad, context)
    raw = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:0", "resource": BASE["Patient"]}, {"fullUrl": "urn:uuid:1", "resource": resource}]}
    assert [p.path for p in validate(parse(raw))] == ["Bundle.entry[1].resource" + path[path.index("."):]]
    plan = {**BASE["CarePlan"], "id": "outer", "contained": [resource]}
    assert [p.path for p in validate_resource(plan)] == ["CarePlan.contained[0]" + path[path.index("."):]]


def test_every_bad_code_of_a_resource_is_reported_at_once():
    patient = {"resourceType": "Patient", "gender": "X", "telecom": [
        {"system": "phone", "value": "1", "use": "mobile"}, {"system": "pigeon", "value": "2", "use": "roof"}],
        "address": [{"use": "home"}, {"type": "moon"}]}
    assert [p.path for p in validate_resource(patient)] == [
        "Patient.address[1].type", "Patient.gender", "Patient.telecom[1].system", "Patient.telecom[1].use"]


def test_a_value_of_the_wrong_json_type_is_one_problem_from_the_structure_check():
    problems = validate_resource({"resourceType": "Patient", "telecom": [{"system": 7, "value": "x"}]})
    assert [p.path for p in problems] == ["Patient.telecom[0].system"]
    assert "required value set" not in problems[0].message


CONCEPTS = [
    # (clinicalStatus, problem path or None when accepted)
    ({"coding": [{"system": CLINICAL, "code": "resolved", "display": "Resolved"}]}, None),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "55561003"},
                 {"system": CLINICAL, "code": "active"}], "text": "Active"}, None),
    ({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]},
     None),
    ({"coding": [{"system": CLINICAL, "code": "cured"}]}, "Condition.clinicalStatus.coding[0].code"),
    ({"coding": [{"system": "http://snomed.info/sct", "code": "55561003"}]}, "Condition.clinicalStatus"),
    ({"coding": [{"code": "active"}]}, "Condition.clinicalStatus"),
    ({"text": "active"}, "Condition.clinicalStatus"),
    ({"coding": [{"system": CLINICAL, "display": "Active"}]}, "Condition.clinicalStatus"),
]


@pytest.mark.parametrize("concept, problem", CONCEPTS)
def test_a_required_codeable_concept_needs_a_coding_from_its_value_set(concept, problem):
    condition = {**BASE["Condition"], "clinicalStatus": concept}
    problems = validate_resource(condition)
    assert [p.path for p in problems] == ([problem] if problem else [])
    if problem == "Condition.clinicalStatus":
        assert CLINICAL in problems[0].message and "resolved" in problems[0].message


def test_choice_elements_of_types_without_bound_codes_are_left_alone():
    condition = {**BASE["Condition"], "onsetString": "last winter", "abatementDateTime": "2024-05-01"}
    goal = {**BASE["Goal"], "target": [{"detailString": "<5", "dueDate": "2025"}]}
    assert validate_resource(condition) == [] and validate_resource(goal) == []


# -- the tables ------------------------------------------------------------------------------------
def test_every_table_entry_names_a_value_set_or_a_datatype():
    for table in (*bindings.RESOURCES.values(), *bindings.DATATYPES.values()):
        for path, target in table.items():
            if path.endswith("[x]"):
                assert target == "", path
            else:
                assert target in bindings.VALUE_SETS or target in bindings.DATATYPES, (path, target)


def test_each_value_set_lists_distinct_codes_and_codeable_concept_sets_name_their_system():
    for name, value_set in bindings.VALUE_SETS.items():
        assert value_set.name == name and value_set.codes
        assert len(set(value_set.codes)) == len(value_set.codes), name
    assert {n for n, vs in bindings.VALUE_SETS.items() if vs.system} == {"condition-clinical", "condition-ver-status"}


def test_the_table_covers_the_elements_casebridge_reads():
    covered = {f"{rtype}.{path}" for rtype, table in bindings.RESOURCES.items() for path in table}
    for element in ("Patient.gender", "Patient.telecom", "Patient.address", "Patient.name", "Patient.identifier",
                    "CarePlan.status", "CarePlan.intent", "CarePlan.activity.detail.status", "Goal.lifecycleStatus",
                    "ServiceRequest.status", "ServiceRequest.intent", "ServiceRequest.priority", "Task.status",
                    "Task.intent", "Task.priority", "Condition.clinicalStatus", "Condition.verificationStatus"):
        assert element in covered, element
    tested = {re.sub(r"\[\d+\]", "", row[0]) for row in CODED}
    assert {"Patient.telecom.system", "Patient.telecom.use", "Patient.address.use", "Patient.address.type",
            "Patient.name.use", "Patient.identifier.use"} <= tested
