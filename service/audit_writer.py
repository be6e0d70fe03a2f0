"""How audit rows reach the database: in batches from a background thread (:class:`AuditWriter`),
and, while the database does not take them, through a spool file in the home folder (:class:`Spool`)
from which they are written in order and once each when it takes them again, or when the app next
starts. A row holds ids, never case contents (``service.audit`` makes them)."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import orjson
from sqlalchemy import insert, or_, select

from service.store import Store, audit_events

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: one process uses the spool at a time
    fcntl = None

log = logging.getLogger("casebridge.audit")


def spool_path(home: Path, store: Store) -> Path:
    """Where the rows ``store``'s database did not take wait, in the home folder: a file for each
    database, so that a home shared by several (tests, a move to PostgreSQL) never writes the rows
    of one into another."""
    url = store.engine.url.render_as_string(hide_password=True)
    return Path(home) / "audit-spool" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.jsonl"


class AuditWriter:
    """Writes audit rows in batches from a background thread, so a read does not wait for a write
    (and, on SQLite, for the database's one write lock). Rows are written within ``interval``
    seconds, at exit, and before anything reads the trail (``flush``). Each write also makes every
    other connection read its pages again, so it comes a few times a second, not more.

    Rows the database refuses go to the spool at once, so memory holds only the rows of the next
    write; rows that come while the spool holds some go in behind them, so the trail keeps its
    order. The spool is tried again after ``interval`` seconds, then twice as long each time up to
    ``RETRY_MAX``, at every ``flush`` and at startup; the first try the database takes writes it."""

    RETRY_MAX = 5.0
    #: while the spool waits, how often it is said again (the first failure is logged at once)
    REMIND_EVERY = 60.0
    #: rows held in memory when neither the database nor the spool takes them (a full disk); past
    #: this many the oldest are dropped, loudly
    MAX_WAITING = 100_000

    def __init__(self, store: Store, spool: "Spool", interval: float = 0.25, batch: int = 500):
        import atexit
        import threading

        self.store, self.spool, self.interval, self.batch = store, spool, interval, batch
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = None
        self._closed = False
        self._delay, self._retry_at = interval, 0.0
        self._failing = self._spool_failing = False  # each logged once, until it works again
        self._reminded = 0.0
        atexit.register(self.flush)

    def add(self, row: dict) -> None:
        import threading

        with self._lock:
            self._rows.append(row)
            if self._pid != os.getpid():  # first row in this process (gunicorn forks after the app is built)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="casebridge-audit", daemon=True)
                self._thread.start()
        if len(self._rows) >= self.batch:
            self._wake.set()

    def close(self) -> None:
        """Stop the background thread, then write what waits (into the spool, if the database will
        not take it): for a writer whose app is done with."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self._closed:
                self._write(retry_spool=time.monotonic() >= self._retry_at)

    def flush(self) -> None:
        """Write every row waiting, the spool's first."""
        self._write(retry_spool=True)

    def _write(self, retry_spool: bool) -> None:
        with self._flushing:
            with self._lock:
                rows, self._rows = self._rows, []
            if self.spool.holds_rows():
                self._to_spool(rows)  # behind the older rows
                if retry_spool:
                    self._replay()
                return
            if not rows:
                return
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(insert(audit_events), rows)
            except Exception as error:  # noqa: BLE001 - the spool keeps them until the database is back
                log.error("could not write %d audit events: %s; they wait in the spool", len(rows),
                          type(error).__name__)
                self._reminded = time.monotonic()
                self._failed()
                self._to_spool(rows)
                return
            self._succeeded()

    def _to_spool(self, rows: list[dict]) -> None:
        if not rows:
            return
        try:
            self.spool.append(rows)
        except OSError as error:
            with self._lock:
                self._rows[:0] = rows
                dropped = max(0, len(self._rows) - self.MAX_WAITING)
                del self._rows[:dropped]
            if not self._spool_failing or dropped:
                log.error("could not spool %d audit events: %s; %d dropped", len(rows), type(error).__name__,
                          dropped)
            self._spool_failing = True
            return
        self._spool_failing = False

    def _replay(self) -> None:
        try:
            written = self.spool.replay(self.store.engine)
        except Exception as error:  # noqa: BLE001 - they stay in the spool for the next try
            if not self._failing or time.monotonic() - self._reminded >= self.REMIND_EVERY:
                self._reminded = time.monotonic()
                log.error("the audit spool waits for the database: %s", type(error).__name__)
            self._failed()
            return
        self._succeeded()
        if written:
            log.info("wrote %d audit events from the spool", written)

    def _failed(self) -> None:
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.RETRY_MAX)
        self._failing = True

    def _succeeded(self) -> None:
        self._delay, self._retry_at, self._failing = self.interval, 0.0, False


