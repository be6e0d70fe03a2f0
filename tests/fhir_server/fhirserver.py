"""A real FHIR R4 server for integration tests: Medplum's in-memory FHIR router behind ``server.mjs``.

    with FhirServer("epic", session_ttl=1) as server:
        requests.get(f"{server.base_url}/Patient")
        server.control(fault_503=0.3)      # change faults and timings at run time
        server.stats()                     # {"requests": ..., "writes": ..., "drops": ..., ...}
        server.reset()                     # empty store, zero stats, settings as launched

The Node dependencies are installed with ``npm ci`` the first time (and whenever package-lock.json
changes). Without node/npm, or when the install fails, the server calls ``pytest.skip`` with the
reason; tests/conftest.py turns that skip into a failure under CI=true.
"""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "server.mjs"
NODE_MODULES = HERE / "node_modules"
INSTALL_STAMP = NODE_MODULES / ".casebridge-lock-sha256"
MIN_NODE = (20, 19)  # @medplum/* 4.5.2 declare engines ^20.19.0 || >=22.12.0
NPM_CI = ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"]
PROFILES = ("full", "epic", "oracle")
#: the partner profile (adapters.profiles) a casebridge partner record for each server profile names:
#: the full server is Medplum's router, which caps a transaction holding conditional creates at 8 entries
PARTNER_PROFILES = {"full": "medplum", "epic": "epic", "oracle": "oracle"}

# Python keyword → the server's /_control setting
_SETTINGS = {
    "fault_503": "fault503",
    "fault_drop": "faultDrop",
    "seed": "seed",
    "session_ttl": "sessionTtl",
    "token_ttl": "tokenTtl",
    "require_token": "requireToken",
    "validate": "validate",
}

install_seconds: float | None = None  # how long this process's `npm ci` took, if it ran one
_install_failure: str | None = None


def _lock_digest() -> str:
    return hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()


def _node_problem() -> str | None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return f"the test FHIR server needs Node.js {MIN_NODE[0]}.{MIN_NODE[1]}+ and npm on PATH (node={node}, npm={npm})"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        found = tuple(int(part) for part in version.lstrip("v").split(".")[:2])
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        return f"cannot tell the Node.js version: {error}"
    if found < MIN_NODE:
        return f"the test FHIR server needs Node.js >= {MIN_NODE[0]}.{MIN_NODE[1]} (@medplum/fhir-router), found {version}"
    return None


def ensure_installed() -> None:
    """Runs ``npm ci`` in tests/fhir_server unless node_modules matches package-lock.json; skips on failure."""
    global install_seconds, _install_failure
    if _install_failure:
        pytest.skip(_install_failure)
    problem = _node_problem()
    if problem:
        _install_failure = problem
        pytest.skip(problem)
    digest = _lock_digest()
    with _install_lock():
        if INSTALL_STAMP.is_file() and INSTALL_STAMP.read_text().strip() == digest:
            return
        started = time.monotonic()
        try:
            done = subprocess.run(NPM_CI, cwd=HERE, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            _install_failure = f"`{' '.join(NPM_CI)}` in {HERE} failed: {error}"
            pytest.skip(_install_failure)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-2000:]
            _install_failure = f"`{' '.join(NPM_CI)}` in {HERE} exited {done.returncode}: {tail}"
            pytest.skip(_install_failure)
        install_seconds = time.monotonic() - started
        INSTALL_STAMP.write_text(digest + "\n")


class _install_lock:
    """An exclusive file lock, so parallel test workers run ``npm ci`` once."""

    def __enter__(self) -> None:
        path = Path(tempfile.gettempdir()) / f"casebridge-fhir-server-{hashlib.sha1(str(HERE).encode()).hexdigest()[:12]}.lock"
        self._file = open(path, "w")  # noqa: SIM115 - closed in __exit__
        try:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, the install may just run twice
            pass

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class FhirServer:
    """One ``node server.mjs`` process on a free loopback port; a context manager that always stops it."""

    def __init__(
        self,
        profile: str = "full",
        *,
        fault_503: float = 0.0,
        fault_drop: float = 0.0,
        seed: int = 42,
        session_ttl: float = 5.0,
        token_ttl: float = 300.0,
        require_token: str | None = None,
        validate: bool = True,
        log: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        self.profile = profile
        self.args = [
            "--port", "0", "--profile", profile,
            "--fault-503", str(fault_503), "--fault-drop", str(fault_drop), "--seed", str(seed),
            "--session-ttl", str(session_ttl), "--token-ttl", str(token_ttl),
        ]
        if require_token:
            self.args += ["--require-token", require_token]
        if not validate:
            self.args.append("--no-validate")
        if log:
            self.args.append("--log")
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stderr = None
        self._http = requests.Session()

    @property
    def partner_profile(self) -> str:
        """The ``profile`` of a casebridge partner record for this server."""
        return PARTNER_PROFILES[self.profile]

    # -- addresses
    @property
    def root_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the FHIR server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/fhir/R4"

    @property
    def token_url(self) -> str:
        return f"{self.root_url}/oauth/token"

    # -- life cycle
    def start(self) -> FhirServer:
        ensure_installed()
        self._stderr = tempfile.TemporaryFile(mode="w+", prefix="fhir-server-", suffix=".log")
        started = time.monotonic()
        self._process = subprocess.Popen(
            ["node", str(SERVER_SCRIPT), *self.args, "--exit-on-stdin-close"],
            cwd=HERE,
            stdin=subprocess.PIPE,  # the server exits when this closes, even if we die without stop()
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_drain, args=(self._process.stdout, lines), daemon=True).start()
        try:
            line = lines.get(timeout=self.startup_timeout)
        except queue.Empty:
            line = None
        if not line or not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"the FHIR server did not start ({self.args}): stdout {line!r}; stderr:\n{self.stderr()}")
        self.port = int(line.split()[1])
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            try:
                if process.stdin:
                    process.stdin.close()
                process.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                process.terminate()
                try:
                    process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._http.close()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-4000:]

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control
    def control(self, **settings: Any) -> dict:
        """Changes settings at run time: fault_503, fault_drop, seed, session_ttl, token_ttl, require_token, validate."""
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(_SETTINGS)}")
        body = {_SETTINGS[name]: value for name, value in settings.items()}
        return self._control("POST", "/_control", body)["settings"]

    def settings(self) -> dict:
        return self._control("GET", "/_control")["settings"]

    def stats(self) -> dict:
        """{"requests", "writes", "drops", "fault503", "unauthorized", "statuses": {"200": n, ...}} since the last reset."""
        return self._control("GET", "/_control/stats")

    def reset(self) -> None:
        """Empties the store and zeroes the stats; settings, RNG, tokens and search sessions as at launch."""
        self._control("POST", "/_control/reset")

    def load(self, *resources: dict) -> list[dict]:
        """Stores resources past the profile's rules (a CarePlan in 'epic', say); ids given are kept."""
        bundle = self._control("POST", "/_control/seed", list(resources))
        return [entry["resource"] for entry in bundle["entry"]]

    def token(self, **form: str) -> str:
        """An access token from the server's client_credentials endpoint."""
        reply = self._http.post(self.token_url, data={"grant_type": "client_credentials", **form}, timeout=10)
        reply.raise_for_status()
        return reply.json()["access_token"]

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        reply = self._http.request(method, self.root_url + path, json=body, timeout=10)
        if reply.status_code >= 400:
            raise RuntimeError(f"{method} {path} → {reply.status_code}: {reply.text}")
        return reply.json()


def _drain(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)
