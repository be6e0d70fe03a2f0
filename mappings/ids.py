"""Deterministic ids, identifier systems and the extension URLs casebridge defines.

The same case record always converts to the same resource ids and references: ids are UUIDv5 names
derived from the case's own ids, never random and never sequence numbers.
"""
from __future__ import annotations

import uuid

BASE = "https://casebridge.dev/fhir"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, BASE)

# Identifier systems for the case record's own ids.
SID_CASE = f"{BASE}/sid/case"
SID_CLIENT = f"{BASE}/sid/client"
SID_ORGANIZATION = f"{BASE}/sid/organization"
SID_NEED = f"{BASE}/sid/need"
SID_GOAL = f"{BASE}/sid/goal"
SID_SERVICE = f"{BASE}/sid/service"
SID_TEAM_MEMBER = f"{BASE}/sid/team-member"

# Code systems for case-record concepts that have no standard code.
CS_PROGRAM = f"{BASE}/CodeSystem/program"
CS_DOMAIN = f"{BASE}/CodeSystem/domain"
CS_CARE_TEAM_ROLE = f"{BASE}/CodeSystem/care-team-role"


def extension_url(name: str) -> str:
    return f"{BASE}/StructureDefinition/{name}"


EXT_CASE_STATUS = extension_url("case-status")
EXT_CLOSURE_REASON = extension_url("closure-reason")
EXT_RISK = extension_url("risk")
EXT_OWNING_ORGANIZATION = extension_url("owning-organization")
EXT_RESTRICTED_DOMAIN = extension_url("restricted-domain")
EXT_NOTE_ID = extension_url("note-id")
EXT_NOTE_CONFIDENTIAL = extension_url("note-confidential")
EXT_PREFERRED_NAME = extension_url("preferred-name")
EXT_SERVICE_KIND = extension_url("service-kind")
EXT_SERVICE_STATUS = extension_url("service-status")
EXT_SERVICE_SCHEDULED = extension_url("service-scheduled")
EXT_SERVICE_DOMAIN = extension_url("domain")
EXT_GOAL_STATUS = extension_url("goal-status")
EXT_NEED_SEVERITY_TEXT = extension_url("need-severity")
EXT_PROGRESS = extension_url("goal-progress")
EXT_IDENTIFIER_KIND = extension_url("identifier-kind")
EXT_NEED_DESCRIPTION = extension_url("need-description")

# Standard extensions.
EXT_PERTAINS_TO_GOAL = "http://hl7.org/fhir/StructureDefinition/resource-pertainsToGoal"
EXT_INTERPRETER_REQUIRED = "http://hl7.org/fhir/StructureDefinition/patient-interpreterRequired"


def resource_id(resource_type: str, *parts: str) -> str:
    """The id of the resource that ``parts`` (case id, entity id, ...) convert to."""
    return str(uuid.uuid5(_NAMESPACE, "/".join((resource_type, *parts))))
