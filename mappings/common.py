"""Small shapes every mapping uses: references, codings, telecoms, extensions, field-copy tables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from mappings import ids

PROFILE_BASE = "http://hl7.org/fhir/us/core/StructureDefinition/"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def profile(name: str) -> dict:
    return {"profile": [PROFILE_BASE + name]}


def fhir_id(entity: Any, resource_type: str, *parts: str) -> str:
    """The resource id an entity converts to: the partner's own id when the entity came from one,
    otherwise the deterministic id named by ``parts``."""
    extras = getattr(entity, "fhir", None)
    if extras and "id" in extras:
        return extras["id"]
    return ids.resource_id(resource_type, *parts)


def reference(resource_type: str, resource_id: str) -> dict:
    return {"reference": f"{resource_type}/{resource_id}"}


def code_concept(code: Any, text: Optional[str]) -> dict:
    """A CodeableConcept from an optional standard ``Code`` and the words a person used."""
    concept: dict = {}
    if code is not None:
        coding = {"system": code.system, "code": code.code}
        if code.display:
            coding["display"] = code.display
        concept["coding"] = [coding]
    if text:
        concept["text"] = text
    return concept


def concept_text(concept: Optional[dict]) -> Optional[str]:
    """The words of a CodeableConcept: its text, else its first coding's display, else its code."""
    if not concept:
        return None
    if concept.get("text"):
        return concept["text"]
    for coding in concept.get("coding", ()):
        if coding.get("display"):
            return coding["display"]
    for coding in concept.get("coding", ()):
        if coding.get("code"):
            return coding["code"]
    return None


def codings(concepts: Iterable[dict]) -> list[dict]:
    return [c for concept in concepts for c in concept.get("coding", ())]


def find_coding(concept: Optional[dict], system: str) -> Optional[str]:
    for coding in (concept or {}).get("coding", ()):
        if coding.get("system") == system:
            return coding.get("code")
    return None


def telecom(phone: Optional[str], email: Optional[str]) -> list[dict]:
    points = []
    if phone:
        points.append({"system": "phone", "value": phone})
    if email:
        points.append({"system": "email", "value": email})
    return points


def telecom_value(points: Optional[list[dict]], system: str) -> Optional[str]:
    for point in points or ():
        if point.get("system") == system and point.get("value"):
            return point["value"]
    return None


def extension(url: str, value_type: str, value: Any) -> dict:
    return {"url": url, value_type: value}


def extension_value(resource: dict, url: str, value_type: str) -> Any:
    for ext in resource.get("extension", ()):
        if ext.get("url") == url:
            return ext.get(value_type)
    return None


def extension_values(resource: dict, url: str, value_type: str) -> list:
    return [e[value_type] for e in resource.get("extension", ()) if e.get("url") == url and value_type in e]


def own_identifier(resource: dict, system: str) -> Optional[str]:
    for ident in resource.get("identifier", ()):
        if ident.get("system") == system and ident.get("value"):
            return ident["value"]
    return None


def reference_id(ref: Optional[dict], resource_type: str) -> Optional[str]:
    """The id in a relative ``Type/id`` reference (references are made relative on import)."""
    target = (ref or {}).get("reference") or ""
    prefix = resource_type + "/"
    return target[len(prefix):] if target.startswith(prefix) else None


@dataclass(frozen=True, slots=True)
class Copy:
    """One field copied as it is: ``attr`` on the record, ``element`` on the resource."""
    attr: str
    element: str


def copy_out(entity: Any, table: Iterable[Copy], resource: dict) -> None:
    for c in table:
        value = getattr(entity, c.attr)
        if value is not None:
            resource[c.element] = value


def copy_in(resource: dict, table: Iterable[Copy]) -> dict:
    return {c.attr: resource[c.element] for c in table if c.element in resource}


def drop_empty(resource: dict) -> dict:
    """FHIR forbids empty elements: remove keys whose value is None, '' or an empty list/object."""
    return {k: v for k, v in resource.items() if v not in (None, "", [], {})}
