"""``rbstream bench shadow``: what a shadow model (``rbstream consume --shadow-model``) costs the primary.

The setting of ``rbstream bench e2e`` (`service.bench.e2e`: a real local broker, ``rbstream
consume`` in its own process, alerts replayed by ``rbstream replay``'s code, every output read
back with its latency), with two consumers on one broker, each on its own topics: one alone,
one with the same model as its shadow. Their runs alternate (fixed offered rate, then flat
out, for each in turn, ``--repeats`` times), so that a change of the machine's load falls on
both alike. The shadow's cost is the difference: the primary's throughput and latency with a
shadow beside it against without. The consumer's own ``/metrics`` tell how much of each run the
shadow kept up with: the share of alerts it scored, and those it skipped because it was still
busy with earlier batches (it never holds the primary up; see `service.stream.shadow`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from service.bench import data
from service.bench.e2e import (WARM_UP_ALERTS, InputTopic, OutputReader, _create_topics, consumer_command,
                               measure_run, stream_run_settings)
from service.bench.report import Result, summarise
from service.lifecycle import terminate

log = logging.getLogger(__name__)

MODES = ("primary only", "with shadow (same model)")
#: The consumer's counters read after each run: its primary's scored alerts and the shadow's counts.
COUNTERS = ("rbstream_alerts_scored_total", "rbstream_shadow_alerts_scored_total",
            "rbstream_shadow_alerts_skipped_total", "rbstream_shadow_failures_total")
#: Longest wait, after a run's outputs are in, for the shadow to account for all of its alerts.
SETTLE_SECONDS = 10.0


def counters(port: int) -> dict[str, float]:
    """`COUNTERS` from the consumer's ``/metrics``, summed over their labels."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(COUNTERS, 0.0)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def settled_counters(port: int, shadowed: bool) -> dict[str, float]:
    """The counters once the shadow has accounted (scored, skipped or failed) for every alert the
    primary scored, or after `SETTLE_SECONDS` (it may still work through its queue after a run)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        now = counters(port)
        accounted = sum(now[name] for name in COUNTERS[1:])
        if not shadowed or accounted >= now[COUNTERS[0]] or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


class Contender:
    """One consumer of the comparison, on its own topics, with its output reader and metrics port."""

    def __init__(self, index: int, mode: str, bootstrap: str, args, out: Path, survey: str, models: Path):
        from service.lifecycle import die_with_parent
        from service.tools.broker import free_port

        self.mode = mode
        self.shadowed = index > 0
        self.topics = {"input": f"bench-shadow-{index}-alerts-{survey}", "output": f"bench-shadow-{index}-scores",
                       "dlq": f"bench-shadow-{index}-dead-letters"}
        _create_topics(bootstrap, list(self.topics.values()))
        self.port = free_port()
        # The later --group-id wins over consumer_command's: the two consumers share no group.
        command = consumer_command(bootstrap, self.topics, args, None) + [
            "--group-id", f"rbstream-bench-shadow-{index}", "--metrics-port", str(self.port)]
        if self.shadowed:
            command += ["--shadow-model", str(models / survey)]
        self.log_file = open(out / f"shadow-consumer-{index}.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=data.REPO,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent())
        self.reader = OutputReader(bootstrap, self.topics["input"], [self.topics["output"], self.topics["dlq"]])
        self.inputs = InputTopic(bootstrap, self.topics["input"])
        self.runs: dict[str, list[dict]] = {"fixed": [], "full": []}

    def measure(self, producer, messages: list[bytes], count: int, rate: float | None, broker_pid: int) -> dict:
        """One run (`service.bench.e2e.measure_run`), with the shadow's share of its alerts."""
        before = settled_counters(self.port, self.shadowed)
        run = measure_run(self.inputs, self.reader, self.process, producer, messages, count, rate, broker_pid)
        after = settled_counters(self.port, self.shadowed)
        delta = {name: after[name] - before[name] for name in COUNTERS}
        scored = delta["rbstream_alerts_scored_total"] or 1.0
        run.update(shadowed_share=delta["rbstream_shadow_alerts_scored_total"] / scored,
                   shadow_skipped=int(delta["rbstream_shadow_alerts_skipped_total"]),
                   shadow_failed=int(delta["rbstream_shadow_failures_total"]))
        return run

    def close(self) -> dict[str, float]:
        """Stop the consumer (SIGTERM: batch finished, committed); its counters as it stopped."""
        try:
            final = counters(self.port)
        except Exception as exc:  # the consumer may have died: the report says so
            log.warning("cannot read the metrics of the %s consumer: %s", self.mode, exc)
            final = {}
        self.reader.close()
        terminate(self.process, 60)
        self.log_file.close()
        self.inputs.close()
        return final


