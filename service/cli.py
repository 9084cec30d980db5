"""The ``rbstream`` command line: one subcommand per job.

Each subcommand lives in its own module, which defines ``add_arguments(parser)``
and ``main(args) -> int``. Modules are imported only when their subcommand runs
(``--help`` of the top level imports none), so the service never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("service.tools.run", "the main job: local broker, API, consumer, replay of sample alerts, scores printed"),
    "consume": ("service.stream.consumer", "score alerts from a Kafka topic and publish the scores"),
    "serve": ("service.api.app", "serve POST /classify, /healthz, /readyz, /model, /metrics"),
    "replay": ("service.tools.replay", "produce alert files into a Kafka topic, like a survey stream"),
    "tail": ("service.tools.tail", "print score records of a topic as JSON lines"),
    "broker": ("service.tools.broker", "run the local Kafka-compatible broker (tansu) in the foreground"),
    "bench": ("service.bench", "benchmarks: decode, infer, e2e, shadow, api, all"),
    "explain": ("service.explain.cli", "why a score: occlusion, saliency, integrated-gradients pictures and arrays"),
    "evaluate": ("training.evaluate", "judge models on real labelled alerts: metrics beside the survey's own score, plots"),
    "train": ("training.cli", "train a real-bogus model (TOML config or Deep-HiTS input.txt) and export ONNX"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            sys.exit("rbstream: this command needs the training extra: pip install 'rbstream[train]'")
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbstream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("RBSTREAM_LOG_LEVEL", "INFO"),
                        help="logging level (env RBSTREAM_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(module).add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only=command).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(_load(COMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
