"""``casebridge serve``: gunicorn on the embedded default (SQLite in a fresh home), from nothing to an
authenticated request, with a key made by ``casebridge keys create`` against the same database."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _casebridge() -> list[str]:
    script = Path(sys.executable).with_name("casebridge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"casebridge serve exited with status {server.returncode}")
        try:  # the port opens before the workers have booted: a request may wait, or be refused
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} seconds")


def test_serve_from_nothing_to_an_authenticated_request(tmp_path: Path) -> None:
    home = tmp_path / "home"  # missing: serve creates it
    env = dict(os.environ, CASEBRIDGE_HOME=str(home),
               CASEBRIDGE_DATABASE_URL=f"sqlite:///{home / 'casebridge.db'}")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([*_casebridge(), "serve", "--port", str(port), "--workers", "2"], env=env,
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(f"{base}/healthz", server)
        assert (home / "casebridge.db").exists()
        ready = requests.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["database"] == "reachable"

        assert requests.get(f"{base}/audit", timeout=30).status_code == 401
        created = subprocess.run([*_casebridge(), "keys", "create", "--org", "org-1", "--scopes", "cases:read,admin"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        headers = {"Authorization": f"Bearer {key}"}

        response = requests.get(f"{base}/cases/case-1", headers=headers, timeout=30)
        assert response.status_code == 404  # the key works; there is no such case
        for _ in range(4):  # both workers see the key and the audit trail (written within a moment)
            deadline = time.monotonic() + 5
            while True:
                audit = requests.get(f"{base}/audit", headers=headers, timeout=30)
                assert audit.status_code == 200
                if audit.json()["items"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert audit.json()["items"][0]["entity"] == {"type": "Case", "id": "case-1"}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert "GET /cases/<case_id> 404" in output  # the request log names the route, not the path
    assert key.split("_", 2)[2] not in output
