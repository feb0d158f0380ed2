"""After a switch: does the running daemon serve the new version, and keep serving it through a probation window?

`edgekit update --daemon URL` asks the daemon's open ``/health`` (no API key) instead of loading the model
in a second process: the daemon reloads the switched version in place, its new worker runs the golden
checks at load, and ``/health`` says which version each linked model serves, which switched-to version it
refused and why, and which models failed (a worker that crashes too often). The answer here decides
whether the switch stays or is undone.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from edgekit.fleet.board import GoldenOutcome

POLL_S = 0.25
HEALTH_TIMEOUT_S = 10.0


def read_health(url: str) -> dict | None:
    """The daemon's /health body (200 or 503 while loading); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read()) if exc.code == 503 else None
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def verdict(health: dict | None, name: str, version: str) -> str | None:
    """"serving", "starting", or why ``version`` of ``name`` is not served (None: no answer yet)."""
    if health is None or health.get("status") == "loading":
        return None
    state = (health.get("versions") or {}).get(name)
    if state is None:
        return None  # the daemon has not discovered the linked model (yet)
    failed = (health.get("failed") or {}).get(name)
    if state.get("refused") == version:
        return f"the daemon refused version {version}: {state.get('error')}"
    if state.get("serving") == version:
        return f"the daemon marked {name} failed on version {version}: {failed}" if failed else "serving"
    return None


def confirm_with_daemon(url: str, name: str, version: str, *, timeout_s: float, probation_s: float,
                        progress: Callable[[str], None] = lambda _: None,
                        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> GoldenOutcome:
    """Wait (at most ``timeout_s``) until the daemon serves ``version``, then watch it for ``probation_s``; any refusal or failure fails."""
    deadline = clock() + timeout_s
    serving_since: float | None = None
    progress(f"waiting for the daemon at {url} to serve {name} {version}")
    while True:
        said = verdict(read_health(url), name, version)
        now = clock()
        if said is not None and said != "serving":
            return GoldenOutcome(False, said)
        if said == "serving":
            if serving_since is None:
                serving_since = now
                progress(f"the daemon serves {name} {version}; watching it for {probation_s:g} s")
            if now - serving_since >= probation_s:
                return GoldenOutcome(True, f"the daemon serves version {version} and kept serving it for {probation_s:g} s")
        elif serving_since is not None:  # it served the version, then switched away (another update) or stopped answering
            serving_since = None
        if now >= deadline:
            where = "did not confirm" if serving_since is None else "stopped confirming"
            return GoldenOutcome(False, f"the daemon at {url} {where} version {version} within {timeout_s:g} s")
        sleep(POLL_S)


def wait_until_served(url: str, name: str, version: str, timeout_s: float,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
    """After a switch back: whether the daemon says it serves ``version`` again within ``timeout_s``."""
    deadline = clock() + timeout_s
    while clock() < deadline:
        if verdict(read_health(url), name, version) == "serving":
            return True
        sleep(POLL_S)
    return False
