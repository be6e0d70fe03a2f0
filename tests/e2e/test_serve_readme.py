"""README's first steps, as written there: ``casebridge serve`` with nothing configured (SQLite in
``./instance``), then the second terminal's commands (a key, a case posted, read back); and ``serve``
on PostgreSQL when ``CASEBRIDGE_DATABASE_URL`` points at one."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import _postgres_url
from tests.e2e.serving import casebridge, create_key, serving

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _shell_blocks(section: str) -> list[str]:
    """The ``sh`` code blocks of a README section, in order."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def _environment(**settings: str) -> dict:
    """This environment without any casebridge setting, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASEBRIDGE_")}
    return {**env, **settings}


def test_the_readme_starts_the_service_on_its_defaults_and_its_first_requests_work(tmp_path: Path) -> None:
    setup, first_requests = _shell_blocks("Set up and start the service")
    assert setup.strip().endswith("&& casebridge serve"), setup  # the rest sets up the environment this test runs in
    fixture = re.search(r"@(\S+\.json)", first_requests).group(1)
    (tmp_path / fixture).parent.mkdir(parents=True)
    shutil.copy(ROOT / fixture, tmp_path / fixture)
    env = _environment(PATH=f"{Path(casebridge()[0]).parent}{os.pathsep}{os.environ['PATH']}")

    with serving(env, tmp_path) as port:
        assert (tmp_path / "instance" / "casebridge.db").exists()  # the embedded default, in ./instance
        commands = first_requests.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)

    assert ran.returncode == 0, ran.stderr
    posted, end = json.JSONDecoder().raw_decode(ran.stdout)  # curl prints the two answers back to back
    read = json.loads(ran.stdout[end:])
    assert posted["id"] == read["id"] == "case-1" and read["status"] == posted["status"]


def test_serve_runs_on_postgresql_when_the_database_url_points_at_one(tmp_path: Path) -> None:
    url = _postgres_url()
    env = _environment(CASEBRIDGE_DATABASE_URL=url, CASEBRIDGE_HOME=str(tmp_path / "home"))
    with serving(env, tmp_path) as port:
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/readyz", timeout=30).json()["database"] == "reachable"
        headers = {"Authorization": f"Bearer {create_key(env, tmp_path, 'org-1', 'cases:read,cases:write')}"}
        case = (ROOT / "tests" / "fixtures" / "cases" / "minimal.json").read_bytes()
        posted = requests.post(f"{base}/cases", data=case, headers={**headers, "Content-Type": "application/json"},
                               timeout=30)
        assert posted.status_code == 201, posted.text
        assert requests.get(f"{base}/cases/{posted.json()['id']}", headers=headers, timeout=30).status_code == 200

    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    with engine.connect() as conn:  # the case is in PostgreSQL, and no SQLite file was made
        assert conn.execute(text("SELECT count(*) FROM cases")).scalar() == 1
    engine.dispose()
    assert not (tmp_path / "instance").exists() and not (tmp_path / "home" / "casebridge.db").exists()
