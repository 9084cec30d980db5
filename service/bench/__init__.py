"""``rbstream bench``: benchmarks of decoding, inference, the streaming path and the API.

``rbstream bench decode|infer|e2e|shadow|api|all [--json] [--out DIR] [--quick] [--repeats N] ...``

Each benchmark lives in its own module (`service.bench.decode`, ``.infer``, ``.e2e``,
``.shadow``, ``.api``) with a ``run(args) -> Result``; `service.bench.report` turns a result into
``<out>/<name>.json`` and ``<out>/<name>.md`` with the machine described. Every figure
is the median of several runs, with min and max. These are benchmarks, not tests: no
test asserts a time (tests/test_bench.py only checks that ``--quick`` runs write
well-formed reports).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from service.score.model import DEVICES
from service.surveys import SURVEYS

BENCHMARKS = ("decode", "infer", "e2e", "shadow", "api")

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=(*BENCHMARKS, "all"), help="which benchmark (all: each in turn)")
    parser.add_argument("--out", default=os.environ.get("RBSTREAM_BENCH_OUT", "bench-results"),
                        help="folder for <benchmark>.json and <benchmark>.md (default bench-results/)")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings to check that the benchmark runs (figures meaningless)")
    parser.add_argument("--repeats", type=int, default=0, help="runs per figure (default: decode 5, infer/e2e/api 3; --quick 1-2)")
    parser.add_argument("--models", default=None, help="models folder with <survey>/ subfolders (default models/)")
    parser.add_argument("--survey", action="append", choices=SURVEYS,
                        help="limit to this survey (repeatable; default both)")
    group = parser.add_argument_group("decode")
    group.add_argument("--messages", type=int, default=0,
                       help="messages decoded per run (default 4000, --quick 200)")
    group.add_argument("--workers", type=int, default=0,
                       help="worker processes of the parallel run (default: usable cores)")
    group = parser.add_argument_group("infer")
    group.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated (default 1,2,4,...,4096)")
    group.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: its own)")
    group.add_argument("--max-call-seconds", type=float, default=20.0,
                       help="skip larger batches once one call takes longer than this (default 20)")
    group = parser.add_argument_group("e2e and shadow (the consumer without and with a shadow model)")
    group.add_argument("--alerts", type=int, default=0, help="alerts per run (default 6000, --quick 150)")
    group.add_argument("--rate", type=float, default=500.0,
                       help="offered rate of the fixed-rate run, alerts/s (default 500: half the 1,000/s target)")
    group.add_argument("--batch-size", type=int, default=0, help="consumer --batch-size (default: the consumer's)")
    group.add_argument("--device", default="cpu", choices=DEVICES,
                       help="inference device of the consumer and the API (default cpu)")
    group.add_argument("--profile", action="store_true",
                       help="run the consumer under cProfile; writes e2e-consumer.prof and e2e-profile.txt")
    group = parser.add_argument_group("api")
    group.add_argument("--clients", type=_ints, default=None, help="concurrent clients (default 1,8,64)")
    group.add_argument("--requests", type=int, default=0,
                       help="requests per run and client count (default 400, --quick 16)")


def run_one(name: str, args: argparse.Namespace, machine_info: dict) -> tuple[dict, str]:
    """Run benchmark ``name`` and write its report; a benchmark that fails writes its error instead."""
    from service.bench.report import Result, run_and_report

    module = importlib.import_module(f"service.bench.{name}")

    def bench() -> Result:
        try:
            return module.run(args)
        except Exception as exc:  # report the failure in the output folder, keep the other benchmarks going
            log.error("bench %s failed: %s", name, exc)
            failed = Result(name, notes=[f"FAILED: {type(exc).__name__}: {exc}"])
            failed.settings["error"] = traceback.format_exc()
            return failed

    return run_and_report(name, bench, args.out, machine_info)


def main(args: argparse.Namespace) -> int:
    from service.bench.report import machine

    machine_info = machine()
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    documents, tables = {}, []
    for name in names:
        log.info("bench %s ...", name)
        documents[name], table = run_one(name, args, machine_info)
        tables.append(table)
        if not args.json:
            print(table, flush=True)
    if args.benchmark == "all":
        out = Path(args.out)
        (out / "all.json").write_text(json.dumps(documents, indent=2, default=str) + "\n")
        (out / "all.md").write_text("\n".join(tables))
    if args.json:
        json.dump(documents if args.benchmark == "all" else documents[names[0]], sys.stdout, indent=2, default=str)
        print()
    failed = [n for n, d in documents.items() if any(str(x).startswith("FAILED") for x in d["notes"])]
    if failed:
        print(f"rbstream bench: failed: {', '.join(failed)} (see {args.out}/<name>.json)", file=sys.stderr)
    return 1 if failed else 0
