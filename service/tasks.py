"""Celery tasks: thin shells over the sync engine (``service.sync_push``, ``service.sync_pull``,
``service.sync_outbox``). Arguments are ids and versions only: the dispatcher's ``push_cases`` carries
a partner id and up to 20 (case id, version) pairs; a case to try again goes on as a ``push_case``.

Tasks are idempotent (the ledger makes a repeated push write nothing), acknowledged late and
re-queued if a worker dies mid-task. Transient partner failures retry with exponential backoff and
full jitter, never sooner than the partner's Retry-After, at most ``MAX_RETRIES`` times; permanent
ones become dead letters. A push that finds its case held by another push waits apart from that
bound (``BUSY_RETRIES``), so a lease left by a killed worker is outlived, not counted as failures.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from celery import shared_task

from adapters.errors import AuthError, PermanentError, TransientError
from service import partners as registry
from service import runtime, sync_ledger, sync_outbox, sync_pull, sync_push
from service.logging import describe_exception

log = logging.getLogger("casebridge.sync")

#: tries after a transient partner failure (503, 429, a timeout) before the work is a dead letter
MAX_RETRIES = 8
#: tries of a case another push holds: until ten of its leases have run out (a lease left by a killed
#: worker runs out after LEASE_SECONDS), then a dead letter rather than waiting for ever
BUSY_RETRIES = math.ceil(10 * sync_push.LEASE_SECONDS / sync_push.BUSY_RETRY_AFTER)
#: seconds: the first retry waits up to BASE, each next one up to twice as long, never more than CAP
BACKOFF_BASE = float(os.environ.get("CASEBRIDGE_RETRY_BASE") or 2.0)
BACKOFF_CAP = float(os.environ.get("CASEBRIDGE_RETRY_CAP") or 600.0)


def backoff(retries: int, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``retries + 1``."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * (2 ** retries)))
    return max(delay, retry_after or 0.0)


def _store():
    return runtime().store


class NextTry(NamedTuple):
    """A push to try again: after ``countdown`` seconds, with its counts of busy and of failed tries."""
    countdown: float
    busy_retries: int
    exc: Exception


def _push_once(store, case_id: str, partner_id: str, version: int, retries: int, busy_retries: int,
               lease: sync_push.Lease | None = None) -> NextTry | None:
    """One try of a push. ``retries``: the tries before this one; ``busy_retries``: how many of them found
    the case held by another push, so the failed ones are the rest; ``lease``: one taken for it already.
    Returns the next try, or ``None`` when there is none (pushed, or a dead letter)."""
    try:
        sync_push.push_case(store, case_id, partner_id, version, registry.endpoint_for(store, partner_id), lease)
    except sync_push.CaseBusy as busy:  # waiting for another push of the case is not a failed attempt
        if busy_retries >= BUSY_RETRIES:
            sync_ledger.record_failure(store, partner_id, case_id, version, "push", busy)
            return None
        return NextTry(busy.retry_after or sync_push.BUSY_RETRY_AFTER, busy_retries + 1, busy)
    except TransientError as error:
        failures = retries - busy_retries
        if failures >= MAX_RETRIES:
            sync_ledger.record_failure(store, partner_id, case_id, version, "push", error)
            return None
        return NextTry(backoff(failures, error.retry_after), busy_retries, error)
    except (PermanentError, AuthError) as error:
        sync_ledger.record_failure(store, partner_id, case_id, version, "push", error)
    except Exception as error:  # noqa: BLE001 - a fault of ours: kept as a dead letter, to replay once fixed
        log.error("push of case %s to partner %s failed: %s", case_id, partner_id, describe_exception(error))
        sync_ledger.record_failure(store, partner_id, case_id, version, "push", error)
    return None


@shared_task(bind=True, name="casebridge.push_case", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES + BUSY_RETRIES, ignore_result=True)
def push_case(self, case_id: str, partner_id: str, version: int, busy_retries: int = 0) -> None:
    """``busy_retries``: how many of the retries so far found the case held by another push. Celery
    counts every retry in ``request.retries`` (and its ``max_retries`` is only a backstop above both
    bounds), so the transient failures are those retries less the busy ones."""
    again = _push_once(_store(), case_id, partner_id, version, self.request.retries, busy_retries)
    if again is not None:
        raise self.retry(args=(case_id, partner_id, version), kwargs={"busy_retries": again.busy_retries},
                         exc=again.exc, countdown=again.countdown)


#: pushes of one task that run side by side: a worker waits for several partners' answers at once
PUSH_THREADS = int(os.environ.get("CASEBRIDGE_PUSH_THREADS") or 4)
_side_by_side: tuple[int, ThreadPoolExecutor] | None = None


def _pushers() -> ThreadPoolExecutor:
    """This process's threads for pushes (made after the worker forked it, never inherited)."""
    global _side_by_side
    if _side_by_side is None or _side_by_side[0] != os.getpid():
        _side_by_side = (os.getpid(), ThreadPoolExecutor(PUSH_THREADS, thread_name_prefix="casebridge-push"))
    return _side_by_side[1]


