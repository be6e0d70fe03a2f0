"""Service or referral ⇄ US Core ServiceRequest (the provider travels as contained resources)."""
from __future__ import annotations

from typing import Callable, Optional

from mappings import codes, ids
from mappings.common import (
    codings, code_concept, concept_text, extension_value, extension_values, own_identifier, profile,
    telecom, telecom_value,
)
from mappings.condition import first_code
from service.domain import Provider, Service

PROVIDER_ORG = "provider-organization"
PROVIDER_PERSON = "provider-person"


def to_fhir(service: Service, request_id: str, subject: dict, requester: dict,
            need_ref: Callable[[str], dict], goal_ref: Callable[[str], dict]) -> dict:
    extension = [{"url": ids.EXT_SERVICE_KIND, "valueCode": service.kind}]
    if service.kind != "referral":  # a referral's status travels in its Task
        extension.append({"url": ids.EXT_SERVICE_STATUS, "valueCode": service.status})
    if service.scheduled and (service.start or service.end):
        extension.append({"url": ids.EXT_SERVICE_SCHEDULED, "valueDateTime": service.scheduled})
    extension.extend({"url": ids.EXT_PERTAINS_TO_GOAL, "valueReference": goal_ref(g)} for g in service.goals)
    resource: dict = {"resourceType": "ServiceRequest", "id": request_id,
                      "meta": profile("us-core-servicerequest")}
    contained, performer = provider_to_fhir(service.provider)
    if contained:
        resource["contained"] = contained
    resource["extension"] = extension
    resource["identifier"] = [{"system": ids.SID_SERVICE, "value": service.id}]
    resource["status"] = codes.SERVICE_REQUEST_STATUS.fhir(service.status)
    resource["intent"] = "order"
    resource["category"] = [{"coding": [codes.domain_coding(service.domain)]}]
    if service.priority:
        resource["priority"] = codes.SERVICE_PRIORITY.fhir(service.priority)
    resource["code"] = code_concept(service.code, service.description)
    resource["subject"] = subject
    if service.start or service.end:
        resource["occurrencePeriod"] = {k: v for k, v in (("start", service.start), ("end", service.end)) if v}
    elif service.scheduled:
        resource["occurrenceDateTime"] = service.scheduled
    if service.requested:
        resource["authoredOn"] = service.requested
    resource["requester"] = requester
    if performer:
        resource["performer"] = performer
    if service.needs:
        resource["reasonReference"] = [need_ref(n) for n in service.needs]
    if service.notes:
        resource["note"] = [{"text": n} for n in service.notes]
    return resource


def provider_to_fhir(provider: Optional[Provider]) -> tuple[list[dict], list[dict]]:
    if provider is None:
        return [], []
    contained, performer = [], []
    contact = telecom(provider.phone, provider.email)
    if provider.name:
        person: dict = {"resourceType": "Practitioner", "id": PROVIDER_PERSON, "name": [{"text": provider.name}]}
        if contact and not provider.organization:
            person["telecom"] = contact
        contained.append(person)
        performer.append({"reference": "#" + PROVIDER_PERSON, "display": provider.name})
    if provider.organization:
        org: dict = {"resourceType": "Organization", "id": PROVIDER_ORG, "name": provider.organization}
        if contact:
            org["telecom"] = contact
        contained.append(org)
        performer.append({"reference": "#" + PROVIDER_ORG, "display": provider.organization})
    return contained, performer


def from_fhir(resource: dict, local_id: str, task: Optional[dict], performers: list[dict],
              need_id: Callable[[dict], Optional[str]], goal_id: Callable[[dict], Optional[str]]) -> Service:
    """``performers`` are the resources ServiceRequest.performer resolves to (contained or in the input)."""
    from mappings import task as task_map

    kind = extension_value(resource, ids.EXT_SERVICE_KIND, "valueCode") or ("referral" if task else "service")
    own_status = extension_value(resource, ids.EXT_SERVICE_STATUS, "valueCode")
    if task is not None:
        status = task_map.status_from_fhir(task)
    elif own_status:
        status = own_status
    else:
        status = codes.SERVICE_REQUEST_STATUS.internal(resource.get("status"))
    period = resource.get("occurrencePeriod") or {}
    scheduled = resource.get("occurrenceDateTime") or extension_value(
        resource, ids.EXT_SERVICE_SCHEDULED, "valueDateTime")
    concept = resource.get("code")
    return Service(
        id=own_identifier(resource, ids.SID_SERVICE) or local_id,
        kind=kind,
        description=concept_text(concept) or "Service",
        domain=codes.domain_from_codings(codings(resource.get("category", ()))),
        code=first_code(concept),
        provider=provider_from_fhir(performers, resource.get("performer", ())),
        status=status,
        priority=codes.SERVICE_PRIORITY.internal(resource.get("priority")),
        requested=resource.get("authoredOn"),
        scheduled=scheduled,
        start=period.get("start"),
        end=period.get("end"),
        goals=[i for i in (goal_id(r) for r in extension_values(
            resource, ids.EXT_PERTAINS_TO_GOAL, "valueReference")) if i],
        needs=[i for i in (need_id(r) for r in resource.get("reasonReference", ())) if i],
        notes=[n["text"] for n in resource.get("note", ()) if n.get("text")],
    )


def provider_from_fhir(performers: list[dict], references: list[dict]) -> Optional[Provider]:
    person = next((p for p in performers if p.get("resourceType") == "Practitioner"), None)
    org = next((p for p in performers if p.get("resourceType") in ("Organization", "HealthcareService")), None)
    name = _person_name(person) if person else None
    org_name = org.get("name") if org else None
    if not performers:  # display-only performers
        displays = [r["display"] for r in references if r.get("display")]
        org_name = displays[0] if displays else None
    if not (name or org_name):
        return None
    contact = (org if org and org_name else person) or {}
    return Provider(name=name, organization=org_name,
                    phone=telecom_value(contact.get("telecom"), "phone"),
                    email=telecom_value(contact.get("telecom"), "email"))


def _person_name(person: dict) -> Optional[str]:
    for name in person.get("name", ()):
        words = name.get("text") or " ".join([*name.get("given", ()), name.get("family", "")]).strip()
        if words:
            return words
    return None
