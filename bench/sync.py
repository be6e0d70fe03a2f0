"""Push throughput of the sync workers against the local FHIR server, next to a direct client; and the
time and memory to drain a backlog of case updates. Prints figures; not a test.

    python bench/sync.py [--cases 300] [--rounds 3] [--backlog-cases 2000] [--backlog-updates 5]
                         [--concurrency 2] [--broker redis|sqlite]

1. Push rate: ``--cases`` minimal cases are stored, then one Celery worker with ``--concurrency``
   pool processes (prefork: the "2 workers"; each pushes up to ``CASEBRIDGE_PUSH_THREADS``, 4, cases
   at once) pushes them to tests/fhir_server (profile full, registered as the medplum partner profile:
   transactions of at most 8 entries; two client threads already keep its one Node thread busy).
   Resources per second = our
   resources now at the server / seconds from the first write to the last case synced. Beside it, two
   direct clients (a plain ``requests`` session per thread, the same number of threads) against a fresh
   copy of the same server (warmed up before anything is measured: its JIT makes what runs first slower):
   - the same requests: one transaction Bundle per case holding its resources, with the same
     ``ifNoneExist``, as the workers send them. The ratio to this one is the target: the workers reach
     at least 70% of it (met / NOT met), the median over ``--rounds`` rounds of all three;
   - one POST per resource, with the same If-None-Exist header, as a client without Bundles would.
2. Backlog: ``--backlog-cases`` minimal cases each saved and then updated ``--backlog-updates - 1``
   times (2,000 x 5 = 10,000 case versions) before a worker starts; the time until every case is synced
   at its last version, and the peak RSS of the worker's processes (VmHWM from /proc, summed). The
   outbox folds the versions of a case waiting together into one push, so far fewer than 10,000
   pushes are made.

Redis (db 13, flushed) is the broker when it answers, else the embedded SQLite one.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/http.py would shadow the standard library's http package: keep this directory off the path
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import requests  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/13"
ORG = "org-1"


def broker_url(kind: str, home: Path) -> str:
    if kind in ("redis", "auto"):
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            client.ping()
            client.flushdb()
            return REDIS_URL
        except Exception as error:  # noqa: BLE001
            if kind == "redis":
                raise SystemExit(f"Redis is not reachable at {REDIS_URL}: {error}")
    return f"sqla+sqlite:///{home / 'broker.db'}"


def minimal(i: int, prefix: str) -> dict:
    return {"id": f"{prefix}-{i:05d}", "program": "other", "status": "active", "title": f"{prefix} {i} v1",
            "organization": {"id": ORG}, "client": {"id": f"{prefix}-client-{i:05d}", "names": [{"family": f"F{i}"}]}}


class Instance:
    def __init__(self, server, broker: str):
        from service import create_app, partners

        self.dir = tempfile.TemporaryDirectory(prefix="cb-bench-")
        home = Path(self.dir.name)
        self.env = {"CASEBRIDGE_HOME": str(home), "CASEBRIDGE_DATABASE_URL": f"sqlite:///{home / 'casebridge.db'}",
                    "CASEBRIDGE_BROKER_URL": broker_url(broker, home)}
        os.environ.update(self.env)
        self.app = create_app()
        self.store = self.app.extensions["casebridge"].store
        partners.save_partner(self.store, {"id": "p1", "name": "bench", "kind": "ehr", "base_url": server.base_url,
                                           "organizations": [ORG], "profile": server.partner_profile})
        partners.check_capabilities(self.store, "p1")
        self.worker = None

    def add(self, data: dict):
        from service import schemas

        return self.store.add_case(ORG, schemas.dump_case(schemas.load_case(data)))

    def update(self, stored, n: int):
        from service import schemas

        data = copy.deepcopy(stored.data)
        data["title"] = f"{data['title'].rsplit(' v', 1)[0]} v{n}"
        return self.store.update_case(ORG, stored.id, stored.version, schemas.dump_case(schemas.load_case(data)))

    def start(self, concurrency: int) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--beat", "--pool", "prefork", "--concurrency",
             str(concurrency), "--loglevel", "WARNING"],
            cwd=ROOT, env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.dir.cleanup()

    def unsynced(self) -> int:
        from sqlalchemy import func, or_, select

        from service.sync_store import sync_state

        with self.store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(sync_state).where(or_(
                sync_state.c.status != "synced", sync_state.c.synced_version < sync_state.c.wanted_version))).scalar()

    def peak_rss_mb(self) -> float:
        """VmHWM of the worker process and its children (the pool processes, the schedule), MB, summed."""
        total = 0
        pids = [self.worker.pid]
        try:
            children = Path(f"/proc/{self.worker.pid}/task/{self.worker.pid}/children").read_text().split()
            pids += [int(p) for p in children]
        except OSError:
            pass
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024


def drain(instance, server, timeout: float, sample=None) -> tuple[float, float]:
    """Seconds from the first write at the partner to nothing left unsynced; and from worker start."""
    started = time.monotonic()
    first_write = None
    while time.monotonic() - started < timeout:
        if first_write is None and server.stats()["writes"] > 0:
            first_write = time.monotonic()
        if sample:
            sample()
        if first_write is not None and instance.unsynced() == 0:
            end = time.monotonic()
            return end - first_write, end - started
        time.sleep(0.02)  # a push round lasts a few seconds: a coarser poll would blur it
    raise SystemExit(f"not drained within {timeout}s ({instance.unsynced()} cases left)")


def direct_rate(server, requests_to_send: list[tuple[str, dict, dict]], resources: int, threads: int) -> float:
    """Resources a second a plain requests client writes, ``threads`` sessions at once, each POSTing
    its share of ``requests_to_send`` ((path, body, extra headers) each)."""
    chunks = [requests_to_send[i::threads] for i in range(threads)]

    def run(chunk):
        session = requests.Session()
        for path, body, headers in chunk:
            reply = session.post(f"{server.base_url}/{path}", json=body, timeout=30,
                                 headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
                                          "Prefer": "return=representation", **headers})
            reply.raise_for_status()

    workers = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return resources / (time.monotonic() - started)


def outgoing_bodies(cases: list[dict]) -> list[list[dict]]:
    """What the workers send for these cases (our resources, with our sync identifier), as plain
    bodies, case by case: each resource once (cases of one organization share its Organization)."""
    from mappings.export import case_resources
    from service import schemas, sync

    seen, by_case = set(), []
    for data in cases:
        bodies = []
        for resource in sync._ordered(case_resources(schemas.load_case(data))):
            key = (resource["resourceType"], resource["id"])
            if key in seen:
                continue
            seen.add(key)
            bodies.append(sync.outgoing(resource, _AllKnown()))
        by_case.append(bodies)
    return by_case


def _if_none_exist(body: dict) -> str:
    ident = body["identifier"][-1]  # our sync identifier, whose value is our id
    return f"identifier={ident['system']}|{ident['value']}"


def as_transactions(by_case: list[list[dict]]) -> list[tuple[str, dict, dict]]:
    """One transaction a case, as the workers send a new case's resources."""
    from service import sync_bundles

    return [("", sync_bundles.bundle("transaction", [
        sync_bundles.Write(b["resourceType"], b["identifier"][-1]["value"], b, if_none_exist=_if_none_exist(b)) for b in bodies]), {})
        for bodies in by_case if bodies]


