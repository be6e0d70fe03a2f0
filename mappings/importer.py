"""Real-world FHIR → case records.

One case record per group of resources (``fhir_input.group_cases``). Each resource a record entity
came from is mapped in, then the record is mapped back out and compared with what the partner sent:
the difference is kept beside the entity (``mappings.residual``), so the record goes back out with
every element the partner's resource had. References that point at resources which became part of
the record are made relative (``Type/id``), and mapped resources that were ``contained`` are lifted
out into resources of their own; everything else is kept as sent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mappings import careplan, careteam, condition, goal, ids, patient, service_request
from mappings.export import CaseIds, case_resources
from mappings.fhir_input import CaseGroup, Node, ResourceGraph, group_cases, unmapped
from mappings.residual import diff
from service.domain import Case, Client, Organization, Service, Sharing, TeamMember
from service.errors import Problem

UNASSIGNED_ORGANIZATION = "unassigned"
_UNSAFE = re.compile(r"[^A-Za-z0-9\-.]")


@dataclass
class ImportResult:
    cases: list[Case] = field(default_factory=list)
    #: resources that are not part of any case record, with why (never dropped silently)
    unmapped: list[dict] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def import_graph(graph: ResourceGraph, organization: Optional[Organization] = None) -> ImportResult:
    result = ImportResult()
    groups = group_cases(graph)
    for group in groups:
        result.cases.append(_CaseBuilder(graph, group, organization, result.warnings).build())
    for node in unmapped(graph, groups):
        result.unmapped.append({"resourceType": node.resource_type, "id": node.id, "path": node.path,
                                "reason": "resource type not part of a case record; kept unchanged",
                                "resource": node.resource})
    return result


def safe_id(raw: Optional[str], fallback: str) -> str:
    value = _UNSAFE.sub("-", raw or "")[-64:].strip("-.") or fallback
    return value[:64]


class _CaseBuilder:
    """Builds one case record from one group, remembering which node became which entity."""

    def __init__(self, graph: ResourceGraph, group: CaseGroup, organization: Optional[Organization],
                 warnings: list[Problem]):
        self.graph, self.group, self.warnings = graph, group, warnings
        self.forced_organization = organization
        self.local: dict[str, str] = {}          # node key → entity id
        self.entity_of: dict[str, Any] = {}      # node key → entity whose ``fhir`` holds its residual
        self.entity_attr: dict[str, str] = {}    # node key → which extras attribute of that entity
        self.sources: dict[str, Node] = {}

    # -- ids --------------------------------------------------------------------------------
    def _claim(self, node: Node, entity: Any, attr: str = "fhir") -> None:
        self.entity_of[node.key] = entity
        self.entity_attr[node.key] = attr
        self.sources[node.key] = node

    def _local_id(self, node: Node, prefix: str, index: int, taken: set[str]) -> str:
        raw = node.id if node.container is None else f"{node.container.id or 'contained'}-{node.id}"
        if raw is None and node.full_url:
            raw = node.full_url.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
        local = safe_id(raw, f"{prefix}-{index + 1}")
        while local in taken:
            local = safe_id(f"{local}-{index + 1}", f"{prefix}-{index + 1}")
        taken.add(local)
        self.local[node.key] = local
        return local

    def _resolver(self, node: Node) -> Callable[[dict], Optional[str]]:
        def resolve(ref: dict) -> Optional[str]:
            target = self.graph.resolve(ref.get("reference") or "", node) if ref.get("reference") else None
            return self.local.get(target.key) if target is not None else None
        return resolve

    # -- the record -------------------------------------------------------------------------
    def build(self) -> Case:
        group = self.group
        plan = group.careplan.resource if group.careplan else {}
        client = patient.from_fhir(group.patient.resource) if group.patient else Client()
        if group.patient:
            self._claim(group.patient, client)

        needs = []
        taken: set[str] = set()
        for i, node in enumerate(group.conditions):
            self._local_id(node, "need", i, taken)
        for node in group.conditions:
            need = condition.from_fhir(node.resource, self.local[node.key])
            self.local[node.key] = need.id
            self._claim(node, need)
            needs.append(need)

        goals = []
        taken = set()
        for i, node in enumerate(group.goals):
            self._local_id(node, "goal", i, taken)
        for node in group.goals:
            g = goal.from_fhir(node.resource, self.local[node.key], self._resolver(node))
            self.local[node.key] = g.id
            self._claim(node, g)
            goals.append(g)

        services = self._services(plan)
        case_manager, members = self._team(plan)
        organization = self._organization(plan)
        case = Case(
            id=self._case_id(),
            organization=organization,
            client=client,
            case_manager=case_manager,
            care_team=members,
            needs=needs,
            goals=goals,
            services=services,
            notes=careplan.notes_from_fhir(plan),
            sharing=Sharing(restricted_domains=careplan.restricted_domains(plan)),
            **({**careplan.fields_from_fhir(plan)} if plan else {"status": "intake", "program": "other"}),
        )
        if group.careplan:
            self._claim(group.careplan, case)
        self._keep_residuals(case)
        return case

    def _case_id(self) -> str:
        group = self.group
        if group.careplan:
            own = next((i.get("value") for i in group.careplan.resource.get("identifier", ())
                        if i.get("system") == ids.SID_CASE and i.get("value")), None)
            return own or safe_id(group.careplan.id, "case")
        anchor = group.patient or next(iter(group.service_requests + group.goals + group.conditions), None)
        basis = anchor.id if anchor and anchor.id else (anchor.key if anchor else "case")
        return safe_id(f"{anchor.resource_type.lower() if anchor else 'case'}-{basis}", "case")

    def _services(self, plan: dict) -> list[Service]:
        group = self.group
        tasks_by_focus: dict[str, Node] = {}
        for node in group.tasks:
            focus = node.resource.get("focus", {}).get("reference")
            target = self.graph.resolve(focus, node) if focus else None
            if target is not None and target.resource_type == "ServiceRequest" and target.key not in tasks_by_focus:
                tasks_by_focus[target.key] = node
        activity_goals = {}
        if group.careplan:
            for target, refs in careplan.activity_goals(plan).items():
                node = self.graph.resolve(target, group.careplan)
                if node is not None:
                    activity_goals[node.key] = refs
        services, taken = [], set()
        for i, node in enumerate(group.service_requests):
            self._local_id(node, "service", i, taken)
        for node in group.service_requests:
            task_node = tasks_by_focus.get(node.key)
            performers = [p.resource for p in (self.graph.resolve(r.get("reference") or "", node)
                                               for r in node.resource.get("performer", ()) if r.get("reference"))
                          if p is not None]
            service = service_request.from_fhir(node.resource, self.local[node.key],
                                                task_node.resource if task_node else None, performers,
                                                self._resolver(node), self._resolver(node))
            if not service.goals and node.key in activity_goals and group.careplan:
                resolve = self._resolver(group.careplan)
                service.goals = [g for g in (resolve(r) for r in activity_goals[node.key]) if g]
            if task_node is not None and service.kind != "referral":
                service.kind = "referral"
            self.local[node.key] = service.id
            self._claim(node, service)
            if task_node is not None:
                self._claim(task_node, service, "task_fhir")
            services.append(service)
        for node in group.tasks:
            if node.key not in self.entity_of:
                self.warnings.append(Problem(node.path or node.key,
                                             "Task whose focus is not a ServiceRequest in the input; kept unchanged"))
        return services

    def _team(self, plan: dict) -> tuple[Optional[TeamMember], list[TeamMember]]:
        group = self.group
        case_manager, members, taken = None, [], set()
        team_node = group.care_teams[0] if group.care_teams else None
        if team_node is not None:
            for i, participant in enumerate(team_node.resource.get("participant", ())):
                ref = (participant.get("member") or {}).get("reference")
                target = self.graph.resolve(ref, team_node) if ref else None
                local = self._local_id(target, "member", i, taken) if target is not None else safe_id(None, f"member-{i + 1}")
                member = careteam.member_from_fhir(participant, target.resource if target else None, local)
                if member is None:
                    continue
                if target is not None and target.resource_type == "Practitioner" and target.key not in self.entity_of:
                    self._claim(target, member)
                if case_manager is None and careteam.is_case_manager(participant):
                    case_manager = member
                else:
                    members.append(member)
        if case_manager is None and group.careplan is not None:
            ref = (plan.get("author") or {}).get("reference")
            target = self.graph.resolve(ref, group.careplan) if ref else None
            if target is not None and target.resource_type == "Practitioner" and target.key not in self.entity_of:
                local = self._local_id(target, "member", len(members), taken)
                case_manager = careteam.member_from_fhir({}, target.resource, local)
                if case_manager is not None:
                    self._claim(target, case_manager)
        return case_manager, members

    def _organization(self, plan: dict) -> Organization:
        if self.forced_organization is not None:
            return self.forced_organization
        group = self.group
        candidates = []
        if group.careplan is not None:
            candidates += [(e.get("valueReference"), group.careplan) for e in plan.get("extension", ())
                           if e.get("url") == ids.EXT_OWNING_ORGANIZATION]
        if group.care_teams:
            candidates += [(r, group.care_teams[0]) for r in group.care_teams[0].resource.get("managingOrganization", ())]
        for ref, source in candidates:
            target = self.graph.resolve((ref or {}).get("reference") or "", source) if ref else None
            if target is not None and target.resource_type == "Organization" and target.container is None:
                org = careteam.organization_from_fhir(target.resource, safe_id(target.id, UNASSIGNED_ORGANIZATION))
                self._claim(target, org)
                return org
        return Organization(id=UNASSIGNED_ORGANIZATION)

    # -- what the record does not model -----------------------------------------------------
    def _keep_residuals(self, case: Case) -> None:
        group = self.group
        if group.care_teams:
            self._claim(group.care_teams[0], case, "care_team_fhir")
        # 1. partner ids: a standalone resource keeps its id
        derived = CaseIds(case)
        for key, node in self.sources.items():
            if node.container is None and node.id and node.id != self._out_id(derived, key, node):
                self._extras(key)["id"] = node.id
        # 2. what the record maps to, with those ids
        case_ids = CaseIds(case) if any("id" in (self._extras_or_none(k) or ()) for k in self.sources) else derived
        base = {(r["resourceType"], r["id"]): r for r in case_resources(case, False, case_ids)}
        out_id = {key: self._out_id(case_ids, key, node) for key, node in self.sources.items()}
        out_ref = {key: f"{node.resource_type}/{out_id[key]}" for key, node in self.sources.items()}
        # 3. the difference, resource by resource
        lifted = {key for key, node in self.sources.items() if node.container is not None}
        for key, node in self.sources.items():
            rid = out_id[key]
            source = self._normalized(node, out_ref, lifted)
            source["id"] = rid
            patch = diff(base.get((node.resource_type, rid), {}), source)
            extras = self._extras(key)
            if patch is not None:
                extras["patch"] = patch
        # 4. resources the group refers to that are not part of the record: kept as sent
        others = [{"fullUrl": n.full_url, "resource": n.resource} for n in group.others
                  if n.container is None and n.key not in self.sources]
        others += [{"fullUrl": n.full_url, "resource": n.resource} for n in group.tasks if n.key not in self.sources]
        if others:
            self._extras_of(case, "fhir")["others"] = others
        for key, entity in self.entity_of.items():
            attr = self.entity_attr[key]
            value = getattr(entity, attr)
            if value == {}:
                setattr(entity, attr, None)

    def _extras(self, key: str) -> dict:
        return self._extras_of(self.entity_of[key], self.entity_attr[key])

    @staticmethod
    def _extras_of(entity: Any, attr: str) -> dict:
        value = getattr(entity, attr)
        if value is None:
            value = {}
            setattr(entity, attr, value)
        return value

    def _extras_or_none(self, key: str) -> Optional[dict]:
        return getattr(self.entity_of[key], self.entity_attr[key])

    def _out_id(self, case_ids: CaseIds, key: str, node: Node) -> str:
        entity, attr = self.entity_of[key], self.entity_attr[key]
        extras = getattr(entity, attr)
        if extras and "id" in extras:
            return extras["id"]
        if attr == "task_fhir":
            return case_ids.tasks[entity.id]
        if attr == "care_team_fhir":
            return case_ids.care_team
        rtype = node.resource_type
        if rtype == "Patient":
            return case_ids.patient
        if rtype == "CarePlan":
            return case_ids.plan
        if rtype == "Organization":
            return case_ids.organization
        ids_of_kind = {"Condition": case_ids.needs, "Goal": case_ids.goals,
                       "ServiceRequest": case_ids.services, "Practitioner": case_ids.members}[rtype]
        return ids_of_kind[entity.id]

    def _needs_rewrite(self, node: Node, out_ref: dict[str, str]) -> bool:
        """Whether any reference in the resource points at a record resource in another form
        (the graph has found them already: much faster than walking the resource)."""
        return any(target.key in out_ref and out_ref[target.key] != ref
                   for ref, target in self.graph.reference_targets(node))

    def _normalized(self, node: Node, out_ref: dict[str, str], lifted: set[str]) -> dict:
        """The partner's resource with references to record resources made relative and the
        contained resources that became record entities taken out."""
        resource = node.resource
        contained_keys = {f"{node.key}#{c.get('id')}" for c in resource.get("contained", ())}
        drop = {k.split("#", 1)[1] for k in contained_keys & lifted}
        if not drop and not self._needs_rewrite(node, out_ref):
            return dict(resource)

        def walk(value: Any) -> Any:
            if type(value) is dict:
                ref = value.get("reference")
                changed = None
                if type(ref) is str:
                    target = self.graph.resolve(ref, node)
                    if target is not None and target.key in out_ref and out_ref[target.key] != ref:
                        changed = {**value, "reference": out_ref[target.key]}
                out = changed or value
                new = {}
                dirty = changed is not None
                for k, v in out.items():
                    if k == "contained":
                        nv = [c for c in v if c.get("id") not in drop] if drop else v
                    elif k == "reference":
                        nv = v
                    else:
                        nv = walk(v)
                    dirty = dirty or nv is not v
                    if not (k == "contained" and nv == []):
                        new[k] = nv
                    else:
                        dirty = True
                return new if dirty else value
            if type(value) is list:
                items = [walk(v) for v in value]
                return items if any(a is not b for a, b in zip(items, value)) else value
            return value

        return dict(walk(resource))
