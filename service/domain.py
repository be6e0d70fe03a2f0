"""The case record: what a case manager works with, in a case manager's words.

Standard library only. Dates are kept as the ISO 8601 strings they arrived as (``2024``, ``2024-05``,
``2024-05-17``; times with their offset) so that a partner's precision is never widened or narrowed;
the schemas in ``service.schemas`` check that they are real dates before a record is built.

Every entity that can come from FHIR carries ``fhir``: what the partner's resource had that the record
does not model (opaque to the domain, owned by ``mappings``), so a record imported from FHIR goes back
out with nothing lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

PROGRAMS = (
    "discharge", "care_coordination", "behavioral_health", "child_and_family", "geriatric",
    "vocational_rehabilitation", "forensic_legal", "other",
)
CASE_STATUSES = ("intake", "active", "on_hold", "closed", "cancelled", "entered_in_error")
RISK_LEVELS = ("low", "moderate", "high")
IDENTIFIER_KINDS = ("mrn", "member_id", "other")
GENDERS = ("male", "female", "other", "unknown")
DOMAINS = (
    "housing", "food", "transportation", "utilities", "financial", "employment", "education", "legal",
    "interpersonal_safety", "behavioral_health", "substance_use", "medical", "caregiver_support", "other",
)
SEVERITIES = ("mild", "moderate", "severe")
NEED_STATUSES = ("active", "resolved")
GOAL_PRIORITIES = ("high", "medium", "low")
GOAL_STATUSES = ("proposed", "active", "on_hold", "achieved", "not_achieved", "cancelled")
SERVICE_KINDS = ("referral", "service", "appointment", "equipment")
SERVICE_STATUSES = (
    "draft", "requested", "accepted", "declined", "scheduled", "in_progress", "completed", "cancelled",
)
SERVICE_PRIORITIES = ("routine", "urgent", "asap", "stat")

#: Social Security numbers are never stored (identifier system of the US SSA).
SSN_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/us-ssn", "urn:oid:2.16.840.1.113883.4.1"})

Extras = Optional[dict[str, Any]]


@dataclass(slots=True)
class Code:
    """A code from a standard code system (SNOMED CT, LOINC, ICD-10-CM, ...)."""
    system: str
    code: str
    display: Optional[str] = None


@dataclass(slots=True)
class Identifier:
    kind: str  # one of IDENTIFIER_KINDS
    system: str
    value: str


@dataclass(slots=True)
class PersonName:
    family: Optional[str] = None
    given: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    suffix: list[str] = field(default_factory=list)
    text: Optional[str] = None


@dataclass(slots=True)
class Address:
    lines: list[str] = field(default_factory=list)
    city: Optional[str] = None
    state: Optional[str] = None
    postal_code: Optional[str] = None
    country: Optional[str] = None


@dataclass(slots=True)
class Contact:
    """Someone to call: an emergency contact."""
    name: str
    relationship: Optional[str] = None
    phone: Optional[str] = None
    email: Optional[str] = None


@dataclass(slots=True)
class Client:
    id: Optional[str] = None
    identifiers: list[Identifier] = field(default_factory=list)
    names: list[PersonName] = field(default_factory=list)
    preferred_name: Optional[str] = None
    birth_date: Optional[str] = None
    gender: Optional[str] = None
    phone: Optional[str] = None
    email: Optional[str] = None
    address: Optional[Address] = None
    language: Optional[str] = None  # BCP 47, e.g. "es" or "en-US"
    interpreter_needed: Optional[bool] = None
    emergency_contact: Optional[Contact] = None
    fhir: Extras = None


@dataclass(slots=True)
class Organization:
    id: str
    name: Optional[str] = None
    fhir: Extras = None


@dataclass(slots=True)
class TeamMember:
    """The case manager or a member of the care team."""
    id: str
    name: str
    role: Optional[str] = None
    organization: Optional[str] = None
    phone: Optional[str] = None
    email: Optional[str] = None
    fhir: Extras = None


@dataclass(slots=True)
class Risk:
    level: str  # one of RISK_LEVELS
    assessed: Optional[str] = None
    score: Optional[float] = None


@dataclass(slots=True)
class Need:
    """A need found in assessment (a health concern)."""
    id: str
    domain: str
    description: str
    severity: Optional[str] = None
    status: str = "active"
    identified: Optional[str] = None
    code: Optional[Code] = None
    fhir: Extras = None


@dataclass(slots=True)
class Target:
    """What 'achieved' looks like, in a form someone can measure."""
    measure: str
    value: Optional[str] = None


@dataclass(slots=True)
class ProgressEntry:
    date: str
    note: str
    author: Optional[str] = None


@dataclass(slots=True)
class Goal:
    id: str
    description: str
    domain: str = "other"
    priority: Optional[str] = None
    status: str = "proposed"
    start: Optional[str] = None
    target_date: Optional[str] = None
    achieved_date: Optional[str] = None
    target: Optional[Target] = None
    progress: list[ProgressEntry] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # need ids
    fhir: Extras = None


@dataclass(slots=True)
class Provider:
    name: Optional[str] = None
    organization: Optional[str] = None
    phone: Optional[str] = None
    email: Optional[str] = None


@dataclass(slots=True)
class Service:
    """A service, referral, appointment or piece of equipment arranged for the client."""
    id: str
    kind: str
    description: str
    domain: str = "other"
    code: Optional[Code] = None
    provider: Optional[Provider] = None
    status: str = "draft"
    priority: Optional[str] = None
    requested: Optional[str] = None
    scheduled: Optional[str] = None
    start: Optional[str] = None
    end: Optional[str] = None
    goals: list[str] = field(default_factory=list)  # goal ids
    needs: list[str] = field(default_factory=list)  # need ids
    notes: list[str] = field(default_factory=list)
    fhir: Extras = None
    #: what the partner's referral Task had that the record does not model
    task_fhir: Extras = None


@dataclass(slots=True)
class Note:
    id: str
    time: str
    text: str
    author: Optional[str] = None
    confidential: bool = False


@dataclass(slots=True)
class Sharing:
    """Domains whose information must not leave the owning organization (e.g. 42 CFR Part 2)."""
    restricted_domains: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Case:
    id: str
    program: str
    status: str
    organization: Organization
    client: Client
    opened: Optional[str] = None
    closed: Optional[str] = None
    closure_reason: Optional[str] = None
    title: Optional[str] = None
    risk: Optional[Risk] = None
    case_manager: Optional[TeamMember] = None
    care_team: list[TeamMember] = field(default_factory=list)
    needs: list[Need] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    sharing: Sharing = field(default_factory=Sharing)
    fhir: Extras = None
    #: what the partner's CareTeam had that the record does not model
    care_team_fhir: Extras = None

    def need(self, need_id: str) -> Optional[Need]:
        return next((n for n in self.needs if n.id == need_id), None)

    def goal(self, goal_id: str) -> Optional[Goal]:
        return next((g for g in self.goals if g.id == goal_id), None)

    def service(self, service_id: str) -> Optional[Service]:
        return next((s for s in self.services if s.id == service_id), None)


def rule_violations(case: Case) -> list[tuple[str, str]]:
    """The case's internal rules, as (field path, message) pairs; empty when the case holds together."""
    problems: list[tuple[str, str]] = []
    for name, items in (("needs", case.needs), ("goals", case.goals), ("services", case.services),
                        ("notes", case.notes), ("care_team", case.care_team)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.id in seen:
                problems.append((f"{name}.{i}.id", f"duplicate id {item.id!r}"))
            seen.add(item.id)
    need_ids = {n.id for n in case.needs}
    goal_ids = {g.id for g in case.goals}
    for i, goal in enumerate(case.goals):
        for j, ref in enumerate(goal.addresses):
            if ref not in need_ids:
                problems.append((f"goals.{i}.addresses.{j}", f"no need with id {ref!r}"))
        if goal.achieved_date and goal.status not in ("achieved", "not_achieved"):
            problems.append((f"goals.{i}.achieved_date", "only an achieved or not achieved goal has an achieved date"))
    for i, service in enumerate(case.services):
        for j, ref in enumerate(service.goals):
            if ref not in goal_ids:
                problems.append((f"services.{i}.goals.{j}", f"no goal with id {ref!r}"))
        for j, ref in enumerate(service.needs):
            if ref not in need_ids:
                problems.append((f"services.{i}.needs.{j}", f"no need with id {ref!r}"))
    for i, ident in enumerate(case.client.identifiers):
        if ident.system in SSN_SYSTEMS:
            problems.append((f"client.identifiers.{i}.system", "Social Security numbers are never stored"))
    if case.closure_reason and case.status not in ("closed", "cancelled"):
        problems.append(("closure_reason", "only a closed or cancelled case has a reason for closure"))
    if case.closed and case.opened and _date_key(case.closed) < _date_key(case.opened):
        problems.append(("closed", "a case cannot close before it opened"))
    return problems


def _date_key(value: str) -> str:
    return value[:10]


def shareable(case: Case) -> Case:
    """The case as it may leave the owning organization: without the needs, goals and services of a
    restricted domain (and the links to them) and without confidential notes."""
    from dataclasses import replace

    restricted = set(case.sharing.restricted_domains)
    needs = [n for n in case.needs if n.domain not in restricted]
    goals = [g for g in case.goals if g.domain not in restricted]
    need_ids, goal_ids = {n.id for n in needs}, {g.id for g in goals}
    return replace(
        case,
        needs=needs,
        goals=[replace(g, addresses=[a for a in g.addresses if a in need_ids]) for g in goals],
        services=[replace(s, goals=[g for g in s.goals if g in goal_ids], needs=[n for n in s.needs if n in need_ids])
                  for s in case.services if s.domain not in restricted],
        notes=[n for n in case.notes if not n.confidential],
    )