def run(args) -> Result:
    from service.tools.broker import LocalBroker
    from service.tools.replay import replay_producer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per /metrics read otherwise
    survey, count, repeats, out = stream_run_settings(args)
    models = data.models_root(args.models)
    contract_by_survey, notes = data.contracts(args.models)
    messages, _ = data.decodable_messages(survey, contract_by_survey)
    result = Result("shadow", notes=notes, settings={
        "survey": survey, "distinct_alerts": len(messages), "alerts_per_run": count, "repeats": repeats,
        "offered_rate": args.rate, "device": args.device, "consumer_batch_size": args.batch_size or "default",
        "quick": args.quick, "shadow_model": str(models / survey), "shadow_threads": "default (1)",
        "consumers": "two rbstream consume processes on one broker, their runs alternating; one with "
                     "--shadow-model (the same model as its primary)",
        "latency": "as bench e2e: input CreateTime -> primary score record readable on the output topic",
        "shadowed_share": "alerts the shadow scored / alerts the primary scored in the run, from the consumer's "
                          "/metrics once the shadow has accounted for them (at most 10 s after the run)"})
    result.columns = [("mode", "run"), ("alerts", "alerts"), ("throughput", "alerts/s"),
                      ("p50_ms", "p50 latency, ms"), ("p99_ms", "p99 latency, ms"), ("max_ms", "max latency, ms"),
                      ("missing", "missing"), ("cores_consumer", "consumer, cores busy"),
                      ("shadowed_share", "share shadowed"), ("shadow_skipped", "shadow skipped")]
    with LocalBroker(log_path=out / "shadow-broker.log") as broker:
        contenders = []
        producer = replay_producer({"bootstrap_servers": broker.bootstrap_servers,
                                    "kafka": {"log.connection.close": "false"}})
        try:
            for index, mode in enumerate(MODES):
                contenders.append(Contender(index, mode, broker.bootstrap_servers, args, out, survey, models))
            pid = broker.process.pid
            for contender in contenders:  # its outputs also say that the consumer's /metrics is up
                measure_run(contender.inputs, contender.reader, contender.process, producer, messages,
                            WARM_UP_ALERTS, None, pid)
            for _ in range(repeats):
                for contender in contenders:
                    contender.runs["fixed"].append(contender.measure(producer, messages, count, args.rate, pid))
                    contender.runs["full"].append(contender.measure(producer, messages, count, None, pid))
        finally:
            finals = {c.mode: c.close() for c in contenders}
        result.settings["counters_at_stop"] = finals
    for contender in contenders:
        for kind, label in (("fixed", f"offered {args.rate:g} alerts/s"), ("full", "full speed")):
            rows = contender.runs[kind]
            row = {"mode": f"{contender.mode}, {label}", "alerts": count,
                   **{k: summarise([r[k] for r in rows], 2) for k in ("throughput", "p50_ms", "p99_ms", "max_ms",
                                                                      "cores_consumer")},
                   "missing": sum(r["missing"] for r in rows), "runs_detail": rows}
            if contender.shadowed:
                row["shadowed_share"] = summarise([r["shadowed_share"] for r in rows], 3)
                row["shadow_skipped"] = sum(r["shadow_skipped"] for r in rows)
                row["shadow_failed"] = sum(r["shadow_failed"] for r in rows)
            result.rows.append(row)
    (alone_fixed, alone_full), (shadowed_fixed, shadowed_full) = result.rows[:2], result.rows[2:]

    def median(row: dict, key: str) -> float:
        return row[key]["median"]

    cost = {"full_speed_throughput_ratio": round(median(shadowed_full, "throughput") /
                                                 median(alone_full, "throughput"), 3),
            "p99_ms_difference_at_offered_rate": round(median(shadowed_fixed, "p99_ms") -
                                                       median(alone_fixed, "p99_ms"), 1),
            "p50_ms_difference_at_offered_rate": round(median(shadowed_fixed, "p50_ms") -
                                                       median(alone_fixed, "p50_ms"), 1)}
    result.settings["cost"] = cost
    result.notes.append(f"with a shadow, full-speed throughput is {cost['full_speed_throughput_ratio']:.0%} of the "
                        f"primary's alone; at {args.rate:g} alerts/s p50 "
                        f"{cost['p50_ms_difference_at_offered_rate']:+g} ms, p99 "
                        f"{cost['p99_ms_difference_at_offered_rate']:+g} ms (medians)")
    if any(r.get("missing") for r in result.rows):
        result.notes.append("some alerts never came out (see missing): the figures cover those that did")
    return result
