"""HTTP throughput and latency of the service under gunicorn, printed as figures.

    python bench/http.py [--cases 1000,100000] [--duration 10] [--connections 32] [--workers 2]
                         [--database-url URL] [--client auto|wrk|python] [--keep]

For each number of stored cases (loaded straight through the store, in batches, not over HTTP), the
service is started the way it runs in production (``casebridge serve``: gunicorn, sync workers) on a
free loopback port and loaded with ``--connections`` concurrent keep-alive connections for
``--duration`` seconds per route:

  GET  /bench/trivial                                a Flask route answering a small JSON body, served by
                                                     bench/trivial_app.py in the same gunicorn setup: the floor
  GET  /cases/{id}/fhir                              a stored case as a FHIR Bundle
  GET  /fhir/CarePlan?patient={id}&category=assess-plan   a FHIR search
  POST /cases                                        a new case (a realistic record, unique ids)

Reads and searches pick among 500 stored cases at random. The load generator is wrk when it is
installed (``apt-get install wrk``), else a Python client: one thread a connection, http.client with
keep-alive (on 2 cores the Python client competes with the server for the CPU, so its figures are a
floor). Targets, printed met / NOT met: the reads at least 35% of the trivial route's throughput; a p99
latency of at most 100 ms on every service route; the search at the largest size within 2x of its median
latency at the smallest.

The cases go into a fresh SQLite file in a temporary directory, removed at the end (``--keep`` keeps it);
``--database-url`` names another database (PostgreSQL: a dedicated, empty one), loaded under an
organization of its own. Servers listen on 127.0.0.1 only and are stopped on exit, whatever happens.
"""
from __future__ import annotations

import sys
from pathlib import Path

# this file is named http.py: keep its directory off the import path, or it would shadow the standard
# library's http package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

DOCS = ROOT / "docs" / "case-record.md"  # the template: the example case of the record format
SCOPES = ["cases:read", "cases:write", "fhir:read", "fhir:write"]
SAMPLE = 500
BATCH = 1000
PLACEHOLDER = "__CASE_ID__"
READ_SHARE_TARGET = 0.35
P99_TARGET_MS = 100.0
SEARCH_GROWTH_TARGET = 2.0


# -- data ------------------------------------------------------------------------------------------
def template_case(organization_id: str, path: Optional[Path]) -> dict:
    if path is None:
        case = json.loads(re.search(r"## Example\n\n```json\n(.*?)```", DOCS.read_text(), re.S).group(1))
    else:
        case = json.loads(path.read_text())
    case["organization"]["id"] = organization_id
    return case


def variant(template: dict, case_id: str) -> dict:
    """The template as another client's case: its own case id, client id and identifiers."""
    case = orjson.loads(orjson.dumps(template))
    case["id"] = case_id
    client = case["client"]
    client["id"] = "p-" + case_id
    for ident in client.get("identifiers", ()):
        ident["value"] = f"{ident['value']}-{case_id}"
    return case


def load_cases(store, organization_id: str, template: dict, start: int, stop: int) -> None:
    """Cases ``start`` .. ``stop - 1``, through the store (with its save hooks: the FHIR search index),
    ``BATCH`` to a transaction."""
    for first in range(start, stop, BATCH):
        with store.transaction() as conn:
            for i in range(first, min(first + BATCH, stop)):
                store.add_case(organization_id, variant(template, f"bench-{i:07d}"), actor="bench", conn=conn)


def samples(store, organization_id: str) -> tuple[list[str], list[str]]:
    """Up to ``SAMPLE`` stored case ids and the Patient ids of their CarePlans, at random."""
    from sqlalchemy import func, select

    from service.store import cases, fhir_resources

    with store.engine.connect() as conn:
        case_ids = list(conn.execute(select(cases.c.id).where(cases.c.organization_id == organization_id)
                                     .order_by(func.random()).limit(SAMPLE)).scalars())
        patients = list(conn.execute(
            select(fhir_resources.c.patient_id).where(fhir_resources.c.organization_id == organization_id,
                                                      fhir_resources.c.resource_type == "CarePlan",
                                                      fhir_resources.c.case_id.in_(case_ids))).scalars())
    return case_ids, [p for p in patients if p]


