"""Celery tasks: thin shells over ``service.sync``. Arguments are ids and versions only.

Tasks are idempotent (the ledger makes a repeated push write nothing), acknowledged late and
re-queued if a worker dies mid-task. Transient partner failures retry with exponential backoff and
full jitter, never sooner than the partner's Retry-After; permanent ones become dead letters.
"""
from __future__ import annotations

import datetime as dt
import os
import random

from celery import shared_task

from adapters.errors import AuthError, PermanentError, TransientError
from service import partners as registry
from service import runtime, sync

MAX_RETRIES = 8
#: seconds: the first retry waits up to BASE, each next one up to twice as long, never more than CAP
BACKOFF_BASE = float(os.environ.get("CASEBRIDGE_RETRY_BASE") or 2.0)
BACKOFF_CAP = float(os.environ.get("CASEBRIDGE_RETRY_CAP") or 600.0)


def backoff(retries: int, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``retries + 1``."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * (2 ** retries)))
    return max(delay, retry_after or 0.0)


def _store():
    return runtime().store


@shared_task(bind=True, name="casebridge.push_case", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES, ignore_result=True)
def push_case(self, case_id: str, partner_id: str, version: int) -> None:
    store = _store()
    try:
        sync.push_case(store, case_id, partner_id, version, registry.endpoint_for(store, partner_id))
    except sync.CaseBusy as busy:  # waiting for another push of the case is not a failed attempt
        raise self.retry(exc=busy, countdown=busy.retry_after or 2.0, max_retries=None)
    except TransientError as error:
        if self.request.retries >= self.max_retries:
            sync.record_failure(store, partner_id, case_id, version, "push", error)
            return
        raise self.retry(exc=error, countdown=backoff(self.request.retries, error.retry_after))
    except (PermanentError, AuthError) as error:
        sync.record_failure(store, partner_id, case_id, version, "push", error)


@shared_task(bind=True, name="casebridge.pull_partner", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES, ignore_result=True)
def pull_partner(self, partner_id: str) -> None:
    store = _store()
    try:
        sync.pull_partner(store, partner_id, registry.endpoint_for(store, partner_id))
    except TransientError as error:
        if self.request.retries >= self.max_retries:
            sync.record_failure(store, partner_id, None, None, "pull", error)
            return
        raise self.retry(exc=error, countdown=backoff(self.request.retries, error.retry_after))
    except (PermanentError, AuthError) as error:
        sync.record_failure(store, partner_id, None, None, "pull", error)


@shared_task(bind=True, name="casebridge.notify", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES, ignore_result=True)
def notify(self, partner_id: str, references: list[str]) -> None:
    store = _store()
    try:
        sync.notify(store, partner_id, references, registry.endpoint_for(store, partner_id))
    except TransientError as error:
        raise self.retry(exc=error, countdown=backoff(self.request.retries, error.retry_after))
    except (PermanentError, AuthError) as error:
        sync.record_failure(store, partner_id, None, None, "notify", error)


@shared_task(name="casebridge.dispatch_outbox", ignore_result=True)
def dispatch_outbox() -> int:
    return sync.dispatch(_store(), lambda case_id, partner_id, version: push_case.delay(case_id, partner_id, version))


@shared_task(name="casebridge.pull_due_partners", ignore_result=True)
def pull_due_partners() -> int:
    """Start a pull for every partner whose schedule says it is time (never more often than every
    15 minutes: the registry refuses shorter schedules)."""
    started = 0
    now = dt.datetime.now(dt.timezone.utc)
    for partner in sync.partners_to_pull(_store(), now):
        pull_partner.delay(partner)
        started += 1
    return started
