"""From Kafka message values to model-ready stamp batches, one per survey.

The step the consumer, the API and the benchmark share::

    batches, failures = prepare(messages, {"ztf": ztf_contract, "rubin": rubin_contract})
    scores = scorer.score(batches["ztf"].stamps)     # [n, *contract.input_shape] float32

Every message is decoded (`service.alerts.decode_message`), its alerts are grouped by
survey, and each survey's stamps are written by `service.contract.assemble` straight
into one preallocated, contiguous float32 buffer (no per-alert arrays to stack).
Every problem with one message becomes a `Failure` that names it by index; one bad
message never fails the batch.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from service.alerts import Alert, DecodeError, LazyRecord, decode_message
from service.contract import StampContract, StampError, assemble
from service.schemas import SchemaStore

log = logging.getLogger(__name__)

#: Below this many messages per worker a process pool costs more than it saves.
MIN_MESSAGES_PER_WORKER = 64


@dataclass
class Failure:
    """A message (or one alert of it) that will not be scored.

    Attributes
    ----------
    index : int
        Position of the message in the input sequence.
    kind : str
        ``decode``, ``schema`` or ``cutout`` (`service.metrics.FAILURE_REASONS`).
    reason : str
        What is wrong, for people.
    """

    index: int
    kind: str
    reason: str


@dataclass
class SurveyBatch:
    """The decodable alerts of one survey and their model input.

    Attributes
    ----------
    survey : str
    alerts : list of Alert
        In input order; ``alerts[i]`` is scored by ``stamps[i]``.
    indices : list of int
        Input message index of each alert (repeated when a message holds several alerts).
    stamps : ndarray
        float32, C-contiguous, shape ``[len(alerts), *contract.input_shape]``.
    """

    survey: str
    alerts: list[Alert] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    stamps: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0, 0), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.alerts)


def prepare(
    messages: Sequence[bytes],
    contracts: Mapping[str, StampContract],
    survey: str = "auto",
    schemas: SchemaStore | None = None,
    workers: int | None = None,
) -> tuple[dict[str, SurveyBatch], list[Failure]]:
    """Decode messages and assemble each survey's model input.

    Parameters
    ----------
    messages : sequence of bytes
        Kafka message values (ZTF containers, Rubin wire format or containers).
    contracts : mapping of str to StampContract
        The stamp contract of each survey's model; alerts of a survey without one fail
        with kind ``schema``.
    survey : {"auto", "ztf", "rubin"}
        Passed to `decode_message`.
    schemas : SchemaStore, optional
        Passed to `decode_message`.
    workers : int, optional
        Decode in this many worker processes (``forkserver``: a script that uses them
        needs the ``if __name__ == "__main__":`` guard). ``None``, 0 or 1 decode in this
        process: the default, and the fastest on a 2-core machine (see the README's
        performance section). Batches under ``workers * MIN_MESSAGES_PER_WORKER``
        messages are always decoded here, and so is a batch whose pool broke.

    Returns
    -------
    batches : dict of str to SurveyBatch
        One per survey with at least one decodable alert.
    failures : list of Failure
        Sorted by message index.
    """
    decoded = _decode_all(messages, survey, schemas, workers)
    failures: list[Failure] = []
    by_survey: dict[str, list[tuple[int, Alert]]] = {}
    for index, result in enumerate(decoded):
        if isinstance(result, DecodeError):
            failures.append(Failure(index, result.kind, result.reason))
            continue
        for alert in result:
            if alert.survey not in contracts:
                loaded = ", ".join(sorted(contracts)) or "none"
                failures.append(Failure(index, "schema", f"no model for {alert.survey} alerts (models loaded for: {loaded})"))
                continue
            by_survey.setdefault(alert.survey, []).append((index, alert))

    batches: dict[str, SurveyBatch] = {}
    for name, items in by_survey.items():
        contract = contracts[name]
        stamps = np.empty((len(items), *contract.input_shape), dtype=np.float32)
        batch = SurveyBatch(survey=name)
        row = 0
        for index, alert in items:
            try:
                assemble(alert.images, contract, alert.centre, out=stamps[row])
            except StampError as exc:
                which = f"{alert.survey} {_id_name(alert)} {alert.candidate_id}"
                failures.append(Failure(index, "cutout", f"{exc} ({which})"))
                continue
            batch.alerts.append(alert)
            batch.indices.append(index)
            row += 1
        # A prefix of a C-contiguous array is C-contiguous: no copy when some alerts failed.
        batch.stamps = stamps[:row]
        batches[name] = batch
    failures.sort(key=lambda f: f.index)
    return batches, failures


def _id_name(alert: Alert) -> str:
    return "candid" if alert.survey == "ztf" else "diaSourceId"


def _decode_one(message, survey: str, schemas) -> list[Alert] | DecodeError:
    try:
        return decode_message(message, survey=survey, schemas=schemas)
    except DecodeError as exc:
        return exc


def _decode_all(messages, survey, schemas, workers) -> list:
    workers = int(workers or 0)
    if workers > 1 and len(messages) >= workers * MIN_MESSAGES_PER_WORKER:
        try:
            return _decode_in_pool(messages, survey, schemas, workers)
        except Exception as exc:  # a dead worker (killed, out of memory...) must not lose the batch
            log.warning("decoding worker pool failed (%s: %s); decoding this batch in-process",
                        type(exc).__name__, exc)
            pool = _POOLS.pop(workers, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
    return [_decode_one(message, survey, schemas) for message in messages]


# --------------------------------------------------------------------------- worker processes

_POOLS: dict[int, ProcessPoolExecutor] = {}
_WORKER_STORES: dict[tuple, SchemaStore] = {}


def _store_config(schemas: SchemaStore | None) -> tuple | None:
    """What a worker needs to rebuild the caller's store (stores hold locks and clients: not picklable)."""
    if schemas is None:
        return None
    version = None if schemas.rubin_version is None else "%d.%d" % schemas.rubin_version
    return (schemas.registry_url, version, schemas.timeout)


def _decode_chunk(messages: list[bytes], survey: str, config: tuple | None) -> list:
    if config is None:
        store = None
    else:
        store = _WORKER_STORES.get(config)
        if store is None:
            store = _WORKER_STORES[config] = SchemaStore(config[0], config[1], config[2])
    results = [_decode_one(message, survey, store) for message in messages]
    for result in results:
        if not isinstance(result, DecodeError):
            for alert in result:
                # The parent has the message: re-attach the lazy record there rather than
                # sending every message back through the pipe.
                alert.record = None
    return results


def _pool(workers: int) -> ProcessPoolExecutor:
    pool = _POOLS.get(workers)
    if pool is None:
        # forkserver, not fork: the consumer runs librdkafka threads, which fork does not copy safely.
        context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
        pool = _POOLS[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    return pool


def _decode_in_pool(messages, survey, schemas, workers) -> list:
    config = _store_config(schemas)
    size = -(-len(messages) // workers)
    chunks = [list(messages[i : i + size]) for i in range(0, len(messages), size)]
    futures = [_pool(workers).submit(_decode_chunk, chunk, survey, config) for chunk in chunks]
    results: list = []
    for future in futures:
        results.extend(future.result())
    for message, result in zip(messages, results):
        if not isinstance(result, DecodeError):
            for index, alert in enumerate(result):
                alert.record = LazyRecord(message, index, schemas)
    return results


@atexit.register
def shutdown_pools() -> None:
    """Stop the worker processes (also called at interpreter exit)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()
