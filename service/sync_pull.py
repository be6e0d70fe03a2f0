"""Reading from partners: a scheduled pull of everything changed since the partner's watermark, a
rest-hook notification's named resources, and which partners are due a pull. What is read is applied
by ``service.sync_inbound``.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import select, update

from adapters.errors import PermanentError
from service.partners import partner_row
from service.store import Store, now
from service.sync_inbound import apply_remote
from service.sync_store import partners

#: what is pulled from a partner, in this order (a referral before the Tasks that follow it)
PULL_TYPES = ("ServiceRequest", "Task", "CarePlan", "Goal")


@dataclass
class PullResult:
    seen: int = 0
    applied: int = 0
    new_cases: int = 0
    watermark: Optional[str] = None


def pull_partner(store: Store, partner_id: str, endpoint: Any) -> PullResult:
    """Everything the partner changed since the watermark, applied; the watermark moves only when
    the whole pull went through, so a failed pull is simply done again."""
    partner = partner_row(store, partner_id)
    readable = set((partner.route or {}).get("readable") or PULL_TYPES)
    result = PullResult(watermark=partner.watermark)
    newest = partner.watermark
    for rtype in PULL_TYPES:
        if rtype not in readable:
            continue
        params = {"_lastUpdated": f"gt{partner.watermark}"} if partner.watermark else {}
        for resource in endpoint.search(rtype, params):
            result.seen += 1
            stamp = (resource.get("meta") or {}).get("lastUpdated")
            if stamp and (newest is None or stamp > newest):
                newest = stamp
            outcome = apply_remote(store, partner, resource, endpoint)
            result.applied += outcome in ("updated", "created")
            result.new_cases += outcome == "created"
    with store.engine.begin() as conn:
        conn.execute(update(partners).where(partners.c.id == partner_id)
                     .values(watermark=newest, last_pull_at=now(), last_success_at=now()))
    result.watermark = newest
    return result


def notify(store: Store, partner_id: str, references: list[str], endpoint: Any) -> int:
    """A FHIR Subscription rest-hook notification (id-only): pull just the resources it names."""
    partner = partner_row(store, partner_id)
    applied = 0
    for reference in references:
        rtype, rid = reference.split("/", 1)
        try:
            found = endpoint.read(rtype, rid)
        except PermanentError as error:
            if error.status in (404, 410):
                continue
            raise
        applied += apply_remote(store, partner, found.resource, endpoint) in ("updated", "created")
    return applied


def notified_references(payload: dict) -> list[str]:
    """``Type/id`` of every resource a notification names: entry fullUrls and request urls of a
    history/subscription-notification Bundle, and SubscriptionStatus ``notificationEvent.focus``."""
    found: list[str] = []

    def add(url: Optional[str]) -> None:
        if not url:
            return
        parts = url.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2] not in ("SubscriptionStatus", "Parameters"):
            ref = f"{parts[-2]}/{parts[-1]}"
            if ref not in found:
                found.append(ref)

    def walk_status(resource: dict) -> None:
        for event in resource.get("notificationEvent", ()):
            add((event.get("focus") or {}).get("reference"))
        for parameter in resource.get("parameter", ()):
            if parameter.get("name") == "notification-event":
                for part in parameter.get("part", ()):
                    if part.get("name") == "focus":
                        add((part.get("valueReference") or {}).get("reference"))

    if payload.get("resourceType") == "Bundle":
        for entry in payload.get("entry", ()):
            resource = entry.get("resource") or {}
            if resource.get("resourceType") in ("SubscriptionStatus", "Parameters"):
                walk_status(resource)
            else:
                add(entry.get("fullUrl") or (entry.get("request") or {}).get("url"))
    else:
        walk_status(payload)
    return found


def partners_to_pull(store: Store, at: dt.datetime) -> list[str]:
    with store.reader.connect() as conn:
        rows = conn.execute(select(partners.c.id, partners.c.last_pull_at, partners.c.pull_every_minutes)
                            .where(partners.c.active.is_(True), partners.c.direction != "push")).all()
    due = []
    for row in rows:
        last = row.last_pull_at
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=dt.timezone.utc)
        if last is None or at - last >= dt.timedelta(minutes=row.pull_every_minutes):
            due.append(row.id)
    return due
