"""The coded elements FHIR R4 binds *required*, for the resources casebridge reads, as tables.

fhir.resources checks that a ``code`` is a code-shaped string, never that it is one of its value set's
codes; this module is that check, for incoming resources (``mappings.fhir_input.validate_resource``).

The tables, one place for every allowed code:

``VALUE_SETS``  each R4 value set used by a required binding below, with all of its codes (R4 4.0.1).
``DATATYPES``   the datatypes that carry bound codes (ContactPoint.system, Address.use, ...).
``RESOURCES``   per resource type, the element paths that hold a bound code or one of those datatypes.

A path is a FHIR element path below the resource: dots go through arrays (``contact.telecom`` is every
telecom of every contact) and ``name[x]`` is a choice element, checked as the datatype its JSON name
ends with (``onsetAge`` as an Age, ``onsetString`` not at all).

The rule for a code that is not in its value set (``unknown_code``): the resource is refused, with a
problem at the element's path that lists the allowed codes. A required binding admits no other code, so
an unknown one is never mapped to a default nor dropped. A CodeableConcept bound required (Condition's
clinicalStatus and verificationStatus) needs a coding from the value set's code system with one of its
codes; one that carries nothing but extensions (a data-absent-reason) is left alone. What the allowed
codes become in the case record is ``mappings.codes``' business, with its own rule for unmapped codes.

Not checked: resource types with no table here (CareTeam, Practitioner, ...), mime types
(Attachment.contentType), currencies and languages (bound to external code systems with no list here),
Reference.identifier, and codes inside extensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = ["ValueSet", "VALUE_SETS", "DATATYPES", "RESOURCES", "check", "unknown_code"]

Loc = tuple[Union[str, int], ...]


@dataclass(frozen=True)
class ValueSet:
    """An R4 value set (``http://hl7.org/fhir/ValueSet/<name>``) and every code it holds. ``system`` is
    set for a CodeableConcept binding: the code system its coding must come from."""
    name: str
    codes: tuple[str, ...]
    system: Optional[str] = None


REQUEST_STATUS = ("draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown")
REQUEST_INTENT = ("proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order",
                  "instance-order", "option")

VALUE_SETS: dict[str, ValueSet] = {vs.name: vs for vs in (
    # datatypes
    ValueSet("identifier-use", ("usual", "official", "temp", "secondary", "old")),
    ValueSet("name-use", ("usual", "official", "temp", "nickname", "anonymous", "old", "maiden")),
    ValueSet("contact-point-system", ("phone", "fax", "email", "pager", "url", "sms", "other")),
    ValueSet("contact-point-use", ("home", "work", "temp", "old", "mobile")),
    ValueSet("address-use", ("home", "work", "temp", "old", "billing")),
    ValueSet("address-type", ("postal", "physical", "both")),
    ValueSet("quantity-comparator", ("<", "<=", ">=", ">")),
    ValueSet("units-of-time", ("s", "min", "h", "d", "wk", "mo", "a")),
    ValueSet("days-of-week", ("mon", "tue", "wed", "thu", "fri", "sat", "sun")),
    ValueSet("event-timing", (
        "MORN", "MORN.early", "MORN.late", "NOON", "AFT", "AFT.early", "AFT.late", "EVE", "EVE.early",
        "EVE.late", "NIGHT", "PHS", "HS", "WAKE", "C", "CM", "CD", "CV", "AC", "ACM", "ACD", "ACV", "PC",
        "PCM", "PCD", "PCV")),
    # Patient
    ValueSet("administrative-gender", ("male", "female", "other", "unknown")),
    ValueSet("link-type", ("replaced-by", "replaces", "refer", "seealso")),
    # CarePlan, ServiceRequest, Task, Goal
    ValueSet("request-status", REQUEST_STATUS),
    ValueSet("care-plan-intent", ("proposal", "plan", "order", "option")),
    ValueSet("care-plan-activity-kind", (
        "Appointment", "CommunicationRequest", "DeviceRequest", "MedicationRequest", "NutritionOrder", "Task",
        "ServiceRequest", "VisionPrescription")),
    ValueSet("care-plan-activity-status", (
        "not-started", "scheduled", "in-progress", "on-hold", "completed", "cancelled", "stopped", "unknown",
        "entered-in-error")),
    ValueSet("request-intent", REQUEST_INTENT),
    ValueSet("request-priority", ("routine", "urgent", "asap", "stat")),
    ValueSet("task-status", (
        "draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress",
        "on-hold", "failed", "completed", "entered-in-error")),
    ValueSet("task-intent", ("unknown", *(code for code in REQUEST_INTENT if code != "directive"))),
    ValueSet("goal-status", (
        "proposed", "planned", "accepted", "active", "on-hold", "completed", "cancelled", "entered-in-error",
        "rejected")),
    # Condition (CodeableConcepts)
    ValueSet("condition-clinical", ("active", "recurrence", "relapse", "inactive", "remission", "resolved"),
             system="http://terminology.hl7.org/CodeSystem/condition-clinical"),
    ValueSet("condition-ver-status", (
        "unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"),
        system="http://terminology.hl7.org/CodeSystem/condition-ver-status"),
    # Bundle (the envelope of what is sent)
    ValueSet("bundle-type", (
        "document", "message", "transaction", "transaction-response", "batch", "batch-response", "history",
        "searchset", "collection")),
    ValueSet("http-verb", ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")),
    ValueSet("search-entry-mode", ("match", "include", "outcome")),
)}

_QUANTITY = {"comparator": "quantity-comparator"}
#: datatype -> {element path below it: a value set, or a datatype whose bound codes are checked in turn}
DATATYPES: dict[str, dict[str, str]] = {
    "Identifier": {"use": "identifier-use"},
    "HumanName": {"use": "name-use"},
    "ContactPoint": {"system": "contact-point-system", "use": "contact-point-use"},
    "Address": {"use": "address-use", "type": "address-type"},
    "Quantity": _QUANTITY, "Age": _QUANTITY, "Count": _QUANTITY, "Distance": _QUANTITY, "Duration": _QUANTITY,
    "Range": {"low": "Quantity", "high": "Quantity"},
    "Ratio": {"numerator": "Quantity", "denominator": "Quantity"},
    "Timing": {"repeat.bounds[x]": "", "repeat.durationUnit": "units-of-time", "repeat.periodUnit": "units-of-time",
               "repeat.dayOfWeek": "days-of-week", "repeat.when": "event-timing"},
}

#: resource type -> {element path: a value set or a datatype}; ``[x]`` paths map to "" (their datatype is
#: the one their JSON name ends with)
RESOURCES: dict[str, dict[str, str]] = {
    "Patient": {
        "identifier": "Identifier", "name": "HumanName", "telecom": "ContactPoint",
        "gender": "administrative-gender", "address": "Address",
        "contact.name": "HumanName", "contact.telecom": "ContactPoint", "contact.address": "Address",
        "contact.gender": "administrative-gender", "link.type": "link-type",
    },
    "CarePlan": {
        "identifier": "Identifier", "status": "request-status", "intent": "care-plan-intent",
        "activity.detail.kind": "care-plan-activity-kind", "activity.detail.status": "care-plan-activity-status",
        "activity.detail.scheduled[x]": "", "activity.detail.dailyAmount": "Quantity",
        "activity.detail.quantity": "Quantity",
    },
    "Goal": {
        "identifier": "Identifier", "lifecycleStatus": "goal-status", "target.detail[x]": "", "target.due[x]": "",
    },
    "ServiceRequest": {
        "identifier": "Identifier", "requisition": "Identifier", "status": "request-status",
        "intent": "request-intent", "priority": "request-priority", "quantity[x]": "", "occurrence[x]": "",
    },
    "Condition": {
        "identifier": "Identifier", "clinicalStatus": "condition-clinical",
        "verificationStatus": "condition-ver-status", "onset[x]": "", "abatement[x]": "",
    },
    "Task": {
        "identifier": "Identifier", "groupIdentifier": "Identifier", "status": "task-status",
        "intent": "task-intent", "priority": "request-priority", "input.value[x]": "", "output.value[x]": "",
    },
    "Bundle": {
        "identifier": "Identifier", "type": "bundle-type", "entry.request.method": "http-verb",
        "entry.search.mode": "search-entry-mode",
    },
}


def unknown_code(value: str, value_set: ValueSet) -> str:
    """The rule for a code outside its required value set: a problem (the resource is refused) that
    names the value set and lists every code it allows."""
    return f"{value!r} is not a code of the required value set {value_set.name} ({', '.join(value_set.codes)})"


def check(resource_type: Any, resource: dict, loc: Loc = ()) -> list[tuple[Loc, str]]:
    """(element location below ``loc``, message) for every bound code of ``resource`` that its value set
    does not hold; [] for a resource type with no table. Values of the wrong JSON type are left to the
    structural validation."""
    found: list[tuple[Loc, str]] = []
    for names, target in _COMPILED.get(resource_type, ()) if isinstance(resource_type, str) else ():
        _walk(resource, names, target, loc, found)
    return found


# -- the walk --------------------------------------------------------------------------------------
Compiled = tuple[tuple[tuple[str, ...], str], ...]


def _compile(table: dict[str, str]) -> Compiled:
    return tuple((tuple(path.split(".")), target) for path, target in table.items())


_COMPILED: dict[str, Compiled] = {name: _compile(table) for name, table in RESOURCES.items()}
_COMPILED_TYPES: dict[str, Compiled] = {name: _compile(table) for name, table in DATATYPES.items()}


def _walk(value: Any, names: tuple[str, ...], target: str, loc: Loc, found: list) -> None:
    if type(value) is list:
        for index, item in enumerate(value):
            _walk(item, names, target, loc + (index,), found)
        return
    if not names:
        _check_value(value, target, loc, found)
        return
    if type(value) is not dict:
        return
    name = names[0]
    if name.endswith("[x]"):  # a choice: its datatype is the end of the JSON name
        prefix = name[:-3]
        for key, item in value.items():
            datatype = key[len(prefix):]
            if key.startswith(prefix) and datatype in _COMPILED_TYPES:
                _walk(item, names[1:], datatype, loc + (key,), found)
        return
    item = value.get(name)
    if item is not None:
        _walk(item, names[1:], target, loc + (name,), found)


def _check_value(value: Any, target: str, loc: Loc, found: list) -> None:
    datatype = _COMPILED_TYPES.get(target)
    if datatype is not None:
        for names, inner in datatype:
            _walk(value, names, inner, loc, found)
        return
    value_set = VALUE_SETS[target]
    if value_set.system is None:
        if type(value) is str and value not in value_set.codes:
            found.append((loc, unknown_code(value, value_set)))
    elif type(value) is dict:
        _check_concept(value, value_set, loc, found)


def _check_concept(concept: dict, value_set: ValueSet, loc: Loc, found: list) -> None:
    codings = concept.get("coding")
    codings = codings if type(codings) is list else []
    before, matched = len(found), False
    for index, coding in enumerate(codings):
        if type(coding) is not dict or coding.get("system") != value_set.system:
            continue
        code = coding.get("code")
        if code in value_set.codes:
            matched = True
        elif type(code) is str:
            found.append((loc + ("coding", index, "code"), unknown_code(code, value_set)))
    if not matched and len(found) == before and (codings or concept.get("text") is not None):
        found.append((loc, f"needs a coding from the required value set {value_set.name}: system "
                           f"{value_set.system}, code one of {', '.join(value_set.codes)}"))
