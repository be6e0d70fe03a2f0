"""Checks every Bundle casebridge produces must pass: ids unique, every reference resolves inside the
Bundle, and the elements US Core requires are present."""
from __future__ import annotations

from typing import Any, Iterator

from mappings import codes
from service.errors import Problem

#: element → what US Core requires of it; each entry is a tuple of alternatives (one must be present)
REQUIRED: dict[str, list[tuple[str, ...]]] = {
    "Patient": [("identifier",), ("name",), ("gender", "_gender")],
    "CarePlan": [("status",), ("intent",), ("category",), ("subject",), ("text",)],
    "Goal": [("lifecycleStatus",), ("description",), ("subject",)],
    "ServiceRequest": [("status",), ("intent",), ("code",), ("subject",), ("category",), ("requester",)],
    "Condition": [("category",), ("code",), ("subject",), ("clinicalStatus",)],
    "Task": [("status",), ("intent",), ("focus",), ("for",)],
    "CareTeam": [("subject",), ("participant", "managingOrganization")],
    "Practitioner": [("identifier",), ("name",)],
    "Organization": [("identifier", "name"), ("active",)],
}
#: US Core elements required when the record knows them (a strict check for team-written samples)
WHEN_KNOWN: dict[str, list[tuple[str, ...]]] = {
    "Goal": [("startDate", "target")],
    "ServiceRequest": [("authoredOn",)],
}


def check_bundle(bundle: dict, strict: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    entries = bundle.get("entry", [])
    by_full_url: dict[str, dict] = {}
    by_type_id: set[str] = set()
    for i, entry in enumerate(entries):
        resource = entry.get("resource") or {}
        path = f"Bundle.entry[{i}]"
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        if resource.get("id"):
            if key in by_type_id:
                problems.append(Problem(f"{path}.resource.id", f"{key} appears twice"))
            by_type_id.add(key)
        url = entry.get("fullUrl")
        if url:
            if url in by_full_url:
                problems.append(Problem(f"{path}.fullUrl", f"{url} appears twice"))
            by_full_url[url] = resource
        problems.extend(_conformance(resource, f"{path}.resource", strict))
    for i, entry in enumerate(entries):
        resource = entry.get("resource") or {}
        contained = {c.get("id") for c in resource.get("contained", ())}
        for where, ref in _references(resource, f"Bundle.entry[{i}].resource"):
            if ref.startswith("#"):
                if ref != "#" and ref[1:] not in contained:
                    problems.append(Problem(where, f"{ref} is not a contained resource"))
            elif not (ref in by_full_url or _relative(ref) in by_type_id):
                problems.append(Problem(where, f"{ref} does not resolve inside the Bundle"))
    return problems


def _relative(ref: str) -> str:
    parts = ref.split("/")
    return "/".join(parts[-2:]) if "_history" not in parts else "/".join(parts[-4:-2])


def _references(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "contained":
                continue
            if key == "reference" and isinstance(item, str):
                yield f"{path}.reference", item
            else:
                yield from _references(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _references(item, f"{path}[{i}]")


def _conformance(resource: dict, path: str, strict: bool) -> list[Problem]:
    rtype = resource.get("resourceType", "")
    rules = REQUIRED.get(rtype, []) + (WHEN_KNOWN.get(rtype, []) if strict else [])
    problems = [Problem(f"{path}.{alternatives[0]}", f"US Core requires {rtype}.{' or '.join(alternatives)}")
                for alternatives in rules if not any(resource.get(a) for a in alternatives)]
    if rtype == "CarePlan" and not any(c.get("code") == "assess-plan" and c.get("system") == codes.CAREPLAN_CATEGORY
                                       for cat in resource.get("category", ()) for c in cat.get("coding", ())):
        problems.append(Problem(f"{path}.category", "US Core requires the assess-plan category"))
    return problems
