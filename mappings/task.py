"""A referral's closed-loop status ⇄ Task (SDOH Clinical Care Task for referral management)."""
from __future__ import annotations

from mappings import codes
from service.domain import Service

PROFILE = "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/SDOHCC-TaskForReferralManagement"


def to_fhir(service: Service, task_id: str, focus: dict, subject: dict, requester: dict) -> dict:
    task: dict = {"resourceType": "Task", "id": task_id, "meta": {"profile": [PROFILE]},
                  "status": codes.TASK_STATUS.fhir(service.status)}
    if service.status == "scheduled":
        task["businessStatus"] = {"text": codes.TASK_BUSINESS_SCHEDULED}
    task["intent"] = "order"
    task["code"] = {"coding": [codes.TASK_FULFILL]}
    task["focus"] = focus
    task["for"] = subject
    if service.requested:
        task["authoredOn"] = service.requested
    task["requester"] = requester
    owner = service.provider and (service.provider.organization or service.provider.name)
    if owner:
        task["owner"] = {"display": owner}
    return task


def status_from_fhir(task: dict) -> str:
    status = codes.TASK_STATUS.internal(task.get("status"))
    business = (task.get("businessStatus") or {}).get("text")
    if status == "accepted" and business == codes.TASK_BUSINESS_SCHEDULED:
        return "scheduled"
    return status
