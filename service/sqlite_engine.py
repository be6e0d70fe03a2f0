"""The SQLite engine of the embedded default, set up for several processes writing one file.

SQLite lets one writer in at a time. Left to itself, a writer that finds the file locked polls,
sleeping 1, 2, 5, 10 ... ms between tries, and the writer whose commit crosses the WAL's size limit
copies the whole WAL back into the database file (and syncs it) before its request can answer. Under
load both put most of a save's latency into waiting. So here:

- readers begin a deferred transaction and take no lock (WAL: they never wait for a writer);
- writers take the write lock up front (``BEGIN IMMEDIATE``: no deadlock upgrading a read lock), after
  queueing on an ``flock`` of a file beside the database, shared by every process that opens it: the
  kernel wakes the next writer the moment the previous one has committed;
- a background thread in each writing process checkpoints the WAL (``PASSIVE``: it never blocks a
  reader or a writer), instead of the commit that happens to cross the limit, and now and then
  lets the WAL start over (see ``Checkpointer``).
"""
from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Optional

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: writers poll for SQLite's lock instead
    fcntl = None

_WRITER_LOCK = "casebridge_writer_lock"


def sqlite_engine(url: str, readonly_option: str, **options: Any) -> Engine:
    """An engine on the SQLite database at ``url``; connections run with the execution option
    ``readonly_option`` set only read. ``options`` go to ``create_engine``."""
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **options)
    path = _database_file(engine)
    checkpointer = Checkpointer(path) if path is not None else None

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, record):  # pragma: no cover - trivial
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # pages read through a memory map, not copied in by a read call each time: every write
        # elsewhere empties a connection's own page cache, so a busy database is read again and again
        cursor.execute("PRAGMA mmap_size=4294967296")
        if path is not None:
            cursor.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job
            if fcntl is not None:
                record.info[_WRITER_LOCK] = WriterLock(f"{path}-writer.lock")
        cursor.close()

    @event.listens_for(engine, "close")
    def _close(_dbapi_connection, record):  # pragma: no cover - trivial
        lock = record.info.pop(_WRITER_LOCK, None)
        if lock is not None:
            lock.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        readonly = conn.get_execution_options().get(readonly_option, False)
        lock = None if readonly else conn.connection.info.get(_WRITER_LOCK)
        if lock is not None:
            lock.acquire()
        try:
            conn.connection.driver_connection.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @event.listens_for(engine, "commit")
    def _commit(conn: Connection) -> None:
        # The event comes before the driver's commit: commit here, so that the next writer is woken
        # only once the database is free (the driver's own commit, after, finds nothing to do).
        if _end_write(conn, "commit") and checkpointer is not None:
            checkpointer.written()

    @event.listens_for(engine, "rollback")
    def _rollback(conn: Connection) -> None:
        _end_write(conn, "rollback")

    return engine


def _end_write(conn: Connection, how: str) -> bool:
    """Commit or roll back a write transaction through the driver, then let the next writer in;
    False when ``conn`` holds no writer's lock (a read, or a database without one)."""
    lock = conn.connection.info.get(_WRITER_LOCK)
    if lock is None or not lock.held:
        return False
    try:
        getattr(conn.connection.driver_connection, how)()
    finally:
        lock.release()
    return True


def _database_file(engine: Engine) -> Optional[str]:
    """The file of a file database; none for an in-memory or URI-named one (left with SQLite's defaults)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


_HELD = threading.local()  # the lock files this thread holds


class WriterLock:
    """An exclusive ``flock`` on a file beside the database, held from a writer's BEGIN to its
    COMMIT or ROLLBACK. Each connection opens the file itself, so connections of one process queue
    on it too.

    A thread that opens a second write transaction on the same database while its first is open
    would wait for itself for ever: it gets SQLite's own "database is locked" error at once instead."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 - open as long as the connection; closed with it or when dropped
        self._fd = self._file.fileno()
        self.held = False

    def acquire(self) -> None:
        held = _HELD.__dict__.setdefault("paths", set())
        if self.path in held:
            raise OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError(
                "database is locked: this thread already has a write transaction open"))
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True
        held.add(self.path)

    def release(self) -> None:
        if self.held:
            self.held = False
            _HELD.__dict__.setdefault("paths", set()).discard(self.path)
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        self._file.close()


class Checkpointer:
    """Copies committed WAL frames back into the database file from a daemon thread of the process
    that wrote them, every ``INTERVAL`` seconds while there are writes, alongside the writers.

    Such a checkpoint never lets the WAL start over from its beginning under steady writes: that
    takes a writer beginning while every frame is copied, and there is always a newer frame. So once
    the WAL holds more than ``WAL_RESTART_FRAMES``, the thread copies the last few frames while it
    holds the writers' lock, and the next writer starts the WAL over: its file is then written again
    from the start rather than grown without end. A process that stops writing leaves the rest to
    the next writer or to the last connection's close, as SQLite does.

    SQLite syncs the database file only at a checkpoint that copies every frame, which under steady
    writes is the one under the lock: it would then wait for every page copied since the last one,
    tens of milliseconds of random writes with the writers held up. So the thread syncs the file
    itself after each checkpoint (writers go on meanwhile), and copies and syncs once more just
    before it takes the lock: the pause is then the sync of the pages of the last few frames only."""

    INTERVAL = 0.1
    WAL_RESTART_FRAMES = 16384  # 64 MiB of 4 KiB pages

    def __init__(self, path: str):
        self.path = path
        self._pending = threading.Event()
        self._pid: Optional[int] = None
        self._start = threading.Lock()

    def written(self) -> None:
        if self._pid != os.getpid():  # first write in this process (gunicorn forks after the app is built)
            with self._start:
                if self._pid != os.getpid():
                    self._pending = threading.Event()
                    threading.Thread(target=self._run, name="casebridge-checkpoint", daemon=True).start()
                    self._pid = os.getpid()
        self._pending.set()

    def _run(self) -> None:
        pending = self._pending
        connection = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
        writers = WriterLock(f"{self.path}-writer.lock") if fcntl is not None else None
        database = os.open(self.path, os.O_RDONLY)
        try:
            while True:
                pending.wait()
                pending.clear()
                in_wal = self._checkpoint(connection, database)
                if in_wal is None:
                    pending.set()  # busy with another process's checkpoint: try again next round
                elif writers is not None and in_wal > self.WAL_RESTART_FRAMES:
                    self._checkpoint(connection, database)  # what came in during the last sync
                    writers.acquire()
                    try:
                        self._checkpoint(connection)  # copies every frame: SQLite syncs the file
                    finally:
                        writers.release()
                threading.Event().wait(self.INTERVAL)
        finally:  # pragma: no cover - a daemon thread ends with its process
            connection.close()
            os.close(database)

    @staticmethod
    def _checkpoint(connection: sqlite3.Connection, database: Optional[int] = None) -> Optional[int]:
        """The frames in the WAL since it last started over, all of them now copied (and with
        ``database``, the file descriptor of the database file, on disk); None when busy."""
        try:
            busy, in_wal, _copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return None
        if busy:
            return None
        if database is not None:
            _sync(database)
        return in_wal


def _sync(fd: int) -> None:
    """Write the file's changed pages to disk (its data: its size is SQLite's to sync). Where the
    system will not sync a file opened only to read, SQLite's own sync does it, later."""
    try:
        (getattr(os, "fdatasync", None) or os.fsync)(fd)
    except OSError:  # pragma: no cover - not on Linux
        pass
