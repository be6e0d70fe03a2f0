"""Case ⇄ US Core CarePlan (chronic-care pattern: activities are references that carry pertainsToGoal)."""
from __future__ import annotations

from html import escape
from typing import Callable, Optional

from mappings import codes, ids
from mappings.common import Copy, codings, copy_in, copy_out, extension_value, extension_values, profile
from service.domain import Case, Note, Risk

COPIES = [Copy("title", "title")]


def to_fhir(case: Case, plan_id: str, refs: "PlanRefs") -> dict:
    extension = [{"url": ids.EXT_OWNING_ORGANIZATION, "valueReference": refs.organization}]
    if case.closure_reason:
        extension.append({"url": ids.EXT_CLOSURE_REASON, "valueString": case.closure_reason})
    if case.risk:
        extension.append(risk_to_fhir(case.risk))
    extension.extend({"url": ids.EXT_RESTRICTED_DOMAIN, "valueCode": d} for d in case.sharing.restricted_domains)
    plan: dict = {
        "resourceType": "CarePlan", "id": plan_id, "meta": profile("us-core-careplan"),
        "text": {"status": "generated", "div": narrative(case)},
        "extension": extension,
        "identifier": [{"system": ids.SID_CASE, "value": case.id}],
        "status": codes.CASE_STATUS.fhir(case.status),
        "intent": "plan",
        "category": [{"coding": [codes.CAREPLAN_ASSESS_PLAN]}, {"coding": [codes.PROGRAM.coding(case.program)]}],
    }
    copy_out(case, COPIES, plan)
    plan["subject"] = refs.patient
    if case.opened or case.closed:
        plan["period"] = {k: v for k, v in (("start", case.opened), ("end", case.closed)) if v}
    plan["author"] = refs.author
    plan["careTeam"] = [refs.care_team]
    if case.needs:
        plan["addresses"] = [refs.need(n.id) for n in case.needs]
    if case.goals:
        plan["goal"] = [refs.goal(g.id) for g in case.goals]
    if case.services:
        plan["activity"] = [activity_to_fhir(s.id, s.goals, refs) for s in case.services]
    if case.notes:
        plan["note"] = [note_to_fhir(n) for n in case.notes]
    return plan


class PlanRefs:
    """The references a CarePlan makes, worked out by the bundle export."""

    def __init__(self, patient: dict, organization: dict, author: dict, care_team: dict,
                 need: Callable[[str], dict], goal: Callable[[str], dict], service: Callable[[str], dict]):
        self.patient, self.organization, self.author, self.care_team = patient, organization, author, care_team
        self.need, self.goal, self.service = need, goal, service


def activity_to_fhir(service_id: str, goal_ids: list[str], refs: PlanRefs) -> dict:
    activity: dict = {}
    if goal_ids:
        activity["extension"] = [{"url": ids.EXT_PERTAINS_TO_GOAL, "valueReference": refs.goal(g)} for g in goal_ids]
    activity["reference"] = refs.service(service_id)
    return activity


def risk_to_fhir(risk: Risk) -> dict:
    parts = [{"url": "level", "valueCode": risk.level}]
    if risk.assessed:
        parts.append({"url": "assessed", "valueDateTime": risk.assessed})
    if risk.score is not None:
        parts.append({"url": "score", "valueDecimal": risk.score})
    return {"url": ids.EXT_RISK, "extension": parts}


def note_to_fhir(note: Note) -> dict:
    extension = [{"url": ids.EXT_NOTE_ID, "valueString": note.id}]
    if note.confidential:
        extension.append({"url": ids.EXT_NOTE_CONFIDENTIAL, "valueBoolean": True})
    annotation: dict = {"extension": extension}
    if note.author:
        annotation["authorString"] = note.author
    annotation["time"] = note.time
    annotation["text"] = note.text
    return annotation


def narrative(case: Case) -> str:
    """A summary a person can read: the plan, its needs, goals and services."""
    name = case.client.preferred_name or next(
        (n.text or " ".join([*n.given, n.family or ""]).strip() for n in case.client.names), "client")
    parts = [f'<div xmlns="http://www.w3.org/1999/xhtml"><p><b>{escape(case.title or "Care plan")}</b> for '
             f"{escape(name)}: {escape(case.program.replace('_', ' '))} case, {escape(case.status.replace('_', ' '))}"
             f"{', opened ' + escape(case.opened) if case.opened else ''}.</p>"]
    for heading, items in (("Needs", [n.description for n in case.needs]),
                           ("Goals", [f"{g.description} ({g.status.replace('_', ' ')})" for g in case.goals]),
                           ("Services and referrals",
                            [f"{s.description} ({s.status.replace('_', ' ')})" for s in case.services])):
        if items:
            parts.append(f"<p>{heading}:</p><ul>{''.join(f'<li>{escape(i)}</li>' for i in items)}</ul>")
    parts.append("</div>")
    return "".join(parts)


def fields_from_fhir(plan: dict) -> dict:
    """The case's own fields that the CarePlan carries (not its parts: those come from their resources)."""
    fields = copy_in(plan, COPIES)
    period = plan.get("period") or {}
    program = next((c.get("code") for c in codings(plan.get("category", ())) if c.get("system") == ids.CS_PROGRAM), None)
    fields.update(
        status=codes.CASE_STATUS.internal(plan.get("status")),
        program=codes.PROGRAM.internal(program),
        opened=period.get("start"),
        closed=period.get("end"),
        closure_reason=extension_value(plan, ids.EXT_CLOSURE_REASON, "valueString"),
        risk=risk_from_fhir(plan),
    )
    return fields


def restricted_domains(plan: dict) -> list[str]:
    return [codes.OWN_DOMAIN.internal(c) or c for c in extension_values(plan, ids.EXT_RESTRICTED_DOMAIN, "valueCode")]


def risk_from_fhir(plan: dict) -> Optional[Risk]:
    ext = next((e for e in plan.get("extension", ()) if e.get("url") == ids.EXT_RISK), None)
    if ext is None:
        return None
    level = extension_value(ext, "level", "valueCode")
    if level is None:
        return None
    return Risk(level=level, assessed=extension_value(ext, "assessed", "valueDateTime"),
                score=extension_value(ext, "score", "valueDecimal"))


def notes_from_fhir(plan: dict) -> list[Note]:
    notes = []
    for i, annotation in enumerate(plan.get("note", ())):
        if not (annotation.get("text") and annotation.get("time")):
            continue  # stays with the plan's kept FHIR
        notes.append(Note(
            id=extension_value(annotation, ids.EXT_NOTE_ID, "valueString") or f"note-{i + 1}",
            time=annotation["time"],
            text=annotation["text"],
            author=annotation.get("authorString") or (annotation.get("authorReference") or {}).get("display"),
            confidential=bool(extension_value(annotation, ids.EXT_NOTE_CONFIDENTIAL, "valueBoolean")),
        ))
    return notes


def activity_goals(plan: dict) -> dict[str, list[dict]]:
    """pertainsToGoal references of each activity, keyed by the activity's reference."""
    found: dict[str, list[dict]] = {}
    for activity in plan.get("activity", ()):
        target = (activity.get("reference") or {}).get("reference")
        if target:
            found[target] = extension_values(activity, ids.EXT_PERTAINS_TO_GOAL, "valueReference")
    return found