# -- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A gunicorn in its own process group, logging to a file; stopped by ``stop`` (idempotent)."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, log: Path, env: dict):
        self.name, self.port, self.log = name, port, log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                status, _ = request("127.0.0.1", port, "GET", ready_path, {}, None)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not answer {ready_path} within 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's group: gunicorn and its workers
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


def service_server(database_url: str, workers: int, log: Path) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", "from service.cli import main; main()", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "--database-url", database_url]
    return Server("casebridge serve", argv, port, "/healthz", log, env)


def trivial_server(workers: int, log: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
            "--no-control-socket", "bench.trivial_app:app"]  # from ROOT (bench/ itself holds this http.py)
    return Server("trivial app", argv, port, "/bench/trivial", log, dict(os.environ))


def request(host: str, port: int, method: str, path: str, headers: dict, body: Optional[bytes]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- load ------------------------------------------------------------------------------------------
@dataclass
class Route:
    label: str
    method: str
    paths: list[str]
    expect: int
    headers: dict = field(default_factory=dict)
    body_template: Optional[str] = None  # with PLACEHOLDER where each request's unique id goes
    check: Optional[Callable[[bytes], Optional[str]]] = None  # a problem with the first answer, or None

    def body(self, unique: str) -> Optional[bytes]:
        return None if self.body_template is None else self.body_template.replace(PLACEHOLDER, unique).encode()


@dataclass
class Result:
    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    requests: int = 0
    errors: int = 0
    error: Optional[str] = None


def probe(port: int, route: Route, tag: str) -> Optional[str]:
    """Why the route cannot be measured (its first answer is not the expected one), or None."""
    try:
        status, body = request("127.0.0.1", port, route.method, route.paths[0], route.headers,
                               route.body(f"{tag}-probe"))
    except OSError as error:
        return f"no answer: {error}"
    if status != route.expect:
        return f"answered {status}, not {route.expect}: {body[:300].decode(errors='replace')}"
    return route.check(body) if route.check else None


def run_wrk(port: int, route: Route, tag: str, duration: int, connections: int, workdir: Path) -> Result:
    script = workdir / f"{tag}.lua"
    lines = [f"wrk.method = {lua(route.method)}"]
    lines += [f"wrk.headers[ {lua(k)} ] = {lua(v)}" for k, v in route.headers.items()]
    lines.append("local paths = {" + ", ".join(lua(p) for p in route.paths) + "}")
    lines.append(f"local template = {lua(route.body_template or '')}")
    lines.append(f"local has_body = {'true' if route.body_template is not None else 'false'}")
    lines.append(f"local tag = {lua(tag)}")
    lines.append(textwrap_lua)
    script.write_text("\n".join(lines))
    threads = max(1, min(2, connections))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s",
            "-s", str(script), f"http://127.0.0.1:{port}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        return Result(error=f"wrk failed: {out.stderr.strip() or out.stdout.strip()}")
    return parse_wrk(out.stdout)


textwrap_lua = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
function init(args)
  math.randomseed(os.time() * 100 + tid)
end
function request()
  local path = paths[math.random(#paths)]
  if has_body then
    n = n + 1
    local body = template:gsub("__CASE_ID__", string.format("%s-%d-%d", tag, tid, n))
    return wrk.format(nil, path, nil, body)
  end
  return wrk.format(nil, path)
end
"""


def lua(value: str) -> str:
    level = 1
    while f"]{'=' * level}]" in value:
        level += 1
    return f"[{'=' * level}[{value}]{'=' * level}]"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> Result:
    def latency(pct: str) -> float:
        match = re.search(rf"^\s*{pct}%\s+([0-9.]+)(us|ms|s|m)\s*$", text, re.M)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    total = re.search(r"^\s*([0-9]+) requests in", text, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Result(rps=float(rps.group(1)) if rps else 0.0, p50=latency(50), p99=latency(99),
                  requests=int(total.group(1)) if total else 0, errors=errors)


def run_python(port: int, route: Route, tag: str, duration: int, connections: int) -> Result:
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start_gate = threading.Barrier(connections + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n = 0
        start_gate.wait()
        while time.perf_counter() < stop_at[0]:
            n += 1
            path = rng.choice(route.paths)
            body = route.body(f"{tag}-{index}-{n}")
            began = time.perf_counter()
            try:
                conn.request(route.method, path, body=body, headers=route.headers)
                response = conn.getresponse()
                response.read()
                if response.status >= 400:
                    errors[index] += 1
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            latencies[index].append((time.perf_counter() - began) * 1000)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    began = time.perf_counter()
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    every = sorted(x for per in latencies for x in per)
    if not every:
        return Result(error="no request completed")
    return Result(rps=len(every) / elapsed, p50=percentile(every, 50), p99=percentile(every, 99),
                  requests=len(every), errors=sum(errors))


def percentile(ordered: list[float], pct: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


# -- the run ---------------------------------------------------------------------------------------
def one_entry_bundle(body: bytes) -> Optional[str]:
    try:
        bundle = json.loads(body)
    except ValueError:
        return "the answer is not JSON"
    if bundle.get("resourceType") != "Bundle":
        return f"the answer is a {bundle.get('resourceType')}, not a Bundle"
    matches = [e for e in bundle.get("entry", ()) if e.get("search", {}).get("mode", "match") == "match"]
    if len(matches) != 1:
        return f"the search found {len(matches)} CarePlans, not 1"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1000,100000", help="stored cases to measure at, ascending (1000,100000)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per route")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers, for the service and the floor")
    parser.add_argument("--database-url", help="a dedicated database (default: a fresh SQLite file)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured load before each read route")
    parser.add_argument("--template", type=Path,
                        help="a case record to store (varied) and post (default: the example of docs/case-record.md)")
    parser.add_argument("--routes", default="trivial,read,search,post",
                        help="which routes to load, comma-separated among trivial, read, search, post (all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (database, logs)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.cases.split(",") if s.strip()})
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk") is not None)
    if use_wrk and shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk), use --client python")

    workdir = Path(tempfile.mkdtemp(prefix="casebridge-bench-"))
    servers: list[Server] = []
    try:
        return bench(args, sizes, use_wrk, workdir, servers)
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def bench(args, sizes: list[int], use_wrk: bool, workdir: Path, servers: list) -> int:
    from service import auth, create_app

    database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
    app = create_app({"database_url": database_url})  # migrates; the store carries the FHIR index hook
    store = app.extensions["casebridge"].store
    organization = f"bench-{uuid.uuid4().hex[:8]}"
    key = auth.create_key(store, organization, SCOPES, label="bench/http.py")
    template = template_case(organization, args.template)
    from service import schemas
    schemas.load_case(template)  # the template is a valid record

    client = "wrk" if use_wrk else f"Python (http.client, {args.connections} threads)"
    print(f"casebridge HTTP bench: gunicorn, {args.workers} sync workers; {args.connections} connections, "
          f"{args.duration} s a route; load generator: {client}; {os.cpu_count()} CPUs")
    print(f"database: {'SQLite (temporary file)' if not args.database_url else 'given by --database-url'}")

    trivial = trivial_server(args.workers, workdir / "trivial.log")
    servers.append(trivial)
    auth_header = {"Authorization": f"Bearer {key}"}
    post_template = json.dumps(variant(template, PLACEHOLDER))
    rows: list[tuple[int, str, Result]] = []
    loaded = 0
    for size in sizes:
        began = time.perf_counter()
        load_cases(store, organization, template, loaded, size)
        took = time.perf_counter() - began
        if size > loaded:
            print(f"loaded {size - loaded} cases in {took:.1f} s ({(size - loaded) / took:.0f} cases/s)")
        loaded = size
        case_ids, patients = samples(store, organization)
        store.engine.dispose()  # nothing of the loader's stays open while the servers run
        service = service_server(database_url, args.workers, workdir / f"service-{size}.log")
        servers.append(service)
        routes = [
            ("trivial", trivial, Route("GET /bench/trivial (floor)", "GET", ["/bench/trivial"], 200)),
            ("read", service, Route("GET /cases/{id}/fhir", "GET", [f"/cases/{c}/fhir" for c in case_ids], 200,
                            auth_header)),
            ("search", service, Route("GET /fhir/CarePlan?patient&category", "GET",
                            [f"/fhir/CarePlan?patient={p}&category=assess-plan" for p in patients] or
                            ["/fhir/CarePlan?patient=none&category=assess-plan"], 200, auth_header,
                            check=one_entry_bundle)),
            ("post", service, Route("POST /cases", "POST", ["/cases"], 201,
                            {**auth_header, "Content-Type": "application/json"}, post_template)),
        ]
        wanted = {name.strip() for name in args.routes.split(",")}
        for name, server, route in routes:
            if name not in wanted:
                continue
            tag = f"r{size}-{len(rows)}-{uuid.uuid4().hex[:4]}"
            problem = probe(server.port, route, tag)
            if problem is not None:
                result = Result(error=problem)
            else:
                run = (lambda d, t: run_wrk(server.port, route, t, d, args.connections, workdir)) if use_wrk \
                    else (lambda d, t: run_python(server.port, route, t, d, args.connections))
                if route.method == "GET" and args.warmup:
                    run(args.warmup, tag + "w")  # steady state: every worker has seen the sampled cases once
                result = run(args.duration, tag)
            rows.append((size, route.label, result))
            show(size, route.label, result)
        service.stop()
        servers.remove(service)
    return report(rows, sizes)


def show(size: int, label: str, r: Result) -> None:
    if not show.header_done:
        print(f"\n{'cases':>7}  {'route':<38} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        show.header_done = True
    if r.error:
        print(f"{size:>7}  {label:<38} ERROR: {r.error}")
    else:
        print(f"{size:>7}  {label:<38} {r.rps:>9.0f} {r.p50:>8.1f} {r.p99:>8.1f} {r.errors:>7}")


show.header_done = False


def report(rows, sizes: list[int]) -> int:
    by = {(size, label): r for size, label, r in rows}
    verdicts: list[bool] = []

    def verdict(ok: bool) -> str:
        verdicts.append(ok)
        return "met" if ok else "NOT met"

    print("\ntargets")
    for size in sizes:
        floor = by.get((size, "GET /bench/trivial (floor)"))
        for label in ("GET /cases/{id}/fhir", "GET /fhir/CarePlan?patient&category"):
            r = by.get((size, label))
            if r is None or r.error or floor is None or floor.error or not floor.rps:
                print(f"  {size:>7} cases  {label}: not measured")
                verdicts.append(False)
                continue
            share = r.rps / floor.rps
            print(f"  {size:>7} cases  {label}: {share:.0%} of the trivial route's throughput "
                  f"(target >= {READ_SHARE_TARGET:.0%}): {verdict(share >= READ_SHARE_TARGET and r.errors == 0)}")
        for label in ("GET /cases/{id}/fhir", "GET /fhir/CarePlan?patient&category", "POST /cases"):
            r = by.get((size, label))
            if r is not None and not r.error:
                print(f"  {size:>7} cases  {label}: p99 {r.p99:.1f} ms (target <= {P99_TARGET_MS:.0f} ms): "
                      f"{verdict(r.p99 <= P99_TARGET_MS)}")
    if len(sizes) > 1:
        label = "GET /fhir/CarePlan?patient&category"
        small, large = by.get((sizes[0], label)), by.get((sizes[-1], label))
        if small and large and not small.error and not large.error:
            growth = large.p50 / small.p50
            print(f"  search at {sizes[-1]} cases vs {sizes[0]}: median {large.p50:.1f} ms vs {small.p50:.1f} ms, "
                  f"{growth:.2f}x (target <= {SEARCH_GROWTH_TARGET:.0f}x): {verdict(growth <= SEARCH_GROWTH_TARGET)}")
        else:
            print(f"  search at {sizes[-1]} cases vs {sizes[0]}: not measured")
            verdicts.append(False)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
