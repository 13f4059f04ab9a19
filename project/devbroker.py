"""The dev stack's RabbitMQ: a vhost of its own (``notifications-dev``, unless
``CELERY_BROKER_URL`` names one), and the management API that Flower reads the queues
from (enabled with ``rabbitmq-plugins`` when the broker runs on this machine).

``rabbitmqctl`` and ``rabbitmq-plugins`` act on the node of this machine only, so they
are used only for a broker on loopback; the management API serves the rest.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit, urlunsplit

VHOST = "notifications-dev"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
MANAGEMENT_PORT = 15672
PLUGIN = "rabbitmq_management"


class BrokerSetupError(Exception):
    """The dev vhost could not be created; the message says what to run instead."""


def dev_url(environ: dict[str, str]) -> tuple[str, bool]:
    """The broker URL the dev stack's processes use, and whether it is the dev stack's
    own vhost (True) or the environment's ``CELERY_BROKER_URL`` (False)."""
    given = environ.get("CELERY_BROKER_URL")
    if given:
        return given, False
    return DEFAULT_URL + quote(VHOST, safe=""), True


def vhost_of(url: str) -> str:
    """The vhost of an ``amqp://`` URL (``/`` for an empty path or ``//``)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def is_local(url: str) -> bool:
    host = urlsplit(url).hostname or "localhost"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_url(url: str) -> str:
    """The management API of the broker at ``url``, with its credentials, in the form
    Flower's ``--broker_api`` takes (Flower appends ``queues/<vhost>`` itself)."""
    parts = urlsplit(url)
    user = parts.username or "guest"
    password = parts.password or "guest"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(unquote(user), safe='')}:{quote(unquote(password), safe='')}@{host}:{MANAGEMENT_PORT}"
    return urlunsplit(("http", netloc, "/api/", "", ""))


def _request(api: str, method: str, path: str, body: dict[str, str] | None = None, timeout: float = 3.0) -> int:
    parts = urlsplit(api)
    netloc = parts.netloc.rpartition("@")[2]
    request = urllib.request.Request(
        urlunsplit((parts.scheme, netloc, parts.path + path, "", "")),
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"content-type": "application/json"},
    )
    login = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def management_answers(url: str) -> bool:
    """True if the management API of the broker at ``url`` answers its login."""
    return _request(api_url(url), "GET", "overview") == 200


def enable_management(url: str, say: Callable[[str], None] = print, wait: float = 30.0) -> bool:
    """Make sure the management API answers: enable the plugin with ``rabbitmq-plugins``
    (online, no restart) when the broker is on this machine. Returns whether it answers;
    when it does not, ``say`` is told how to enable it."""
    if management_answers(url):
        return True
    tool = shutil.which("rabbitmq-plugins")
    if tool and is_local(url):
        say(f"Enabling RabbitMQ's management plugin, so Flower shows the queues: rabbitmq-plugins enable {PLUGIN}")
        try:
            done = subprocess.run([tool, "enable", PLUGIN], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            done = None
            say(f"  rabbitmq-plugins failed: {exc}")
        if done is not None and done.returncode == 0:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if management_answers(url):
                    return True
                time.sleep(0.5)
        elif done is not None:
            say(f"  rabbitmq-plugins failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    say(
        "Flower shows no queue lengths: RabbitMQ's management API does not answer on port "
        f"{MANAGEMENT_PORT}. Enable it on the broker's machine with "
        f"'sudo rabbitmq-plugins enable {PLUGIN}' (docker: the rabbitmq:*-management image), "
        "or set FLOWER_BROKER_API=http://user:password@host:15672/api/."
    )
    return False


def ensure_vhost(url: str) -> bool:
    """Create the vhost of ``url`` and give its user every permission on it, unless it
    exists. Returns True if it was created here.

    Raises ``BrokerSetupError`` naming the commands to run when neither the local
    ``rabbitmqctl`` nor the management API can do it.
    """
    vhost = vhost_of(url)
    user = unquote(urlsplit(url).username or "guest")
    tool = shutil.which("rabbitmqctl")
    if tool and is_local(url):
        listed = subprocess.run([tool, "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
        if listed.returncode == 0:
            if vhost in listed.stdout.split():
                return False
            for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
                done = subprocess.run([tool, "-q", *args], capture_output=True, text=True, timeout=60)
                if done.returncode != 0 and "already exists" not in done.stderr:
                    raise BrokerSetupError(_manual(vhost, user, done.stderr.strip()))
            return True
    api = api_url(url)
    name = quote(vhost, safe="")
    if _request(api, "GET", f"vhosts/{name}") == 200:
        return False
    if _request(api, "PUT", f"vhosts/{name}", {}) in (201, 204) and _request(
        api, "PUT", f"permissions/{name}/{quote(user, safe='')}", {"configure": ".*", "write": ".*", "read": ".*"}
    ) in (201, 204):
        return True
    raise BrokerSetupError(_manual(vhost, user, "neither rabbitmqctl on this machine nor the management API could"))


def delete_vhost(url: str) -> bool:
    """Delete the vhost of ``url`` (its queues and messages with it). True if done."""
    vhost = vhost_of(url)
    tool = shutil.which("rabbitmqctl")
    if tool and is_local(url):
        done = subprocess.run([tool, "-q", "delete_vhost", vhost], capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return True
    return _request(api_url(url), "DELETE", f"vhosts/{quote(vhost, safe='')}") in (200, 204)


def _manual(vhost: str, user: str, why: str) -> str:
    return (
        f"Cannot create the RabbitMQ vhost {vhost!r} for the dev stack ({why}). Create it with\n"
        f"    sudo rabbitmqctl add_vhost {vhost}\n"
        f"    sudo rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*'\n"
        "or point CELERY_BROKER_URL at a vhost of your own."
    )
