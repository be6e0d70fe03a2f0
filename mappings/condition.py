"""Need found in assessment ⇄ US Core Condition (health concern)."""
from __future__ import annotations

from mappings import codes, ids
from mappings.common import (
    code_concept, codings, concept_text, find_coding, own_identifier, profile,
)
from service.domain import Code, Need

UNDESCRIBED = "Need identified in assessment"


def to_fhir(need: Need, condition_id: str, subject: dict) -> dict:
    category = [{"coding": [codes.CONDITION_HEALTH_CONCERN]}]
    if need.domain in codes.SDOH_DOMAIN.to_fhir:
        category.append({"coding": [codes.US_CORE_SDOH]})
    category.append({"coding": [codes.domain_coding(need.domain)]})
    condition: dict = {
        "resourceType": "Condition", "id": condition_id,
        "meta": profile("us-core-condition-problems-health-concerns"),
        "identifier": [{"system": ids.SID_NEED, "value": need.id}],
        "clinicalStatus": {"coding": [codes.NEED_STATUS.coding(need.status)]},
        "category": category,
    }
    if need.severity:
        condition["severity"] = {"coding": [codes.SEVERITY.coding(need.severity)]}
    condition["code"] = code_concept(need.code, need.description)
    condition["subject"] = subject
    if need.identified:
        condition["recordedDate"] = need.identified
    return condition


def from_fhir(condition: dict, local_id: str) -> Need:
    concept = condition.get("code")
    return Need(
        id=own_identifier(condition, ids.SID_NEED) or local_id,
        domain=codes.domain_from_codings(codings(condition.get("category", ()))),
        description=concept_text(concept) or UNDESCRIBED,
        severity=codes.SEVERITY.internal(find_coding(condition.get("severity"), codes.SNOMED)),
        status=codes.NEED_STATUS.internal(find_coding(condition.get("clinicalStatus"),
                                                      codes.CONDITION_CLINICAL)),
        identified=condition.get("recordedDate"),
        code=first_code(concept),
    )


def first_code(concept) -> Code | None:
    for coding in (concept or {}).get("coding", ()):
        if coding.get("system") and coding.get("code"):
            return Code(system=coding["system"], code=coding["code"], display=coding.get("display"))
    return None
