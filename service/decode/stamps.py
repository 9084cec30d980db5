"""From Kafka message values to model-ready stamp batches, one per survey.

The step the consumer, the API and the benchmark share::

    batches, failures = decode_stamps(messages, {"ztf": ztf_contract, "rubin": rubin_contract})
    scores = scorer.score(batches["ztf"].stamps)     # [n, *contract.input_shape] float32

Every message is decoded (`service.decode.alerts.decode_message`), its alerts are grouped by
survey, and each survey's stamps are written by `service.contract.assemble` straight
into one preallocated, contiguous float32 buffer (no per-alert arrays to stack).
Every problem with one message becomes a `Failure` that names it by index; one bad
message never fails the batch.

With ``isolate=True`` the untrusted bytes are decoded only in worker processes
(`_decode_isolated`): a message that kills its worker (a native crash in a decoding
library, say) becomes a `Failure` of its own, the worker is replaced, and the caller
goes on. In-process decoding relies on the checks made before any native code runs
(`service.limits`).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from service.decode.alerts import Alert, DecodeError, LazyRecord, decode_message
from service.contract import StampContract, StampError, assemble
from service.limits import DEFAULT_LIMITS
from service.decode.schemas import SchemaStore

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
class SurveyStamps:
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
    fallback : bool
        The alerts the survey's fallback model scores (their difference image is missing or
        unusable; see `decode_stamps`'s ``fallbacks``), not its main model.
    """

    survey: str
    alerts: list[Alert] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    stamps: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0, 0), dtype=np.float32))
    fallback: bool = False

    def __len__(self) -> int:
        return len(self.alerts)


def decode_stamps(
    messages: Sequence[bytes],
    contracts: Mapping[str, StampContract],
    survey: str = "auto",
    schemas: SchemaStore | None = None,
    workers: int | None = None,
    isolate: bool = False,
    fallbacks: Mapping[str, StampContract] | None = None,
) -> tuple[dict[str, SurveyStamps], list[Failure]]:
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
    isolate : bool
        Decode every message in worker processes (``workers`` of them, at least one),
        however small the batch; a message whose worker dies is a `Failure` (kind
        ``decode``) and the worker is replaced. For streams that may carry messages able
        to crash the decoding libraries.
    fallbacks : mapping of str to StampContract, optional
        The contract of a survey's fallback model, one that needs no difference image: an
        alert whose difference cutout is missing (absent, null, empty) or unusable (too
        small, all masked, constant) is assembled for it instead of failing. Without one,
        such an alert fails as it always did.

    Returns
    -------
    batches : dict of str to SurveyStamps
        One per survey with at least one decodable alert, keyed by survey; the alerts of a
        fallback model in a batch of their own, keyed by `fallback_key` of the survey.
    failures : list of Failure
        Sorted by message index.
    """
    # Cutouts are cropped as they are decoded to what the largest model needs: a message of
    # many records with huge images never holds more than one record's full images.
    crop = max((contract.size for contract in (*contracts.values(), *(fallbacks or {}).values())), default=None)
    min_side = (schemas.limits if schemas is not None else DEFAULT_LIMITS).min_stamp_side
    if isolate:
        decoded = _decode_isolated(messages, survey, schemas, max(1, int(workers or 1)), crop)
    else:
        decoded = _decode_all(messages, survey, schemas, workers, crop)
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

    fallbacks = dict(fallbacks or {})
    batches: dict[str, SurveyStamps] = {}
    for name, items in by_survey.items():
        contract = contracts[name]
        stamps = np.empty((len(items), *contract.input_shape), dtype=np.float32)
        batch = SurveyStamps(survey=name)
        spare: list[tuple[int, Alert]] = []
        row = 0
        for index, alert in items:
            try:
                assemble(alert.images, contract, alert.centre, out=stamps[row], min_side=min_side)
            except StampError as exc:
                if name in fallbacks and _difference_at_fault(exc, fallbacks[name]):
                    spare.append((index, alert))
                    continue
                failures.append(Failure(index, "cutout", _stamp_reason(alert, exc)))
                continue
            batch.alerts.append(alert)
            batch.indices.append(index)
            row += 1
        # A prefix of a C-contiguous array is C-contiguous: no copy when some alerts failed.
        batch.stamps = stamps[:row]
        batches[name] = batch
        if spare:
            batches[fallback_key(name)] = _assemble_batch(name, spare, fallbacks[name], min_side, failures)
    failures.sort(key=lambda f: f.index)
    return batches, failures


def fallback_key(survey: str) -> str:
    """Key in `decode_stamps`'s batches of the alerts ``survey``'s fallback model scores."""
    return f"{survey}/fallback"


def _difference_at_fault(exc: StampError, fallback: StampContract) -> bool:
    """Whether only the difference image kept an alert from its model, and ``fallback`` does without it."""
    return bool(exc.cutouts) and set(exc.cutouts) <= {"difference"} and "difference" not in fallback.raw_inputs


def _stamp_reason(alert: Alert, exc: StampError) -> str:
    missing = [name for name in exc.cutouts if name in alert.unreadable]
    if missing:
        # The cutout was missing from the alert itself: say so as the decoder always has.
        return alert.unreadable[missing[0]]
    return f"{exc} ({alert.survey} {_id_name(alert)} {alert.candidate_id})"


def _assemble_batch(survey: str, items: list[tuple[int, Alert]], contract: StampContract, min_side: int,
                    failures: list[Failure]) -> SurveyStamps:
    """The fallback model's batch of ``items``; those it cannot score either join ``failures``."""
    stamps = np.empty((len(items), *contract.input_shape), dtype=np.float32)
    batch = SurveyStamps(survey=survey, fallback=True)
    for index, alert in items:
        try:
            assemble(alert.images, contract, alert.centre, out=stamps[len(batch)], min_side=min_side)
        except StampError as exc:
            failures.append(Failure(index, "cutout", _stamp_reason(alert, exc)))
            continue
        batch.alerts.append(alert)
        batch.indices.append(index)
    batch.stamps = stamps[:len(batch)]
    return batch