class Spool:
    """Audit rows waiting for the database: one JSON object a line, in a file only the service's
    user may read (the rows hold ids, never case contents).

    The processes of one app share the file: each append and each replay holds an exclusive lock on
    it. A replay writes the rows in chunks, each in a transaction of its own, and empties the file
    only once every chunk is committed. Each row carries an id of its own (``detail.spool``) and a
    replay leaves out the rows the database holds already, so a replay cut short (the process killed
    after a commit) writes none of them twice when it is done again."""

    CHUNK = 1000

    def __init__(self, path: Path):
        self.path = Path(path)

    def holds_rows(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def append(self, rows: Sequence[dict]) -> None:
        lines = b"".join(_spool_line(row) for row in rows)
        with self._locked() as file:
            if file.seek(0, os.SEEK_END) and not _ends_a_line(file):
                lines = b"\n" + lines  # a line cut short by a crash stays apart from these
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())

    def replay(self, engine) -> int:
        """Write the rows into the database, then empty the file; how many rows were new."""
        written = 0
        with self._locked() as file:
            file.seek(0)
            for chunk in _chunks(_spooled_rows(file), self.CHUNK):
                with engine.begin() as conn:
                    new = _not_written(conn, chunk)
                    if new:
                        conn.execute(insert(audit_events), new)
                written += len(new)
            file.truncate(0)
            file.flush()
            os.fsync(file.fileno())
        return written

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a+b") as file:
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # let go when the file closes
            yield file


def _spool_line(row: dict) -> bytes:
    detail = {**(row.get("detail") or {})}
    detail.setdefault("spool", uuid.uuid4().hex)
    return orjson.dumps({**row, "recorded_at": row["recorded_at"].isoformat(), "detail": detail}) + b"\n"


def _ends_a_line(file) -> bool:
    file.seek(-1, os.SEEK_END)
    return file.read(1) == b"\n"


def _spooled_rows(file) -> Iterator[dict]:
    unreadable = 0
    for line in file:
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
            row["recorded_at"] = dt.datetime.fromisoformat(row["recorded_at"])
        except (ValueError, KeyError, TypeError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("detail"), dict) or "spool" not in row["detail"]:
            unreadable += 1  # a line cut short by a crash
            continue
        yield row
    if unreadable:
        log.error("skipped %d unreadable lines of the audit spool", unreadable)


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _not_written(conn, chunk: list[dict]) -> list[dict]:
    """The rows of ``chunk`` the database does not hold yet, by their spool ids (looked for only
    among rows of the same organizations recorded since the chunk's first)."""
    spool_id = audit_events.c.detail["spool"].as_string()
    organizations = {row["organization_id"] for row in chunk}
    of_theirs = [audit_events.c.organization_id.in_(sorted(organizations - {None}))]
    if None in organizations:
        of_theirs.append(audit_events.c.organization_id.is_(None))
    held = set(conn.execute(select(spool_id).where(
        or_(*of_theirs), audit_events.c.recorded_at >= min(row["recorded_at"] for row in chunk),
        spool_id.in_([row["detail"]["spool"] for row in chunk]))).scalars())
    return [row for row in chunk if row["detail"]["spool"] not in held]
