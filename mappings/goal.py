"""Goal ⇄ US Core Goal."""
from __future__ import annotations

from typing import Callable

from mappings import codes, ids
from mappings.common import Copy, codings, concept_text, copy_in, copy_out, find_coding, own_identifier, profile
from service.domain import Goal, ProgressEntry, Target

COPIES = [Copy("start", "startDate"), Copy("achieved_date", "statusDate")]
UNDESCRIBED = "Goal"


def to_fhir(goal: Goal, goal_id: str, subject: dict, need_ref: Callable[[str], dict]) -> dict:
    resource: dict = {
        "resourceType": "Goal", "id": goal_id, "meta": profile("us-core-goal"),
        "identifier": [{"system": ids.SID_GOAL, "value": goal.id}],
        "lifecycleStatus": codes.GOAL_LIFECYCLE.fhir(goal.status),
    }
    if goal.status in codes.GOAL_ACHIEVEMENT_STATUS.to_fhir:
        resource["achievementStatus"] = {"coding": [codes.GOAL_ACHIEVEMENT_STATUS.coding(goal.status)]}
    resource["category"] = [{"coding": [codes.domain_coding(goal.domain)]}]
    if goal.priority:
        resource["priority"] = {"coding": [codes.GOAL_PRIORITY.coding(goal.priority)]}
    resource["description"] = {"text": goal.description}
    resource["subject"] = subject
    copy_out(goal, COPIES, resource)
    target = target_to_fhir(goal)
    if target:
        resource["target"] = [target]
    if goal.addresses:
        resource["addresses"] = [need_ref(n) for n in goal.addresses]
    if goal.progress:
        resource["note"] = [progress_to_fhir(p) for p in goal.progress]
    return resource


def target_to_fhir(goal: Goal) -> dict:
    target: dict = {}
    if goal.target:
        target["measure"] = {"text": goal.target.measure}
        if goal.target.value:
            target["detailString"] = goal.target.value
    if goal.target_date:
        target["dueDate"] = goal.target_date
    return target


def progress_to_fhir(entry: ProgressEntry) -> dict:
    note: dict = {"authorString": entry.author} if entry.author else {}
    note["time"] = entry.date
    note["text"] = entry.note
    return note


def from_fhir(resource: dict, local_id: str, need_id: Callable[[dict], str | None]) -> Goal:
    status = _status(resource)
    fields = copy_in(resource, COPIES)
    if status not in ("achieved", "not_achieved"):
        fields.pop("achieved_date", None)  # statusDate of another status is not an achievement date
    targets = resource.get("target") or [{}]
    goal = Goal(
        id=own_identifier(resource, ids.SID_GOAL) or local_id,
        description=concept_text(resource.get("description")) or UNDESCRIBED,
        domain=codes.domain_from_codings(codings(resource.get("category", ()))),
        priority=codes.GOAL_PRIORITY.internal(find_coding(resource.get("priority"),
                                                          codes.GOAL_PRIORITY_SYSTEM)),
        status=status,
        target_date=targets[0].get("dueDate"),
        target=_target(targets[0]),
        progress=[ProgressEntry(date=n["time"], note=n["text"], author=n.get("authorString"))
                  for n in resource.get("note", ()) if n.get("time") and n.get("text")],
        addresses=[i for i in (need_id(r) for r in resource.get("addresses", ())) if i],
        **fields,
    )
    return goal


def _status(resource: dict) -> str:
    status = codes.GOAL_LIFECYCLE.internal(resource.get("lifecycleStatus"))
    if resource.get("lifecycleStatus") == "completed":
        achieved = codes.GOAL_ACHIEVEMENT_STATUS.internal(
            find_coding(resource.get("achievementStatus"), codes.GOAL_ACHIEVEMENT))
        status = achieved or "achieved"
    return status


def _target(target: dict) -> Target | None:
    measure = concept_text(target.get("measure"))
    if not measure:
        return None
    value = target.get("detailString")
    if value is None and "detailQuantity" in target:
        quantity = target["detailQuantity"]
        value = " ".join(str(quantity[k]) for k in ("comparator", "value", "unit") if k in quantity)
    elif value is None and "detailCodeableConcept" in target:
        value = concept_text(target["detailCodeableConcept"])
    return Target(measure=measure, value=value)