def _id_name(alert: Alert) -> str:
    return "candid" if alert.survey == "ztf" else "diaSourceId"


def _decode_one(message, survey: str, schemas, crop: int | None = None) -> list[Alert] | DecodeError:
    try:
        return decode_message(message, survey=survey, schemas=schemas, crop=crop)
    except DecodeError as exc:
        # A fresh error: the caught one's traceback would keep this call's frames alive.
        return DecodeError(exc.kind, exc.reason)


def _decode_all(messages, survey, schemas, workers, crop=None) -> list:
    workers = int(workers or 0)
    if workers > 1 and len(messages) >= workers * MIN_MESSAGES_PER_WORKER:
        try:
            return _decode_in_pool(messages, survey, schemas, workers, crop)
        except Exception as exc:  # a dead worker (killed, out of memory...) must not lose the batch
            log.warning("decoding worker pool failed (%s: %s); decoding this batch in-process",
                        type(exc).__name__, exc)
            pool = _POOLS.pop(workers, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
    return [_decode_one(message, survey, schemas, crop) for message in messages]


# --------------------------------------------------------------------------- worker processes

_POOLS: dict[tuple[int, bool], ProcessPoolExecutor] = {}
_WORKER_STORES: dict[tuple, SchemaStore] = {}


def _store_config(schemas: SchemaStore | None) -> tuple | None:
    """What a worker needs to rebuild the caller's store (stores hold locks and clients: not picklable)."""
    if schemas is None:
        return None
    version = None if schemas.rubin_version is None else "%d.%d" % schemas.rubin_version
    return (schemas.registry_url, version, schemas.timeout, schemas.limits)


def _decode_chunk(messages: list[bytes], survey: str, config: tuple | None, crop: int | None = None) -> list:
    if config is None:
        store = None
    else:
        store = _WORKER_STORES.get(config)
        if store is None:
            store = _WORKER_STORES[config] = SchemaStore(*config)
    results = [_decode_one(message, survey, store, crop) for message in messages]
    for result in results:
        if not isinstance(result, DecodeError):
            for alert in result:
                # The parent has the message: re-attach the lazy record there rather than
                # sending every message back through the pipe.
                alert.record = None
    return results


def _pool(workers: int, isolated: bool = False) -> ProcessPoolExecutor:
    pool = _POOLS.get((workers, isolated))
    if pool is None:
        # forkserver, not fork: the consumer runs librdkafka threads, which fork does not copy safely.
        context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
        if os.name == "posix":
            # Workers forked from a server that has the decoder imported start in milliseconds,
            # which is what replacing a crashed one costs.
            context.set_forkserver_preload(["service.decode.stamps"])
        pool = _POOLS[(workers, isolated)] = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    return pool


def _drop_pool(workers: int, isolated: bool) -> str:
    """Shut a broken pool down; returns how its dead worker ended (for the dead letter)."""
    pool = _POOLS.pop((workers, isolated), None)
    if pool is None:
        return "ended"
    endings = []
    # _processes is private to ProcessPoolExecutor; without it the dead letter only says "ended".
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        code = process.exitcode
        if code is not None and code < 0:
            try:
                endings.append(f"killed by {signal.Signals(-code).name}")
            except ValueError:
                endings.append(f"killed by signal {-code}")
        elif code:
            endings.append(f"exited with status {code}")
    pool.shutdown(wait=False, cancel_futures=True)
    return endings[0] if endings else "ended"


def _decode_in_pool(messages, survey, schemas, workers, crop=None) -> list:
    config = _store_config(schemas)
    size = -(-len(messages) // workers)
    chunks = [list(messages[i : i + size]) for i in range(0, len(messages), size)]
    futures = [_pool(workers).submit(_decode_chunk, chunk, survey, config, crop) for chunk in chunks]
    results: list = []
    for future in futures:
        results.extend(future.result())
    _attach_records(messages, results, schemas)
    return results


def _attach_records(messages, results, schemas) -> None:
    for message, result in zip(messages, results):
        if not isinstance(result, DecodeError):
            for index, alert in enumerate(result):
                alert.record = LazyRecord(message, index, schemas)


def _decode_isolated(messages, survey, schemas, workers: int, crop=None) -> list:
    """Decode in worker processes only; a message that kills its worker becomes a `DecodeError`.

    The batch is shared among the workers. When a worker dies, every message of the chunks
    that did not come back is decoded again alone, in a fresh one-worker pool, so that the
    message that kills a worker is found and only it is refused; the others are decoded.
    """
    config = _store_config(schemas)
    size = -(-len(messages) // workers)
    starts = range(0, len(messages), size)
    pool = _pool(workers, isolated=True)
    futures = [(start, pool.submit(_decode_chunk, list(messages[start : start + size]), survey, config, crop))
               for start in starts]
    results: list = [None] * len(messages)
    unfinished = []
    for start, future in futures:
        try:
            results[start : start + size] = future.result()
        except Exception as exc:  # BrokenProcessPool, or a result that could not come back
            log.warning("a decoding worker failed (%s); decoding its messages one by one", type(exc).__name__)
            unfinished.append(start)
    if unfinished:
        _drop_pool(workers, True)
        for start in unfinished:
            for index in range(start, min(start + size, len(messages))):
                results[index] = _decode_alone(messages[index], survey, config, crop)
    _attach_records(messages, results, schemas)
    return results


def _decode_alone(message: bytes, survey: str, config, crop) -> list[Alert] | DecodeError:
    """One message in a one-worker pool of its own: its result, or a `DecodeError` if it kills the worker."""
    try:
        return _pool(1, isolated=True).submit(_decode_chunk, [message], survey, config, crop).result()[0]
    except Exception as exc:
        ending = _drop_pool(1, True)
        log.error("a message killed its decoding worker (%s, %s); it is refused", ending, type(exc).__name__)
        return DecodeError("decode", f"the decoder crashed on this message (its worker process {ending}); "
                                     "refused, and the worker replaced")


@atexit.register
def shutdown_pools() -> None:
    """Stop the worker processes (also called at interpreter exit)."""
    for pool in list(_POOLS.values()):
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()
