"""A resource read from a partner, applied to our case records: the status of a Task the partner keeps
for a referral we sent (the closed loop), a new referral the partner sent (an intake case, once), and
changes to plans and goals we shared. Our own writes read back are recognised and change nothing.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

from sqlalchemy import select

from mappings import careplan as plan_map, fhir_input, goal as goal_map, task as task_map
from mappings.export import CaseIds, case_resources
from mappings.importer import import_graph
from service import schemas
from service.domain import Organization
from service.store import Store, cases, fhir_resources
from service.sync_ledger import current_case, ledger_by_remote, save_ledger
from service.sync_merge import our_write
from service.sync_outgoing import SYNC_SYSTEM


def apply_remote(store: Store, partner: Any, resource: dict, endpoint: Any) -> str:
    """One resource read from a partner, applied to the case records: 'updated', 'created',
    'unchanged' or 'ignored'."""
    rtype, remote_id = resource.get("resourceType"), resource.get("id")
    row = ledger_by_remote(store, partner.id, rtype, remote_id)
    if row is None:
        ours = next((i.get("value") for i in resource.get("identifier", ()) if i.get("system") == SYNC_SYSTEM), None)
        # ours, created by a write whose answer was lost: take it into the ledger, nothing to apply
        # (another casebridge's resource carries the same identifier system, but no case of ours)
        case_id = _case_of_local(store, rtype, ours) if ours else None
        if case_id:
            save_ledger(store, partner.id, case_id, rtype, ours, remote_id,
                        (resource.get("meta") or {}).get("versionId"), None, None, ours=True)
            return "unchanged"
    if row is None:
        if rtype == "ServiceRequest":
            return _inbound_referral(store, partner, resource, endpoint)
        if rtype == "Task":
            return _task_for_our_referral(store, partner, resource)
        return "ignored"
    return _apply_known(store, partner, row, resource)


def _apply_known(store: Store, partner: Any, row: Any, resource: dict) -> str:
    if our_write(row, resource) is not None:
        # one of our own writes read back (the case may have moved on since): nothing the partner changed
        return "unchanged"
    stored = current_case(store, row.case_id)
    case = schemas.load_case(stored.data)
    rtype = resource["resourceType"]
    changed = False
    if rtype == "Task":
        service_id = next((sid for sid, tid in CaseIds(case).tasks.items() if tid == row.local_id), None)
        service = case.service(service_id) if service_id else None
        status = task_map.status_from_fhir(resource)
        if service is not None and service.status != status:
            service.status = status
            changed = True
    elif rtype == "Goal":
        goal_id = next((gid for gid, fid in CaseIds(case).goals.items() if fid == row.local_id), None)
        goal = case.goal(goal_id) if goal_id else None
        if goal is not None:
            theirs = goal_map.from_fhir(resource, goal.id, lambda ref: None)
            for attr in ("status", "description", "target_date", "start", "achieved_date", "priority"):
                value = getattr(theirs, attr)
                if value is not None and value != getattr(goal, attr):
                    setattr(goal, attr, value)
                    changed = True
    elif rtype == "CarePlan":
        fields = plan_map.fields_from_fhir(resource)
        for attr in ("status", "opened", "closed", "title"):
            value = fields.get(attr)
            if value is not None and value != getattr(case, attr):
                setattr(case, attr, value)
                changed = True
    if not changed:
        return "unchanged"
    store.update_case(stored.organization_id, stored.id, stored.version, schemas.dump_case(case),
                      actor=f"partner:{partner.id}")
    return "updated"


def _inbound_referral(store: Store, partner: Any, request: dict, endpoint: Any) -> str:
    """A referral the partner sent: an intake case for the receiving organization (once)."""
    if partner.kind != "ehr" or (request.get("status") not in (None, "active", "draft")):
        return "ignored"
    resources = [request]
    subject = (request.get("subject") or {}).get("reference", "")
    if subject.startswith("Patient/"):
        resources.append(endpoint.read("Patient", subject.split("/", 1)[1]).resource)
    for task in endpoint.search("Task", {"focus": f"ServiceRequest/{request['id']}"}):
        resources.append(task)
    organization = partner.receiving_organization or (partner.organizations or ["unassigned"])[0]
    result = import_graph(fhir_input.ResourceGraph(fhir_input.parse(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]})),
        Organization(id=organization))
    if not result.cases:
        return "ignored"
    case = result.cases[0]
    case.status = "intake"
    claim = f"partner:{partner.id}:ServiceRequest/{request['id']}"
    if store.claimed_case(organization, claim) is None and _case_exists(store, case.id):
        # another referral for the same client made a case with this id already: one case per referral
        case.id = f"{case.id[:40]}-{hashlib.sha256(claim.encode()).hexdigest()[:12]}"
    stored = store.add_case(organization, schemas.dump_case(case), actor=f"partner:{partner.id}", claim=claim)
    for resource in case_resources(case):
        if resource["resourceType"] in ("ServiceRequest", "Patient", "Task"):
            remote = next((r for r in resources if r["resourceType"] == resource["resourceType"]
                           and r.get("id") == resource["id"]), None)
            if remote is not None:
                save_ledger(store, partner.id, stored.id, resource["resourceType"], resource["id"], remote["id"],
                            (remote.get("meta") or {}).get("versionId"), None, None)
    return "created" if stored.version == 1 else "unchanged"


def _task_for_our_referral(store: Store, partner: Any, task: dict) -> str:
    """A Task the partner made for a referral we sent: it carries the referral's status from now on."""
    focus = (task.get("focus") or {}).get("reference", "")
    if not focus.startswith("ServiceRequest/"):
        return "ignored"
    request_row = ledger_by_remote(store, partner.id, "ServiceRequest", focus.split("/", 1)[1])
    if request_row is None:
        return "ignored"
    case = schemas.load_case(current_case(store, request_row.case_id).data)
    service_id = next((sid for sid, rid in CaseIds(case).services.items() if rid == request_row.local_id), None)
    task_id = CaseIds(case).tasks.get(service_id) if service_id else None
    if task_id is None:
        return "ignored"
    save_ledger(store, partner.id, case.id, "Task", task_id, task["id"], (task.get("meta") or {}).get("versionId"),
                None, None)
    return _apply_known(store, partner, ledger_by_remote(store, partner.id, "Task", task["id"]), task)


def _case_exists(store: Store, case_id: str) -> bool:
    with store.reader.connect() as conn:
        return conn.execute(select(cases.c.id).where(cases.c.id == case_id)).first() is not None


def _case_of_local(store: Store, rtype: str, local_id: str) -> Optional[str]:
    with store.reader.connect() as conn:
        return conn.execute(select(fhir_resources.c.case_id).where(
            fhir_resources.c.resource_type == rtype, fhir_resources.c.resource_id == local_id)).scalar()
