"""A hardened systemd unit for the daemon, with MemoryMax from the bundles' footprint estimates.

The service runs as a transient user (DynamicUser) that can write only its state directory,
sees a read-only system, cannot reach the network beyond loopback when bound to loopback, and is
restarted on failure. SIGTERM goes to the daemon only (KillMode=mixed): it drains in-flight
requests for ``grace_s`` and stops its workers itself; whatever is left is killed after
TimeoutStopSec.
"""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

from edgekit.errors import ConfigError, GateFailed
from edgekit.serve.budget import MIB, device_budget, footprint_bytes
from edgekit.serve.settings import FD_RESERVE, ServeSettings

STATE_DIR = Path("/var/lib/edgekit")
# Where a readable copy of the bundles can live (the board installer uses /opt/edgekit too).
READABLE_DIR = Path("/opt/edgekit/bundles")
# ProtectHome=yes makes these invisible to the service (systemd.exec(5)).
HIDDEN_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
# Resident memory of the daemon process without models (benchmark: scripts/bench_serve.py idle RSS) plus
# headroom for request buffers; MemoryMax covers it on top of the models' budget.
DAEMON_RESERVE = 160 * MIB


def bundles_footprint(settings: ServeSettings) -> tuple[int, list[tuple[str, int]]]:
    """Sum of the footprint estimates of the servable bundles under ``settings.models`` (manifests only)."""
    from edgekit.errors import BundleError
    from edgekit.runtime.verify import read_manifest_capped
    from edgekit.serve.discovery import bundle_dirs

    rows = []
    for path in bundle_dirs(Path(settings.models)):
        try:
            manifest = read_manifest_capped(path)
        except BundleError:
            continue
        if manifest.passed:
            rows.append((manifest.name, footprint_bytes(manifest, settings)))
    return sum(n for _, n in rows), rows


def unit_budget(settings: ServeSettings, rows: list[tuple[str, int]]) -> tuple[int, str]:
    """The unit's --memory-budget-mb (bytes) and where it came from.

    With --device: what the board offers models (as `serve --device` computes it); each bundle must fit
    it alone (exit 1 otherwise), and the sum of the bundles when they fit together. Without: the
    given budget, else the sum of the bundles' footprints.
    """
    given = settings.memory_budget_mb * MIB if settings.memory_budget_mb is not None else None
    if settings.device is None:
        if given is not None:
            return given, "--memory-budget-mb"
        if not rows:
            raise ConfigError(f"no servable bundles in {settings.models} to size MemoryMax from",
                              hint="pass --models DIR with the bundles, --device ID for a board, or --memory-budget-mb N")
        return sum(n for _, n in rows), "sum of the footprint estimates of " + ", ".join(name for name, _ in rows)
    offered, _ = device_budget(settings.device)
    too_big = [f"{name} needs {n / MIB:.0f} MiB" for name, n in rows if n > offered]
    if too_big:
        raise GateFailed(f"{settings.device} offers {offered / MIB:.0f} MiB to models; {', '.join(too_big)} with these settings",
                         hint="serve a smaller bundle, or lower --n-ctx / --prompt-cache-contexts / --batch-max-tokens / --slots (`edgekit fit` "
                              "shows what fits)")
    if given is not None:
        if given > offered:
            raise ConfigError(f"--memory-budget-mb {settings.memory_budget_mb} is more than {settings.device} offers "
                              f"models ({offered // MIB} MiB)", hint=f"use at most --memory-budget-mb {offered // MIB}")
        return given, "--memory-budget-mb"
    if rows and sum(n for _, n in rows) <= offered:
        return sum(n for _, n in rows), "sum of the footprint estimates of " + ", ".join(name for name, _ in rows)
    return offered, f"usable RAM of {settings.device} minus the daemon"


