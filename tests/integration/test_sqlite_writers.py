"""Several processes writing one SQLite file: writers queue on the lock file beside the database and
none is refused; a failed write frees the lock; a thread that opens a second write transaction while
its first is open is told at once instead of waiting for itself; the WAL is copied back into the
database file in the background."""
from __future__ import annotations

import multiprocessing
import struct
import threading
import time

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import OperationalError

from service.sqlite_engine import Checkpointer
from service.store import Store, api_keys, now

pytestmark = pytest.mark.integration

PER_PROCESS = 60


def _key_row(key_id: str) -> dict:
    return {"id": key_id, "organization_id": "org-1", "secret_hash": f"hash-{key_id}", "scopes": "admin",
            "created_at": now(), "revoked": False}


def _write_keys(url: str, prefix: str, count: int) -> None:
    store = Store(url)
    for i in range(count):
        with store.engine.begin() as conn:
            conn.execute(insert(api_keys), _key_row(f"{prefix}-{i}"))
    store.engine.dispose()


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'writers.db'}"
    Store(url).create_all()
    return url


def _keys(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(select(api_keys.c.id)).scalars())


def test_processes_writing_at_once_all_get_in(url):
    context = multiprocessing.get_context("spawn")  # no inherited connections
    workers = [context.Process(target=_write_keys, args=(url, f"p{n}", PER_PROCESS)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert len(_keys(Store(url))) == 3 * PER_PROCESS


def test_a_writer_waits_for_the_open_write_and_goes_on_when_it_commits(url):
    store = Store(url)
    started, finished = threading.Event(), []

    def second_writer():
        started.set()
        with store.engine.begin() as conn:
            conn.execute(insert(api_keys), _key_row("second"))
        finished.append(time.monotonic())

    with store.engine.begin() as conn:
        conn.execute(insert(api_keys), _key_row("first"))
        thread = threading.Thread(target=second_writer)
        thread.start()
        started.wait(5)
        time.sleep(0.2)
        assert finished == []  # still queued behind this transaction
        committed_at = time.monotonic()
    thread.join(10)
    assert finished and finished[0] >= committed_at
    assert _keys(store) == {"first", "second"}


def test_a_failed_write_frees_the_lock(url):
    store = Store(url)
    with pytest.raises(Exception):
        with store.engine.begin() as conn:
            conn.execute(insert(api_keys), _key_row("dup"))
            conn.execute(insert(api_keys), _key_row("dup"))  # primary key taken: the transaction rolls back
    done = threading.Event()

    def other_thread():
        with store.engine.begin() as conn:
            conn.execute(insert(api_keys), _key_row("after"))
        done.set()

    threading.Thread(target=other_thread).start()
    assert done.wait(10)
    assert _keys(store) == {"after"}


def test_a_second_write_transaction_in_the_same_thread_fails_at_once(url):
    store = Store(url)
    began = time.monotonic()
    with store.engine.begin() as conn:
        conn.execute(insert(api_keys), _key_row("outer"))
        with pytest.raises(OperationalError, match="already has a write transaction"):
            with store.engine.begin() as inner:
                inner.execute(insert(api_keys), _key_row("inner"))
    assert time.monotonic() - began < 5
    assert _keys(store) == {"outer"}


def test_reads_take_no_writer_lock(url):
    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(insert(api_keys), _key_row("written"))
        with store.reader.connect() as reading:  # the same thread, while its write is open
            assert list(reading.execute(select(api_keys.c.id)).scalars()) == []  # not committed yet


def _wal_progress(database) -> tuple[int, int]:
    """(frames in the WAL, frames already copied back) read from the wal-index header in the -shm
    file (https://www.sqlite.org/walformat.html: mxFrame at byte 16, nBackfill at byte 96, in the
    host's byte order), without checkpointing anything."""
    header = (database.parent / f"{database.name}-shm").read_bytes()[:100]
    return struct.unpack_from("=I", header, 16)[0], struct.unpack_from("=I", header, 96)[0]


def test_the_wal_is_checkpointed_in_the_background(url, tmp_path):
    store = Store(url)
    with store.reader.connect() as conn:  # holds the database open, so closing a writer checkpoints nothing
        conn.execute(select(1))
        for i in range(40):
            with store.engine.begin() as writing:
                writing.execute(insert(api_keys), _key_row(f"k{i}"))
        deadline = time.monotonic() + Checkpointer.INTERVAL * 10 + 5
        while True:
            in_wal, copied = _wal_progress(tmp_path / "writers.db")
            if in_wal > 0 and copied == in_wal:
                break
            assert time.monotonic() < deadline, f"{copied} of {in_wal} WAL frames checkpointed"
            time.sleep(0.05)


def test_the_wal_starts_over_under_steady_writes(url, tmp_path, monkeypatch):
    monkeypatch.setattr(Checkpointer, "WAL_RESTART_FRAMES", 40)
    store = Store(url)
    highest, deadline, i = 0, time.monotonic() + 20, 0
    while True:  # writes with no pause: a checkpoint alongside them never catches up alone
        with store.engine.begin() as conn:
            conn.execute(insert(api_keys), _key_row(f"k{i}"))
        i += 1
        in_wal, _copied = _wal_progress(tmp_path / "writers.db")
        if in_wal < highest and highest >= Checkpointer.WAL_RESTART_FRAMES:
            break  # the WAL started over from its beginning, once past the limit
        highest = in_wal  # (a lull can let it start over below the limit too, as SQLite does by itself)
        assert time.monotonic() < deadline, f"the WAL grew to {highest} frames and never started over"
    assert highest >= Checkpointer.WAL_RESTART_FRAMES
