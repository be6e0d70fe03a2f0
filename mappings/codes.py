"""Every code translation between the case record and FHIR, as tables.

A ``CodeMap`` has the table from case-record code to FHIR code, the FHIR codes that have no exact twin
in the case record (``nearest``: each mapped to the closest internal code), and an explicit rule for a
FHIR code found in neither (``unmapped``). What a lossy translation drops is not lost: the partner's
original resource is kept beside the record (``mappings.residual``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from mappings import ids

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
SDOHCC = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"
CONDITION_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
GOAL_PRIORITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/goal-priority"
GOAL_ACHIEVEMENT = "http://terminology.hl7.org/CodeSystem/goal-achievement"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONTACT_ROLE = "http://terminology.hl7.org/CodeSystem/v2-0131"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
URN_LANGUAGE = "urn:ietf:bcp:47"


class UnmappedCode(ValueError):
    """A case-record code with no FHIR translation (the schemas keep these from reaching a mapping)."""


@dataclass(frozen=True)
class CodeMap:
    name: str
    to_fhir: Mapping[str, str]
    #: rule for a FHIR code in neither table: the internal code it becomes
    unmapped: Optional[str]
    nearest: Mapping[str, str] = field(default_factory=dict)
    system: Optional[str] = None
    displays: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        reverse: dict[str, str] = {}
        for internal, code in self.to_fhir.items():
            reverse.setdefault(code, internal)
        reverse.update(self.nearest)
        object.__setattr__(self, "_reverse", reverse)

    def fhir(self, internal: str) -> str:
        try:
            return self.to_fhir[internal]
        except KeyError:
            raise UnmappedCode(f"{self.name}: no FHIR code for {internal!r}") from None

    def internal(self, code: Optional[str]) -> Optional[str]:
        if code is None:
            return self.unmapped
        return self._reverse.get(code, self.unmapped)  # type: ignore[attr-defined]

    def coding(self, internal: str) -> dict:
        code = self.fhir(internal)
        coding = {"system": self.system, "code": code}
        if code in self.displays:
            coding["display"] = self.displays[code]
        return coding


CASE_STATUS = CodeMap(
    "CarePlan.status",
    {"intake": "draft", "active": "active", "on_hold": "on-hold", "closed": "completed",
     "cancelled": "revoked", "entered_in_error": "entered-in-error"},
    unmapped="active",  # 'unknown': the plan is in use somewhere; treat it as active
)

PROGRAM = CodeMap(
    "program",
    {p: p.replace("_", "-") for p in
     ("discharge", "care_coordination", "behavioral_health", "child_and_family", "geriatric",
      "vocational_rehabilitation", "forensic_legal", "other")},
    unmapped="other",
    system=ids.CS_PROGRAM,
    displays={"discharge": "Discharge planning", "care-coordination": "Care coordination",
              "behavioral-health": "Behavioral health", "child-and-family": "Child and family",
              "geriatric": "Geriatric", "vocational-rehabilitation": "Vocational rehabilitation",
              "forensic-legal": "Forensic / legal", "other": "Other"},
)

#: Domains with an SDOH Clinical Care category code use it; the rest use casebridge's own code system.
SDOH_DOMAIN = CodeMap(
    "SDOH category",
    {"housing": "housing-instability", "food": "food-insecurity",
     "transportation": "transportation-insecurity", "utilities": "utility-insecurity",
     "financial": "financial-insecurity", "employment": "employment-status",
     "education": "educational-attainment", "interpersonal_safety": "intimate-partner-violence"},
    nearest={"homelessness": "housing", "inadequate-housing": "housing", "material-hardship": "financial",
             "medical-cost-burden": "financial", "health-insurance-coverage-status": "financial",
             "elder-abuse": "interpersonal_safety", "incarceration-status": "legal",
             "stress": "behavioral_health"},
    unmapped=None,  # 'sdoh-category-unspecified', 'veteran-status', ...: look for another coding
    system=SDOHCC,
    displays={"housing-instability": "Housing Instability", "food-insecurity": "Food Insecurity",
              "transportation-insecurity": "Transportation Insecurity",
              "utility-insecurity": "Utility Insecurity", "financial-insecurity": "Financial Insecurity",
              "employment-status": "Employment Status", "educational-attainment": "Educational Attainment",
              "intimate-partner-violence": "Intimate Partner Violence"},
)

OWN_DOMAIN = CodeMap(
    "domain",
    {d: d.replace("_", "-") for d in
     ("housing", "food", "transportation", "utilities", "financial", "employment", "education", "legal",
      "interpersonal_safety", "behavioral_health", "substance_use", "medical", "caregiver_support",
      "other")},
    unmapped=None,
    system=ids.CS_DOMAIN,
    displays={"legal": "Legal", "behavioral-health": "Behavioral health", "substance-use": "Substance use",
              "medical": "Medical", "caregiver-support": "Caregiver support", "other": "Other"},
)

#: Rule for a resource whose categories name no domain at all.
UNMAPPED_DOMAIN = "other"

SEVERITY = CodeMap(
    "Condition.severity",
    {"mild": "255604002", "moderate": "6736007", "severe": "24484000"},
    unmapped=None,  # another severity code: keep the partner's coding, no internal severity
    system=SNOMED,
    displays={"255604002": "Mild", "6736007": "Moderate", "24484000": "Severe"},
)

NEED_STATUS = CodeMap(
    "Condition.clinicalStatus",
    {"active": "active", "resolved": "resolved"},
    nearest={"recurrence": "active", "relapse": "active", "inactive": "resolved", "remission": "resolved"},
    unmapped="active",
    system=CONDITION_CLINICAL,
    displays={"active": "Active", "resolved": "Resolved"},
)

#: Goal status → Goal.lifecycleStatus; 'achieved' and 'not achieved' also set achievementStatus.
GOAL_LIFECYCLE = CodeMap(
    "Goal.lifecycleStatus",
    {"proposed": "proposed", "active": "active", "on_hold": "on-hold", "achieved": "completed",
     "not_achieved": "completed", "cancelled": "cancelled"},
    nearest={"planned": "proposed", "accepted": "active", "rejected": "cancelled",
             "entered-in-error": "cancelled"},
    unmapped="proposed",
)
GOAL_ACHIEVEMENT_STATUS = CodeMap(
    "Goal.achievementStatus",
    {"achieved": "achieved", "not_achieved": "not-achieved"},
    nearest={"sustaining": "achieved", "not-attainable": "not_achieved", "no-progress": "not_achieved"},
    unmapped=None,
    system=GOAL_ACHIEVEMENT,
    displays={"achieved": "Achieved", "not-achieved": "Not Achieved"},
)

GOAL_PRIORITY = CodeMap(
    "Goal.priority",
    {"high": "high-priority", "medium": "medium-priority", "low": "low-priority"},
    unmapped=None,
    system=GOAL_PRIORITY_SYSTEM,
    displays={"high-priority": "High Priority", "medium-priority": "Medium Priority",
              "low-priority": "Low Priority"},
)

SERVICE_REQUEST_STATUS = CodeMap(
    "ServiceRequest.status",
    {"draft": "draft", "requested": "active", "accepted": "active", "scheduled": "active",
     "in_progress": "active", "declined": "revoked", "cancelled": "revoked", "completed": "completed"},
    nearest={"active": "requested", "on-hold": "requested", "revoked": "cancelled",
             "entered-in-error": "cancelled"},
    unmapped="requested",
)

#: The closed-loop referral status (SDOH Clinical Care Task state machine).
TASK_STATUS = CodeMap(
    "Task.status",
    {"draft": "draft", "requested": "requested", "accepted": "accepted", "declined": "rejected",
     "scheduled": "accepted", "in_progress": "in-progress", "completed": "completed",
     "cancelled": "cancelled"},
    nearest={"received": "requested", "ready": "accepted", "on-hold": "accepted", "failed": "cancelled",
             "entered-in-error": "cancelled"},
    unmapped="requested",
)
#: Task.businessStatus text that tells 'scheduled' apart from 'accepted'.
TASK_BUSINESS_SCHEDULED = "scheduled"

SERVICE_PRIORITY = CodeMap(
    "ServiceRequest.priority",
    {"routine": "routine", "urgent": "urgent", "asap": "asap", "stat": "stat"},
    unmapped=None,
)

IDENTIFIER_KIND = CodeMap(
    "Identifier.type",
    {"mrn": "MR", "member_id": "MB"},
    nearest={"SN": "member_id", "MA": "member_id", "MC": "member_id"},
    unmapped="other",
    system=IDENTIFIER_TYPE,
    displays={"MR": "Medical record number", "MB": "Member Number"},
)

GENDER = CodeMap(
    "Patient.gender",
    {g: g for g in ("male", "female", "other", "unknown")},
    unmapped="unknown",
)

CARE_TEAM_ROLE_CASE_MANAGER = {"system": ids.CS_CARE_TEAM_ROLE, "code": "case-manager",
                               "display": "Case manager"}
CAREPLAN_ASSESS_PLAN = {"system": CAREPLAN_CATEGORY, "code": "assess-plan",
                        "display": "Assessment and Plan of Treatment"}
CONDITION_HEALTH_CONCERN = {"system": CONDITION_CATEGORY, "code": "health-concern",
                            "display": "Health Concern"}
US_CORE_SDOH = {"system": US_CORE_CATEGORY, "code": "sdoh", "display": "SDOH"}
EMERGENCY_CONTACT = {"system": CONTACT_ROLE, "code": "C", "display": "Emergency Contact"}
TASK_FULFILL = {"system": TASK_CODE, "code": "fulfill", "display": "Fulfill the focal request"}


def domain_coding(domain: str) -> dict:
    """The coding a domain travels as: the SDOH category code when there is one, else casebridge's."""
    if domain in SDOH_DOMAIN.to_fhir:
        return SDOH_DOMAIN.coding(domain)
    return OWN_DOMAIN.coding(domain)


def domain_from_codings(codings: list[dict]) -> str:
    """casebridge's own domain coding wins; then an SDOH category; then the unmapped rule."""
    found: Optional[str] = None
    for coding in codings:
        system, code = coding.get("system"), coding.get("code")
        if system == ids.CS_DOMAIN:
            own = OWN_DOMAIN.internal(code)
            if own:
                return own
        elif system == SDOHCC and found is None:
            found = SDOH_DOMAIN.internal(code)
    return found or UNMAPPED_DOMAIN

CONFIDENTIALITY_RESTRICTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R",
                              "display": "restricted"}
NO_REDISCLOSURE = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "NORDSCLCD",
                   "display": "no redisclosure without consent directive"}
POLICY_42_CFR_PART_2 = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2",
                        "display": "42 CFR Part2"}
