"""Run the daemon under uvicorn with the shutdown behaviour systemd expects.

SIGTERM: uvicorn stops accepting connections, lets in-flight requests finish for ``grace_s``
seconds, cancels the rest (which cancels their generations in the workers), runs the app's
lifespan shutdown (workers are stopped) and returns; the process then exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys

from edgekit.serve.settings import ACCEPT_BACKLOG, ServeSettings


def _ignore(signum, frame) -> None:
    """Placeholder SIGTERM handler: uvicorn re-raises the signal it handled after shutting down."""


def run(settings: ServeSettings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    import uvicorn

    from edgekit.serve.app import create_app
    from edgekit.serve.connections import ConnectionLimits, RateLimitedLog, fit_to_file_limit, protocol_class

    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)  # refuses an unsafe bind before anything listens
    limits = ConnectionLimits(fit_to_file_limit(settings.max_connections), settings.header_timeout_s,
                              settings.body_timeout_s, app.state.services.metrics)
    for name in ("asyncio", "uvicorn.error"):  # e.g. "socket.accept() out of system resource" once per accept
        logging.getLogger(name).addFilter(RateLimitedLog())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(limits),
        backlog=ACCEPT_BACKLOG,
        timeout_keep_alive=settings.idle_timeout_s,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=settings.grace_s,
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn restores the handlers it found and re-raises the signal it caught once it has shut
    # down; with the default SIGTERM handler that re-raise would kill the process (exit 143, not 0).
    signal.signal(signal.SIGTERM, _ignore)
    server.run()
    return 0 if server.started else 3
