"""A partner's request-rate limit is one pace for every process using the database: slots taken at the
same moment by several processes (threads here, each with its own pace object and connection) are all
different and one interval apart, on SQLite and on PostgreSQL."""
from __future__ import annotations

import threading

import pytest

from service import migrations
from service.partner_pace import SharedPace
from service.store import Store

pytestmark = pytest.mark.integration


def test_slots_taken_at_once_from_several_processes_never_coincide(database_url):
    store = Store(database_url)
    migrations.upgrade(store)
    now, rate, takers, each = 1_000_000.0, 50.0, 4, 25  # a clock that stands still: each slot is given
    slots: list[float] = []
    start = threading.Barrier(takers)

    def take():
        pace = SharedPace(store, "p1", rate, clock=lambda: now, sleep=lambda seconds: None)
        start.wait()
        mine = [now + pace.acquire() for _ in range(each)]
        slots.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(round((slot - now) * rate) for slot in slots) == list(range(takers * each))