def as_single_posts(by_case: list[list[dict]]) -> list[tuple[str, dict, dict]]:
    return [(b["resourceType"], b, {"If-None-Exist": _if_none_exist(b)}) for bodies in by_case for b in bodies]


class _AllKnown(dict):
    """A ledger where every reference is already at the partner (under our own id)."""

    def get(self, key, default=None):
        return type("Row", (), {"remote_id": key[1]})()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--backlog-cases", type=int, default=2000)
    parser.add_argument("--backlog-updates", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", default="auto", choices=["auto", "redis", "sqlite"])
    options = parser.parse_args()

    from fhir_server.fhirserver import FhirServer

    with FhirServer("full") as server:
        # 1. push rate, workers vs a direct client
        cases = [minimal(i, "rate") for i in range(options.cases)]
        by_case = outgoing_bodies(cases)  # each of our resources, once: what the workers write
        resources = sum(len(bodies) for bodies in by_case)
        # the server compiles its code paths as it first runs them: warm it up, so that what runs first
        # is not measured slower for it
        direct_rate(server, as_transactions(by_case), resources, options.concurrency)
        server.reset()
        rounds = []
        for _ in range(options.rounds):  # the machine's speed drifts: each round measures all three
            server.reset()
            instance = Instance(server, options.broker)
            try:
                for data in cases:
                    instance.add(data)
                instance.start(options.concurrency)
                pushing, _ = drain(instance, server, timeout=600)
                stats = server.stats()
            finally:
                instance.stop()
            server.reset()
            bundled = direct_rate(server, as_transactions(by_case), resources, options.concurrency)
            server.reset()
            single = direct_rate(server, as_single_posts(by_case), resources, options.concurrency)
            rounds.append((resources / pushing, bundled, single, pushing, stats))
        broker = "Redis" if instance.env["CASEBRIDGE_BROKER_URL"].startswith("redis") else "embedded SQLite"
        stats = rounds[0][4]
        print(f"push rate ({options.cases} minimal cases, {resources} resources in {stats['writes']} write requests, "
              f"{stats['requests']} requests in all, broker {broker}, 1 worker, {options.concurrency} pool "
              f"processes; {options.rounds} rounds, resources/s):")
        print("  round  workers  direct, same requests (ratio)  direct, one POST each (ratio)")
        for i, (workers, bundled, single, pushing, _) in enumerate(rounds, 1):
            print(f"  {i:5d}  {workers:7.1f}  {bundled:21.1f} ({workers / bundled:4.0%})  "
                  f"{single:21.1f} ({workers / single:4.0%})")
        ratio = statistics.median(workers / bundled for workers, bundled, *_ in rounds)
        print(f"  median ratio to the same requests {ratio:4.0%}  target >= 70%: {'met' if ratio >= 0.7 else 'NOT met'};"
              f" to one POST each {statistics.median(w / single for w, _, single, *_ in rounds):4.0%}")

        # 2. backlog
        server.reset()
        n, k = options.backlog_cases, options.backlog_updates
        instance = Instance(server, options.broker)
        try:
            loading = time.monotonic()
            for i in range(n):
                stored = instance.add(minimal(i, "backlog"))
                for version in range(2, k + 1):
                    stored = instance.update(stored, version)
            loaded = time.monotonic() - loading
            instance.start(options.concurrency)
            peak = [0.0]

            def sample():
                peak[0] = max(peak[0], instance.peak_rss_mb())

            pushing, total = drain(instance, server, timeout=3600, sample=sample)
            sample()
            stats = server.stats()
        finally:
            instance.stop()
        print(f"backlog: {n} cases x {k} versions = {n * k} case updates waiting (stored in {loaded:.0f} s), "
              f"1 worker, {options.concurrency} pool processes:")
        print(f"  drained in     {total:8.1f} s from worker start ({pushing:.1f} s from the first write); "
              f"{stats['writes']} write requests (transactions), {stats['requests']} requests")
        print(f"  peak RSS       {peak[0]:8.1f} MB (the worker's processes, VmHWM summed)")


if __name__ == "__main__":
    main()
