"""A model worker: one subprocess per loaded model, so a native crash takes down only that model.

Run by the daemon as ``python -m edgekit.serve.worker serve --fd N --handoff-fd M --bundle DIR --config JSON``
with one end of a Unix socket pair (and one of a datagram pair on which client sockets come, ``handoff.py``);
it verifies the bundle again unless its files are the ones the daemon's verifier hashed (unchanged identity),
loads it, reruns the golden checks recorded at export (a model that does not reproduce them is refused), says
``Ready`` and then answers jobs (see ``protocol.py``). ``python -m edgekit.serve.worker verify DIR...``
checks bundles and prints one ``Verified`` line each, so the daemon never parses a model file in its own process.

The worker ignores SIGINT/SIGTERM: the daemon decides when it stops (after its grace period), and
it exits by itself when the daemon's end of the socket closes.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from edgekit.bundle import bundle_path_inside
from edgekit.errors import BundleError, EdgekitError, RuntimeBackendError
from edgekit.runtime.llm import Finish
from edgekit.runtime.verify import read_manifest_capped
from edgekit.schema.manifest import MANIFEST_NAME, Manifest
from edgekit.serve.handoff import ClientSink
from edgekit.serve.protocol import (
    Bye,
    Cancel,
    DeltaMessage,
    Done,
    Error,
    FileIdentity,
    FrameSender,
    HandBack,
    LoadError,
    Message,
    Ping,
    Pong,
    Proceed,
    Ready,
    Shutdown,
    Verified,
    VerifyStarted,
    WorkerConfig,
    read_frame_sync,
)
from edgekit.serve.runners import Job, load_plugins, runner_for

T = TypeVar("T")


def file_identities(bundle_dir: Path) -> list[FileIdentity]:
    """The manifest and every file it lists, as the filesystem identifies them now (OSError if one is gone)."""
    names = [MANIFEST_NAME, *(entry.path for entry in read_manifest_capped(bundle_dir).files)]
    rows = []
    for name in names:
        st = bundle_path_inside(bundle_dir, name).stat()
        rows.append(FileIdentity(path=name, device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                 ctime_ns=st.st_ctime_ns))
    return rows


def _identities_or_none(bundle_dir: Path) -> list[FileIdentity] | None:
    try:
        return file_identities(bundle_dir)
    except (BundleError, OSError, ValueError):  # ValueError: a path the OS refuses (NUL byte)
        return None  # unreadable or incomplete: the full check says why, and nothing is trusted later


def verify_bundle_once(bundle_dir: Path, verified: list[FileIdentity] | None) -> tuple[Manifest, list[FileIdentity] | None]:
    """The bundle's manifest after the full runtime checks, unless its files are the ones already checked.

    ``verified`` is what the files looked like when they were last hashed in full; a write to any of
    them changes its ctime, so equal identities mean equal bytes and the second full read is skipped.
    Returns the manifest and the identities this call hashed (None when it trusted ``verified``).
    """
    from edgekit.runtime.verify import verify_for_runtime

    if verified is not None and _identities_or_none(bundle_dir) == verified:
        return read_manifest_capped(bundle_dir), None
    before = _identities_or_none(bundle_dir)  # taken first: a write during hashing shows at the next load
    return verify_for_runtime(bundle_dir), before


def pin(cpus: list[int] | None) -> None:
    """Run on ``cpus`` from now on; before the runtime starts its threads, which inherit the mask."""
    if not cpus:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a CPU this process may not use (another cgroup/cpuset than the daemon's)
        raise RuntimeBackendError(f"cannot pin the model worker to CPUs {cpus}: {exc}") from exc


def on_passing_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread that ends with it, for llama.cpp work before serving (the golden checks).

    An OpenMP team lives as long as the thread that started it. Started on the main thread, the checks' team would
    stay beside the decode thread's, and with more OpenMP threads than cores libgomp caps every barrier's spin at
    1,000 turns (~25 us) whatever GOMP_SPINCOUNT says: llama.cpp's threads then slept at most of the hundreds of
    barriers in a decode step, and 1 and 4 streams decoded at 0.95-0.98x llama-server."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="golden") as pool:
        return pool.submit(fn, *args).result()


def serve(fd: int, handoff_fd: int, bundle_dir: Path, config: WorkerConfig) -> int:
    """Load the bundle and answer jobs until the daemon says shutdown or goes away."""
    sock = socket.socket(fileno=fd)
    handoff = socket.socket(fileno=handoff_fd)
    sender = FrameSender(sock)

    def send(message: Message, payload: bytes = b"") -> None:
        try:
            sender.send(message, payload)
        except OSError:
            os._exit(0)  # the daemon is gone; nobody is waiting for this work

    started = time.perf_counter()
    try:
        load_plugins(config.plugins)
        pin(config.cpus)
        manifest, hashed = verify_bundle_once(bundle_dir, config.verified)
        runner = runner_for(manifest.format)(bundle_dir, manifest, config)
        if manifest.golden is not None:  # before Ready: a model that computes something else is never served
            from edgekit.runtime.golden import check_golden

            report = on_passing_thread(check_golden, manifest, runner.golden_model)
            if not report.passed:
                send(LoadError(message=report.reason, kind="golden"))
                return 1
    except EdgekitError as exc:
        send(LoadError(message=str(exc), kind="bundle" if isinstance(exc, BundleError) else "backend"))
        return 1
    send(Ready(pid=os.getpid(), task=manifest.task, load_seconds=time.perf_counter() - started, files=hashed, **runner.facts))

    work: queue.Queue[Job | None] = queue.Queue()
    jobs: dict[str, Job] = {}
    lock = threading.Lock()

    def read_loop() -> None:
        stream = sock.makefile("rb")
        while True:
            frame = read_frame_sync(stream)
            if frame is None:
                os._exit(0)  # the daemon closed its end (it exited or dropped this worker)
            message, _ = frame
            if isinstance(message, Shutdown):
                for _ in range(runner.slots):
                    work.put(None)
                return
            if isinstance(message, Ping):
                send(Pong())
                continue
            if isinstance(message, (Cancel, Proceed)):
                with lock:
                    job = jobs.get(message.id)
                sink = take_client(message) if isinstance(message, Proceed) and message.direct is not None else None
                if job is None:
                    if sink is not None:
                        sink.finish(give_up=lambda: True)
                elif isinstance(message, Cancel):
                    job.cancel()
                else:
                    job.sink = sink
                    job.proceed()
            elif message.type in runner.ops:
                job = Job(message)
                with lock:
                    jobs[job.id] = job
                work.put(job)
            else:
                send(Error(id=message.id, status=400, code="unsupported_operation",
                           message=f"this model does not do {message.type!r}"))

    def take_client(message: Proceed) -> ClientSink | None:
        """The client socket the daemon sent on the handoff channel right before this ``Proceed``."""
        data, fds, _, _ = socket.recv_fds(handoff, 256, 1)
        if data.decode() != message.id or len(fds) != 1:  # never: the daemon sends both in this order, one at a time
            for stray in fds:
                os.close(stray)
            return None  # the deltas go to the daemon, which writes them itself
        return ClientSink(fds[0], message.direct.head, message.direct.tail, time.monotonic() + message.direct.seconds)

    def sender_for(job: Job) -> Callable[..., None]:
        """``send`` for one job: with a client socket, deltas go there, and the socket is handed back before the last
        frame."""

        def send_job(message: Message, payload: bytes = b"") -> None:
            if (sink := job.sink) is not None:
                if isinstance(message, DeltaMessage):
                    sink.write(message.delta.text)
                    if sink.broken:
                        job.cancel()  # the client left: stop decoding for it
                    return
                if isinstance(message, (Done, Error)):
                    job.sink = None
                    send(HandBack(id=job.id, complete=sink.finish(give_up=job.cancelled)))
            send(message, payload)

        return send_job

    def slot_loop(slot: int) -> None:
        while (job := work.get()) is not None:
            send_job = sender_for(job)
            try:
                if job.cancelled():
                    send_job(Done(id=job.id, finish=Finish("cancelled", 0, 0)))
                else:
                    runner.handle(slot, job, send_job)
            except EdgekitError as exc:
                send_job(Error(id=job.id, status=500, code="model_error", message=str(exc)))
            except Exception as exc:  # a bug: report it to this job and keep serving the others
                traceback.print_exc()
                send_job(Error(id=job.id, status=500, code="internal_error", message=f"{type(exc).__name__}: {exc}"))
            finally:
                if job.sink is not None:  # a runner that ended without a last frame still never keeps a client's socket
                    job.sink.finish(give_up=lambda: True)
                with lock:
                    jobs.pop(job.id, None)

    threads = [threading.Thread(target=slot_loop, args=(slot,), name=f"slot-{slot}", daemon=True) for slot in range(runner.slots)]
    for thread in threads:
        thread.start()
    read_loop()
    for thread in threads:
        thread.join()
    send(Bye())
    return 0


def verify(paths: list[Path], plugins: list[str] | None = None) -> int:
    """Check each bundle; print a ``VerifyStarted`` line, then one ``Verified`` JSON line per bundle."""
    from edgekit.runtime.verify import verify_for_runtime

    load_plugins(plugins or [])
    for path in paths:
        print(VerifyStarted(started=str(path)).model_dump_json(), flush=True)
        files = _identities_or_none(path)  # taken before hashing: a write during it shows at load
        try:
            manifest = verify_for_runtime(path)
            row = Verified(dir=str(path), ok=True, name=manifest.name, task=manifest.task, format=manifest.format, files=files)
        except EdgekitError as exc:
            row = Verified(dir=str(path), ok=False, name=path.name, error=str(exc))
        print(row.model_dump_json(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="edgekit-worker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve")
    serve_cmd.add_argument("--fd", type=int, required=True)
    serve_cmd.add_argument("--handoff-fd", type=int, required=True)
    serve_cmd.add_argument("--bundle", type=Path, required=True)
    serve_cmd.add_argument("--config", type=WorkerConfig.model_validate_json, required=True)
    verify_cmd = commands.add_parser("verify")
    verify_cmd.add_argument("--plugins", default="", help="comma-separated worker plugin modules")
    verify_cmd.add_argument("bundles", type=Path, nargs="*")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.bundles, [p for p in args.plugins.split(",") if p])
    return serve(args.fd, args.handoff_fd, args.bundle, args.config)


if __name__ == "__main__":
    sys.exit(main())
