"""The secret key: the web process refuses to start in production mode without
DJANGO_SECRET_KEY (project/wsgi.py), while debug mode, the workers, beat and migrate run
without one.

Finding guarded here: SECRET_KEY fell back to a public constant in production mode, so a
deployment that forgot DJANGO_SECRET_KEY signed its admin sessions and CSRF tokens with a
key anyone can read in this repository.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env, wait_for

REFUSAL = "Refusing to start the web process: DJANGO_SECRET_KEY is not set and DJANGO_DEBUG is off."

pytestmark = pytest.mark.django_db(transaction=True)  # the children read the test database


def project_env(**extra: str) -> dict[str, str]:
    """The project's own settings against the test database, with neither a key nor
    debug mode unless given."""
    env = child_env(DJANGO_SETTINGS_MODULE="project.settings")
    for name in ("DJANGO_SECRET_KEY", "DJANGO_DEBUG"):
        env.pop(name, None)
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def login_page(port: int) -> int:
    """The status of the admin's login page, or 0 when nothing answers on ``port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2) as response:
            return int(response.status)
    except OSError:
        return 0


class Server:
    """A ``manage.py runserver`` in its own process group, its output in a file."""

    def __init__(self, tmp: Path, env: dict[str, str], *options: str) -> None:
        self.port = free_port()
        self.log = tmp / f"runserver-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "runserver", *options, f"127.0.0.1:{self.port}"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # runserver's reloader runs the server in a child
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture
def runserver(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(env: dict[str, str], *options: str) -> Server:
        started.append(Server(tmp_path, env, *options))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_loading_the_wsgi_application_refuses_without_a_key() -> None:
    """Finding: SECRET_KEY fell back to a public constant in production mode. A WSGI
    server (gunicorn) loading project.wsgi now stops with what to set."""
    done = subprocess.run(
        [sys.executable, "-c", "import project.wsgi"],
        cwd=ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"ImproperlyConfigured: {REFUSAL} Set DJANGO_SECRET_KEY to a long random value" in done.stderr


def test_without_a_key_in_production_mode_django_refuses_every_use_of_it() -> None:
    """Finding: SECRET_KEY fell back to a public constant in production mode. Whatever
    signs with the key outside the web process fails instead of using a public one."""
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", "from django.core import signing; print(signing.dumps(1))"],
        cwd=ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "The SECRET_KEY setting must not be empty." in done.stderr


def test_runserver_refuses_to_start_without_a_key(runserver: Callable[..., Server]) -> None:
    """Finding: SECRET_KEY fell back to a public constant in production mode. runserver
    loads the WSGI application at start, so it exits with the message."""
    server = runserver(project_env(), "--noreload")
    code = server.proc.wait(timeout=60)
    assert code != 0
    assert REFUSAL in server.output()
    assert login_page(server.port) == 0


def test_runserver_with_its_reloader_never_serves_without_a_key(runserver: Callable[..., Server]) -> None:
    """Finding: SECRET_KEY fell back to a public constant in production mode. Under the
    autoreloader (as docker-compose.yml runs it), runserver prints the refusal and waits
    for a code change, as it does for any start-up error, and never serves a page."""
    server = runserver(project_env())
    wait_for(lambda: REFUSAL in server.output(), timeout=60, what=server.output)
    assert login_page(server.port) == 0


def test_runserver_serves_the_admin_with_a_key(runserver: Callable[..., Server]) -> None:
    server = runserver(project_env(DJANGO_SECRET_KEY=secrets.token_urlsafe(50)))
    wait_for(lambda: login_page(server.port) == 200, timeout=60, interval=0.2, what=server.output)
    assert "Refusing" not in server.output()


def test_runserver_serves_the_admin_in_debug_mode_without_a_key(runserver: Callable[..., Server]) -> None:
    server = runserver(project_env(DJANGO_DEBUG="1"))
    wait_for(lambda: login_page(server.port) == 200, timeout=60, interval=0.2, what=server.output)
    assert "Refusing" not in server.output()


def test_migrate_and_a_worker_run_without_a_key(tmp_path: Path) -> None:
    """The processes that never use the key start in production mode without one."""
    env = project_env()
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "worker", "-l", "info", "-c", "1"]
            + ["-n", f"nokey-{secrets.token_hex(3)}@%h", "--without-mingle", "--without-gossip"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited with {worker.returncode}:\n{log.read_text()[-4000:]}")
            return " ready." in log.read_text(errors="replace")

        wait_for(ready, timeout=60, what="worker ready")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
