"""``casebridge serve`` for end-to-end tests: started on a free loopback port, waited for, stopped with
its whole process group however the test ends; and the other ``casebridge`` commands run beside it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def casebridge() -> list[str]:
    """The installed ``casebridge`` command (or the module, where the script is not installed)."""
    script = Path(sys.executable).with_name("casebridge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def create_key(env: dict, cwd: Path, organization: str, scopes: str) -> str:
    """A key made by ``casebridge keys create``, as an operator would."""
    created = subprocess.run([*casebridge(), "keys", "create", "--org", organization, "--scopes", scopes],
                             env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
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


@contextmanager
def serving(env: dict, cwd: Path, *options: str, log: Path | None = None) -> Iterator[int]:
    """``casebridge serve --port PORT *options`` in ``cwd``, its output in ``log`` (``cwd/serve.log``);
    gives the port once ``/healthz`` answers."""
    port = free_port()
    log = log or cwd / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([*casebridge(), "serve", "--port", str(port), *options], env=env, cwd=cwd,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", server)
        yield port
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