@shared_task(name="casebridge.push_cases", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def push_cases(partner_id: str, items: list[tuple[str, int]]) -> None:
    """Push several cases to one partner, as the dispatcher hands them out ((case id, version) pairs),
    ``PUSH_THREADS`` at a time. A case to try again goes on alone, as a ``push_case`` retry with its
    counts, so one slow or failing case never holds the others back twice; a batch redelivered after
    its worker died pushes again what it had pushed, which writes nothing."""
    store = _store()
    leases = sync_push.take_leases(store, partner_id, [case_id for case_id, _ in items])  # one write for all
    tries = _pushers().map(
        lambda item: (item, _push_once(store, item[0], partner_id, item[1], 0, 0, leases.get(item[0]))), items)
    for (case_id, version), again in list(tries):
        if again is not None:
            push_case.apply_async(args=(case_id, partner_id, version), kwargs={"busy_retries": again.busy_retries},
                                  countdown=again.countdown, retries=1)


@shared_task(bind=True, name="casebridge.pull_partner", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES, ignore_result=True)
def pull_partner(self, partner_id: str) -> None:
    store = _store()
    try:
        sync_pull.pull_partner(store, partner_id, registry.endpoint_for(store, partner_id))
    except TransientError as error:
        if self.request.retries >= self.max_retries:
            sync_ledger.record_failure(store, partner_id, None, None, "pull", error)
            return
        raise self.retry(exc=error, countdown=backoff(self.request.retries, error.retry_after))
    except (PermanentError, AuthError) as error:
        sync_ledger.record_failure(store, partner_id, None, None, "pull", error)


@shared_task(bind=True, name="casebridge.notify", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES, ignore_result=True)
def notify(self, partner_id: str, references: list[str]) -> None:
    store = _store()
    try:
        sync_pull.notify(store, partner_id, references, registry.endpoint_for(store, partner_id))
    except TransientError as error:
        raise self.retry(exc=error, countdown=backoff(self.request.retries, error.retry_after))
    except (PermanentError, AuthError) as error:
        sync_ledger.record_failure(store, partner_id, None, None, "notify", error)


@shared_task(name="casebridge.dispatch_outbox", ignore_result=True)
def dispatch_outbox() -> int:
    return sync_outbox.dispatch(_store(), push_cases.delay)


@shared_task(name="casebridge.pull_due_partners", ignore_result=True)
def pull_due_partners() -> int:
    """Start a pull for every partner whose schedule says it is time (never more often than every
    15 minutes: the registry refuses shorter schedules)."""
    started = 0
    now = dt.datetime.now(dt.timezone.utc)
    for partner in sync_pull.partners_to_pull(_store(), now):
        pull_partner.delay(partner)
        started += 1
    return started
