"""Case manager and care team ⇄ US Core CareTeam, Practitioner; owning organization ⇄ Organization."""
from __future__ import annotations

from typing import Callable, Optional

from mappings import codes, ids
from mappings.common import own_identifier, profile, telecom, telecom_value
from service.domain import Organization, TeamMember

MEMBER_ROLE = {"system": ids.CS_CARE_TEAM_ROLE, "code": "member", "display": "Care team member"}


def organization_to_fhir(org: Organization, org_id: str) -> dict:
    resource: dict = {"resourceType": "Organization", "id": org_id, "meta": profile("us-core-organization"),
                      "identifier": [{"system": ids.SID_ORGANIZATION, "value": org.id}], "active": True}
    if org.name:
        resource["name"] = org.name
    return resource


def organization_from_fhir(resource: dict, local_id: str) -> Organization:
    return Organization(id=own_identifier(resource, ids.SID_ORGANIZATION) or local_id, name=resource.get("name"))


def practitioner_to_fhir(member: TeamMember, practitioner_id: str) -> dict:
    resource: dict = {"resourceType": "Practitioner", "id": practitioner_id,
                      "meta": profile("us-core-practitioner"),
                      "identifier": [{"system": ids.SID_TEAM_MEMBER, "value": member.id}],
                      "name": [{"text": member.name}]}
    if member.phone or member.email:
        resource["telecom"] = telecom(member.phone, member.email)
    return resource


def care_team_to_fhir(case_manager: Optional[TeamMember], members: list[TeamMember], team_id: str,
                      subject: dict, member_ref: Callable[[TeamMember], dict], org_ref: dict) -> dict:
    participants = []
    if case_manager:
        participants.append(participant_to_fhir(case_manager, codes.CARE_TEAM_ROLE_CASE_MANAGER, member_ref))
    participants.extend(participant_to_fhir(m, MEMBER_ROLE, member_ref) for m in members)
    team: dict = {"resourceType": "CareTeam", "id": team_id, "meta": profile("us-core-careteam"),
                  "status": "active", "subject": subject}
    if participants:
        team["participant"] = participants
    team["managingOrganization"] = [org_ref]
    return team


def participant_to_fhir(member: TeamMember, role: dict, member_ref: Callable[[TeamMember], dict]) -> dict:
    concept: dict = {"coding": [role]}
    if member.role:
        concept["text"] = member.role
    participant: dict = {"role": [concept], "member": member_ref(member)}
    if member.organization:
        participant["onBehalfOf"] = {"display": member.organization}
    return participant


def is_case_manager(participant: dict) -> bool:
    return any(c.get("system") == ids.CS_CARE_TEAM_ROLE and c.get("code") == "case-manager"
               for role in participant.get("role", ()) for c in role.get("coding", ()))


def member_from_fhir(participant: dict, resource: Optional[dict], local_id: str) -> Optional[TeamMember]:
    """A care team participant; ``resource`` is what participant.member resolves to, if anything."""
    resource = resource or {}
    name = _name(resource) or (participant.get("member") or {}).get("display")
    if not name:
        return None
    roles = participant.get("role") or [{}]
    role_text = roles[0].get("text")
    if role_text is None and not any(c.get("system") == ids.CS_CARE_TEAM_ROLE for c in roles[0].get("coding", ())):
        role_text = next((c.get("display") or c.get("code") for c in roles[0].get("coding", ())), None)
    telecoms = resource.get("telecom")
    return TeamMember(
        id=own_identifier(resource, ids.SID_TEAM_MEMBER) or local_id,
        name=name,
        role=role_text,
        organization=(participant.get("onBehalfOf") or {}).get("display"),
        phone=telecom_value(telecoms, "phone"),
        email=telecom_value(telecoms, "email"),
    )


def _name(resource: dict) -> Optional[str]:
    if resource.get("resourceType") in ("Organization", "CareTeam", "HealthcareService"):
        return resource.get("name")
    for name in resource.get("name", ()):
        words = name.get("text") or " ".join([*name.get("prefix", ()), *name.get("given", ()),
                                              name.get("family", "")]).strip()
        if words:
            return words
    return None
