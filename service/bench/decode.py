"""``rbstream bench decode``: alerts per second per core, from message bytes to model-ready stamp batch.

The real ZTF and Rubin sample alerts (the ones that decode: ZTF's JPEG-stamp prototypes
are left out), repeated to a few thousand messages, go through

* `service.decode.stamps.decode_stamps` in this process, in batches of the consumer's default size;
* `service.decode.stamps.decode_stamps` with N worker processes (its pool, warmed up first);
* the naive baseline, `service.bench.naive.naive_decode` (a fresh ``fastavro.reader`` per message,
  the standard library's gzip and astropy for every cutout) followed by the same
  `service.contract.assemble` into a batch buffer — so both end at the same place,

in the same run, so the speed-up is a ratio of two numbers measured side by side. The
run also checks, on every distinct sample alert, that the fast path's cutouts are
bit-identical to the naive path's (astropy's).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from service.bench import data
from service.bench.report import Result, summarise

log = logging.getLogger(__name__)

#: The project's targets (the report says whether a run meets them).
TARGET_ZTF_PER_CORE = 2000.0
TARGET_SPEEDUP = 8.0
#: Messages per `decode_stamps` call: the consumer's default batch size.
CHUNK = 256


def _decode_rate(messages: list[bytes], contracts: dict, survey: str, workers: int | None,
                  chunk: int) -> tuple[float, float]:
    """(alerts per second of wall time, alerts per CPU-second of this process)."""
    from service.decode.stamps import decode_stamps

    start, cpu = time.perf_counter(), time.process_time()
    done = 0
    for first in range(0, len(messages), chunk):
        batches, failures = decode_stamps(messages[first:first + chunk], contracts, survey=survey, workers=workers)
        if failures:
            raise RuntimeError(f"{len(failures)} sample alerts failed to decode: {failures[0].reason}")
        done += len(batches[survey])
    return done / (time.perf_counter() - start), done / max(time.process_time() - cpu, 1e-9)


def _naive_rate(messages: list[bytes], contract) -> tuple[float, float]:
    from service.contract import assemble
    from service.bench.naive import naive_decode

    buffer = np.empty((CHUNK, *contract.input_shape), dtype=np.float32)
    start, cpu = time.perf_counter(), time.process_time()
    for i, message in enumerate(messages):
        assemble(naive_decode(message), contract, out=buffer[i % CHUNK])
    return len(messages) / (time.perf_counter() - start), len(messages) / max(time.process_time() - cpu, 1e-9)


def identical_to_naive(messages: list[bytes], survey: str) -> tuple[int, int]:
    """(alerts whose three cutouts are bit-identical to astropy's, alerts compared)."""
    from service.decode.alerts import decode_message
    from service.bench.naive import naive_decode

    same = 0
    for message in messages:
        fast = decode_message(message, survey=survey)[0].images
        slow = naive_decode(message)
        same += all(fast[k].dtype == slow[k].dtype and fast[k].shape == slow[k].shape
                    and np.array_equal(fast[k], slow[k], equal_nan=True) for k in slow)
    return same, len(messages)


def run(args) -> Result:
    quick = args.quick
    count = args.messages or (200 if quick else 4000)
    naive_count = max(50, count // 8)
    repeats = args.repeats or (2 if quick else 5)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or max(2, cores)
    contract_by_survey, notes = data.contracts(args.models)
    result = Result("decode", notes=notes, settings={
        "messages_per_run": count, "naive_messages_per_run": naive_count, "repeats": repeats,
        "decode_chunk": CHUNK, "workers": workers, "quick": quick,
        "path": "message bytes -> service.decode.stamps.decode_stamps -> float32 stamp batch [n, channels, size, size]",
        "naive": "service.bench.naive.naive_decode (fresh fastavro.reader, gzip, astropy) + contract.assemble"})
    result.columns = [("survey", "survey"), ("mode", "decoder"), ("processes", "processes"),
                      ("alerts_per_s", "alerts/s (wall clock)"), ("alerts_per_cpu_s", "alerts per CPU-second"),
                      ("alerts_per_s_per_core", "alerts/s per core"), ("speedup", "× naive (wall)"),
                      ("speedup_cpu", "× naive (CPU time)")]
    surveys = args.survey or data.SURVEYS
    for survey in surveys:
        distinct, rejected = data.decodable_messages(survey, contract_by_survey)
        messages = [distinct[i % len(distinct)] for i in range(count)]
        contract = contract_by_survey[survey]
        same, compared = identical_to_naive(distinct, survey)
        result.notes.append(f"{survey}: {len(distinct)} distinct sample alerts ({rejected} undecodable left out); "
                            f"cutouts bit-identical to astropy's on {same} of {compared}")
        _decode_rate(messages[:CHUNK], contract_by_survey, survey, None, CHUNK)  # warm-up: schema cache, imports
        big_chunk = max(CHUNK, workers * 128)
        _decode_rate(messages[:big_chunk], contract_by_survey, survey, workers, big_chunk)  # start the pool
        naive_messages = messages[:naive_count]
        _naive_rate(naive_messages[:10], contract)  # warm-up: astropy imports
        single, parallel, naive = [], [], []
        for _ in range(repeats):  # interleaved, so a load change on the machine hits all three alike
            single.append(_decode_rate(messages, contract_by_survey, survey, None, CHUNK))
            parallel.append(_decode_rate(messages, contract_by_survey, survey, workers, big_chunk))
            naive.append(_naive_rate(naive_messages, contract))
        wall = {name: [r[0] for r in runs] for name, runs in (("single", single), ("parallel", parallel),
                                                                ("naive", naive))}
        cpu = {name: [r[1] for r in runs] for name, runs in (("single", single), ("naive", naive))}
        ratio = [s / n for s, n in zip(wall["single"], wall["naive"])]
        cpu_ratio = [s / n for s, n in zip(cpu["single"], cpu["naive"])]
        used = min(workers, cores)
        result.rows += [
            {"survey": survey, "mode": "naive (fastavro.reader + astropy)", "processes": 1,
             "alerts_per_s": summarise(wall["naive"], 1), "alerts_per_cpu_s": summarise(cpu["naive"], 1)},
            {"survey": survey, "mode": "decode_stamps", "processes": 1, "alerts_per_s": summarise(wall["single"], 1),
             "alerts_per_cpu_s": summarise(cpu["single"], 1), "alerts_per_s_per_core": summarise(wall["single"], 1), "speedup": summarise(ratio, 2),
             "speedup_cpu": summarise(cpu_ratio, 2)},
            {"survey": survey, "mode": f"decode_stamps, {workers} worker processes", "processes": workers,
             "alerts_per_s": summarise(wall["parallel"], 1),
             "alerts_per_s_per_core": summarise([p / used for p in wall["parallel"]], 1),
             "speedup": summarise([p / n for p, n in zip(wall["parallel"], wall["naive"])], 2)},
        ]
        if survey == "ztf":
            result.targets["ztf_per_core"] = {"target": f">= {TARGET_ZTF_PER_CORE:,.0f} ZTF alerts/s per core",
                                              "measured": summarise(wall["single"], 1),
                                              "met": float(np.median(wall["single"])) >= TARGET_ZTF_PER_CORE}
            result.targets["ztf_speedup"] = {"target": f">= {TARGET_SPEEDUP:g}x the naive baseline, same run",
                                             "measured": summarise(ratio, 2),
                                             "met": float(np.median(ratio)) >= TARGET_SPEEDUP}
    result.notes.append(f"per core: one process is one core, so its alerts/s is the per-core rate; alerts per "
                        f"CPU-second (this process's CPU time) is the same rate less sensitive to other load on "
                        f"the machine; {workers} workers on {cores} usable cores count {min(workers, cores)} cores")
    return result
