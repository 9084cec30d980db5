"""Property-based tests: whatever the bytes, decoding fails cleanly (DecodeError) or succeeds."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rubin_files, ztf_files
from service.decode import schemas
from service.decode.alerts import Alert, DecodeError, decode_message
from service.decode.stamps import decode_stamps
from service.contract import StampContract

SAMPLES = [p.read_bytes() for p in ztf_files() + rubin_files()]
WIRE = [schemas.to_wire_format(p.read_bytes(), version=p.name[1:4]) for p in rubin_files()[::4]]
SEEDS = SAMPLES + WIRE
KINDS = {"decode", "schema", "cutout"}
CONTRACTS = {"ztf": StampContract(size=63), "rubin": StampContract(size=31)}

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_cleanly(message) -> list[Alert] | None:
    try:
        alerts = decode_message(message)
    except DecodeError as exc:
        assert exc.kind in KINDS and exc.reason
        return None
    for alert in alerts:
        assert alert.survey in ("ztf", "rubin")
        assert set(alert.images) == {"science", "template", "difference"}
        assert all(image.ndim == 2 and image.dtype == np.float32 for image in alert.images.values())
    return alerts


@st.composite
def mutated(draw):
    """A real alert (container or wire format) with bytes flipped, cut, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        where = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete", "overwrite"]))
        if action == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[where:]
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[where : where + draw(st.integers(1, 64))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[where : where + len(chunk)] = chunk
    return bytes(data)


def with_prefix(prefix: bytes):
    return st.binary(max_size=2048).map(lambda body: prefix + body)


ANY_BYTES = st.one_of(
    st.binary(max_size=4096),
    with_prefix(b"Obj\x01"),
    # wire format with ids the package knows (and random bodies)
    st.sampled_from([704, 900, 1101, 300, 0, 2**32 - 1]).flatmap(
        lambda i: with_prefix(b"\x00" + i.to_bytes(4, "big"))),
)


@FUZZ
@given(ANY_BYTES)
def test_random_bytes_never_escape_decode_error(message):
    decode_cleanly(message)


@FUZZ
@given(mutated())
def test_mutated_alerts_never_escape_decode_error(message):
    decode_cleanly(message)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(mutated(), ANY_BYTES, st.sampled_from(SAMPLES)), max_size=12))
def test_decode_stamps_accounts_for_every_message(messages):
    batches, failures = decode_stamps(messages, CONTRACTS)
    scored = {index for batch in batches.values() for index in batch.indices}
    failed = {failure.index for failure in failures}
    assert scored | failed == set(range(len(messages)))
    assert all(f.kind in KINDS for f in failures)
    for survey, batch in batches.items():
        assert batch.stamps.shape == (len(batch.alerts), *CONTRACTS[survey].input_shape)
        assert batch.stamps.dtype == np.float32


# Structured attacks (see tests/hostile.py), small enough to build by the hundred, then mutated:
# each must be refused cleanly, or decoded when a mutation happened to make it harmless.
import hostile  # noqa: E402
from service.limits import DecodeLimits  # noqa: E402

HOSTILE_LIMITS = DecodeLimits(max_block_bytes=1 << 20, max_records=50, max_cutout_bytes=1 << 20)
ATTACKS = st.one_of(
    st.integers(1, 6000).map(hostile.recursive_container),
    st.integers(33, 400).map(hostile.deeply_nested_schema_container),
    st.integers(2, 8).map(lambda mib: hostile.deflate_bomb(mib << 20)),
    st.integers(51, 200).map(hostile.many_records),
    st.integers(2, 5).map(lambda n: hostile.huge_stamps(records=n, side=600)),
    st.sampled_from([hostile.fits_size_lie(100_000), hostile.fits_size_lie(3000)]).map(
        lambda lie: hostile.ztf_container([hostile.ztf_record({"science": lie, "template": lie, "difference": lie})])),
    st.sampled_from([np.full((63, 63), 3.0), np.ones((1, 1)), np.full((63, 63), np.nan)]).map(
        lambda bad: hostile.ztf_alert_with(bad, hostile.noise_stamp(63), hostile.noise_stamp(63))),
)


@st.composite
def mutated_attack(draw):
    data = bytearray(draw(ATTACKS))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(data) - 1))
        data[where] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(mutated_attack(), min_size=1, max_size=4))
def test_structured_attacks_are_refused_or_scored_never_escape(messages):
    store = schemas.SchemaStore(limits=HOSTILE_LIMITS)
    for message in messages:
        try:
            decode_message(message, schemas=store, crop=63)
        except DecodeError as exc:
            assert exc.kind in KINDS and exc.reason
    batches, failures = decode_stamps(messages, CONTRACTS, schemas=store)
    scored = {index for batch in batches.values() for index in batch.indices}
    assert scored | {f.index for f in failures} == set(range(len(messages)))
