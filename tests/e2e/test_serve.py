"""``casebridge serve``: gunicorn on the embedded default (SQLite in a fresh home), from nothing to an
authenticated request, with a key made by ``casebridge keys create`` against the same database."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.serving import create_key, serving

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_serve_from_nothing_to_an_authenticated_request(tmp_path: Path) -> None:
    home = tmp_path / "home"  # missing: serve creates it
    env = dict(os.environ, CASEBRIDGE_HOME=str(home),
               CASEBRIDGE_DATABASE_URL=f"sqlite:///{home / 'casebridge.db'}")
    with serving(env, tmp_path, "--workers", "2") as port:
        base = f"http://127.0.0.1:{port}"
        assert (home / "casebridge.db").exists()
        ready = requests.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["database"] == "reachable"

        assert requests.get(f"{base}/audit", timeout=30).status_code == 401
        key = create_key(env, tmp_path, "org-1", "cases:read,admin")
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
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert "GET /cases/<case_id> 404" in output  # the request log names the route, not the path
    assert key.split("_", 2)[2] not in output
