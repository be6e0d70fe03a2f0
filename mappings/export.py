"""Case record → FHIR resources and Bundles (collection to share, transaction to write idempotently)."""
from __future__ import annotations

from typing import Iterator

from mappings import careplan, careteam, codes, condition, goal, ids, patient, service_request, task
from mappings.common import fhir_id, reference
from mappings.residual import merge
from service.domain import Case, TeamMember

BUNDLE_TYPES = ("collection", "transaction")
DEFAULT_BASE_URL = "https://casebridge.dev/fhir"


class CaseIds:
    """Every resource id a case converts to, worked out once."""

    def __init__(self, case: Case):
        self.organization = fhir_id(case.organization, "Organization", case.organization.id)
        client_key = ("client", case.organization.id, case.client.id) if case.client.id else ("case", case.id)
        self.patient = fhir_id(case.client, "Patient", *client_key)
        self.plan = fhir_id(case, "CarePlan", case.id)
        team_extras = case.care_team_fhir or {}
        self.care_team = team_extras.get("id") or ids.resource_id("CareTeam", case.id)
        members = ([case.case_manager] if case.case_manager else []) + case.care_team
        self.members = {m.id: fhir_id(m, "Practitioner", case.id, m.id) for m in members}
        self.needs = {n.id: fhir_id(n, "Condition", case.id, n.id) for n in case.needs}
        self.goals = {g.id: fhir_id(g, "Goal", case.id, g.id) for g in case.goals}
        self.services = {s.id: fhir_id(s, "ServiceRequest", case.id, s.id) for s in case.services}
        self.tasks = {s.id: (s.task_fhir or {}).get("id") or ids.resource_id("Task", case.id, s.id)
                      for s in case.services if s.kind == "referral"}


def case_resources(case: Case, with_kept_fhir: bool = True, case_ids: CaseIds | None = None) -> list[dict]:
    """The resources of a case, each referenced one before the ones that reference it.

    ``with_kept_fhir=False`` gives what the record alone maps to, before what a partner sent beyond
    the record is put back (the import compares the two)."""
    return list(_resources(case, case_ids or CaseIds(case), with_kept_fhir))


def _resources(case: Case, case_ids: CaseIds, kept: bool) -> Iterator[dict]:
    restricted = set(case.sharing.restricted_domains)

    def out(resource: dict, extras, domain: str | None = None) -> dict:
        if domain in restricted:
            resource["meta"] = {**resource.get("meta", {}), "security": security_labels(domain)}
        if kept and extras and extras.get("patch"):
            return merge(resource, extras["patch"])
        return resource

    subject = reference("Patient", case_ids.patient)
    org_ref = reference("Organization", case_ids.organization)

    def member_ref(member: TeamMember) -> dict:
        return reference("Practitioner", case_ids.members[member.id])

    def need_ref(need_id: str) -> dict:
        return reference("Condition", case_ids.needs[need_id])

    def goal_ref(goal_id: str) -> dict:
        return reference("Goal", case_ids.goals[goal_id])

    requester = member_ref(case.case_manager) if case.case_manager else org_ref

    yield out(careteam.organization_to_fhir(case.organization, case_ids.organization), case.organization.fhir)
    for member in ([case.case_manager] if case.case_manager else []) + case.care_team:
        yield out(careteam.practitioner_to_fhir(member, case_ids.members[member.id]), member.fhir)
    yield out(patient.to_fhir(case.client, case_ids.patient), case.client.fhir)
    for need in case.needs:
        yield out(condition.to_fhir(need, case_ids.needs[need.id], subject), need.fhir, need.domain)
    for g in case.goals:
        yield out(goal.to_fhir(g, case_ids.goals[g.id], subject, need_ref), g.fhir, g.domain)
    for service in case.services:
        request_id = case_ids.services[service.id]
        yield out(service_request.to_fhir(service, request_id, subject, requester, need_ref, goal_ref), service.fhir,
                  service.domain)
        if service.kind == "referral":
            yield out(task.to_fhir(service, case_ids.tasks[service.id], reference("ServiceRequest", request_id),
                                   subject, requester), service.task_fhir, service.domain)
    yield out(careteam.care_team_to_fhir(case.case_manager, case.care_team, case_ids.care_team, subject,
                                         member_ref, org_ref), case.care_team_fhir)
    refs = careplan.PlanRefs(
        patient=subject, organization=org_ref, author=requester,
        care_team=reference("CareTeam", case_ids.care_team), need=need_ref, goal=goal_ref,
        service=lambda service_id: reference("ServiceRequest", case_ids.services[service_id]))
    yield out(careplan.to_fhir(case, case_ids.plan, refs), case.fhir)
    if kept:
        for other in (case.fhir or {}).get("others", ()):
            yield other["resource"]


def security_labels(domain: str) -> list[dict]:
    """Labels on a resource of a restricted domain: restricted confidentiality, no redisclosure, and
    for substance use the 42 CFR Part 2 policy."""
    labels = [dict(codes.CONFIDENTIALITY_RESTRICTED), dict(codes.NO_REDISCLOSURE)]
    if domain == "substance_use":
        labels.append(dict(codes.POLICY_42_CFR_PART_2))
    return labels


def case_bundle(case: Case, bundle_type: str = "collection", base_url: str = DEFAULT_BASE_URL) -> dict:
    """A Bundle of the case. A transaction PUTs every resource to its deterministic id, so sending it
    twice leaves the server as sending it once."""
    if bundle_type not in BUNDLE_TYPES:
        raise ValueError(f"bundle type must be one of {', '.join(BUNDLE_TYPES)}")
    kept_urls = {id(o["resource"]): o.get("fullUrl") for o in (case.fhir or {}).get("others", ())}
    entries = []
    for resource in case_resources(case):
        rtype, rid = resource["resourceType"], resource.get("id")
        kept_url = kept_urls.get(id(resource))
        if not (kept_url and kept_url.startswith("urn:")) and rid:
            kept_url = f"{base_url}/{rtype}/{rid}"
        entry: dict = {"fullUrl": kept_url,
                       "resource": resource}
        if bundle_type == "transaction":
            entry["request"] = ({"method": "PUT", "url": f"{rtype}/{rid}"} if rid
                                else {"method": "POST", "url": rtype})
        entries.append(entry)
    return {"resourceType": "Bundle", "id": ids.resource_id("Bundle", case.id, bundle_type),
            "type": bundle_type, "entry": entries}