def check_readable(models: Path) -> None:
    """Refuse a models folder the unit's transient user could not read (DynamicUser=yes, ProtectHome=yes)."""
    folder = Path(models).absolute()
    fix = (f"copy the bundles where the service can read them: sudo mkdir -p {READABLE_DIR} && sudo cp -r "
           f"{folder}/. {READABLE_DIR}/ && sudo chmod -R a+rX {READABLE_DIR}; then pass --models {READABLE_DIR}")
    hidden = next((d for d in HIDDEN_DIRS if folder == d or d in folder.parents), None)
    if hidden is not None:
        raise ConfigError(f"--models {folder}: under {hidden}, which the service cannot see (ProtectHome=yes)", hint=fix)
    if folder == STATE_DIR or STATE_DIR in folder.parents or not folder.exists():
        return  # the state directory belongs to the service's user; a folder that is not here may be on the board
    for part in [*reversed(folder.parents), folder]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH or (part == folder and not mode & stat.S_IROTH):
            raise ConfigError(f"--models {folder}: {part} is not readable by other users (mode {stat.filemode(mode)}); "
                              "the service runs as a transient user", hint=fix)
    for path in folder.rglob("*"):
        try:
            mode = path.stat().st_mode
        except OSError:  # a dangling link: bundle verification reports it, not the unit
            continue
        if not mode & stat.S_IROTH or (path.is_dir() and not mode & stat.S_IXOTH):
            raise ConfigError(f"--models {folder}: {path} is not readable by other users (mode {stat.filemode(mode)}); "
                              "the service runs as a transient user", hint=fix)


def render_unit(settings: ServeSettings, exec_path: str, budget_bytes: int, source: str,
                memory_cap_bytes: int | None = None) -> str:
    """The unit file text. ``budget_bytes`` becomes --memory-budget-mb; MemoryMax adds the daemon's own reserve,
    at most ``memory_cap_bytes`` (the board's usable RAM) but never less than the budget plus the daemon."""
    from edgekit.fit.memory import DAEMON_RSS

    budget_mb = max(16, -(-budget_bytes // MIB))
    memory_max_mb = budget_mb + DAEMON_RESERVE // MIB
    if memory_cap_bytes is not None:
        memory_max_mb = max(min(memory_max_mb, memory_cap_bytes // MIB), budget_mb + DAEMON_RSS // MIB)
    args = [exec_path, "serve", "--models", str(settings.models), "--host", settings.host, "--port", str(settings.port),
            "--memory-budget-mb", str(budget_mb), "--grace-s", f"{settings.grace_s:g}",
            "--max-connections", str(settings.max_connections)]
    if settings.api_key_file is not None:
        args += ["--api-key-file", str(settings.api_key_file)]
    for name in settings.preload:
        args += ["--preload", name]
    if settings.threads is not None:
        args += ["--threads", str(settings.threads)]
    network = (
        "# Loopback bind: no traffic to or from anywhere else.\nIPAddressAllow=localhost\nIPAddressDeny=any\n"
        if settings.loopback else
        "# Network bind: an API key is required (the daemon refuses to start without one).\n"
    )
    credentials = ""
    if settings.api_key_file is not None:
        credentials = f"# The key file must be readable by the transient user, e.g. via LoadCredential=.\nReadOnlyPaths={settings.api_key_file}\n"
    return f"""# Generated by `edgekit service unit` — install as /etc/systemd/system/edgekit.service
# Memory: budget {budget_mb} MiB for models ({source}) + {DAEMON_RESERVE // MIB} MiB for the daemon.
[Unit]
Description=edgekit offline model server (OpenAI-compatible)
After=network.target

[Service]
Type=exec
ExecStart={shlex.join(args)}
# `systemctl reload edgekit`: load switched model versions now (edgekit update); in-flight requests finish on the old one.
ExecReload=/bin/kill -HUP $MAINPID
Environment=EDGEKIT_HOME={STATE_DIR} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2
# SIGTERM to the daemon only; it drains requests for --grace-s and stops its model workers.
KillMode=mixed
TimeoutStopSec={int(settings.grace_s) + 10}
MemoryMax={memory_max_mb}M
MemorySwapMax=0
OOMPolicy=stop
TasksMax=256
# Descriptors: --max-connections {settings.max_connections} plus the daemon's own files and worker sockets.
LimitNOFILE={settings.max_connections + FD_RESERVE}
LimitCORE=0

# Who and where: a transient user; only the state directory ({STATE_DIR}, bundles under bundles/) is writable.
DynamicUser=yes
StateDirectory=edgekit
StateDirectoryMode=0750
UMask=0077
ReadOnlyPaths=-{settings.models}
{credentials}
# Hardening (systemd.exec(5)). MemoryDenyWriteExecute is left off: ctypes callbacks (libffi) need W+X pages.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
{network}
[Install]
WantedBy=multi-user.target
"""
