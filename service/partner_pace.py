"""A partner's request-rate limit kept in the database, so that all of casebridge (every worker process,
on every machine) keeps to it together, not each process on its own.

Each request takes the next free slot, ``1/rate`` seconds after the one before, in one short write
(an UPDATE that moves the partner's ``next_at``), and waits for it. The row is the queue: processes
never talk to each other.
"""
from __future__ import annotations

import time
from typing import Callable

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.exc import IntegrityError

from service.store import Store, read, write
from service.sync_store import partner_pace

_NEXT = case((partner_pace.c.next_at > bindparam("now"), partner_pace.c.next_at), else_=bindparam("now"))
_TAKE_SLOT = update(partner_pace).where(partner_pace.c.partner_id == bindparam("key_partner")) \
    .values(next_at=_NEXT + bindparam("interval"))
_NEXT_AT = select(partner_pace.c.next_at).where(partner_pace.c.partner_id == bindparam("key_partner"))
_FIRST_SLOT = insert(partner_pace).values(partner_id=bindparam("partner_id"), next_at=bindparam("next_at"))


class SharedPace:
    """At most ``rate`` requests a second to one partner from every process using this database;
    ``acquire()`` sleeps until the caller's slot (the interface of ``adapters.fhir_rest.TokenBucket``)."""

    def __init__(self, store: Store, partner_id: str, rate: float, *,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.store, self.partner_id, self.interval = store, partner_id, 1.0 / rate
        self.clock, self.sleep = clock, sleep

    def acquire(self) -> float:
        """Take the next slot and wait for it; returns the seconds waited."""
        now = self.clock()
        slot = self._take_slot(now)
        wait = slot - now
        if wait > 0:
            self.sleep(wait)
        return max(wait, 0.0)

    def _take_slot(self, now: float) -> float:
        key = {"key_partner": self.partner_id, "now": now, "interval": self.interval}
        for _ in range(2):  # a first request of two processes at once: one inserts, the other updates
            try:
                with self.store.engine.begin() as conn:
                    if write(conn, _TAKE_SLOT, key):  # the row stays locked to the end of this transaction
                        return read(conn, _NEXT_AT, key)[0].next_at - self.interval
                    write(conn, _FIRST_SLOT, {"partner_id": self.partner_id, "next_at": now + self.interval})
                    return now
            except IntegrityError:
                continue
        raise RuntimeError(f"no request slot could be taken for partner {self.partner_id}")
