"""Structured attacks on the decoder: each is refused with a reason naming the limit, within bounded memory.

Recursive schemas, codec bombs, FITS headers that lie about their size, containers of many
records, huge stamps, degenerate stamps. Memory is measured with ``tracemalloc`` (every
buffer here is a Python or numpy allocation, both traced) with the garbage collector off,
so that nothing depends on when it runs.
"""

from __future__ import annotations

import gc
import gzip
import json
import subprocess
import sys
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest

import hostile
from conftest import REPO, ztf_fits_files
from service.decode.alerts import DecodeError, decode_message, read_cutout, scrub_paths
from service.decode.stamps import decode_stamps
from service.contract import StampContract, crop_around_source, fit_stamp
from service.limits import DecodeLimits
from service.decode.schemas import SchemaStore, UnknownSchema, check_schema_shape

MiB = 1024 * 1024
CONTRACTS = {"ztf": StampContract(size=63)}


def refused(message, *needles, limits: DecodeLimits | None = None, kind: str | None = None, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode_message(message, schemas=SchemaStore(limits=limits or DecodeLimits()), **kwargs)
    for needle in needles:
        assert needle in caught.value.reason, (needle, caught.value.reason)
    if kind is not None:
        assert caught.value.kind == kind, caught.value
    return caught.value


@contextmanager
def traced_peak():
    """Peak of traced memory (bytes) above the start, with the garbage collector off."""
    result = {}
    gc.collect()
    gc.disable()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    try:
        yield result
    finally:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        gc.enable()
        result["peak"], result["left"] = peak - start, current - start


# ---- schemas -------------------------------------------------------------------------------------

def test_recursive_schema_with_data_nested_5000_deep_is_refused_not_a_crash():
    """The message that used to overflow the C stack of the Avro reader (a segmentation fault).

    Decoded in a child process, so that a crash fails this test instead of the test run.
    """
    script = ("import sys; sys.path.insert(0, 'tests'); import hostile\n"
              "from service.decode.alerts import decode_message, DecodeError\n"
              "try:\n    decode_message(hostile.recursive_container(5000))\n"
              "except DecodeError as exc:\n    print('refused', exc.kind, exc.reason)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the decoder died (status {done.returncode}): {done.stderr[-500:]}"
    assert done.stdout.startswith("refused schema") and "recursive" in done.stdout, done.stdout


def test_recursion_through_a_named_reference_is_found():
    inner = {"type": "record", "name": "Inner", "fields": [{"name": "back", "type": ["null", "ns.Outer"]}]}
    outer = {"type": "record", "name": "Outer", "namespace": "ns", "fields": [{"name": "inner", "type": inner}]}
    with pytest.raises(UnknownSchema, match="recursive"):
        check_schema_shape(outer, 32)
    # A named type used again after its definition is not recursion.
    point = {"type": "record", "name": "Point", "fields": [{"name": "x", "type": "double"}]}
    reuse = {"type": "record", "name": "Pair", "fields": [{"name": "a", "type": point}, {"name": "b", "type": "Point"}]}
    assert check_schema_shape(reuse, 32) == 2


def test_deeply_nested_schema_is_refused_with_the_limit():
    refused(hostile.deeply_nested_schema_container(200), "nests deeper than 32", "max_schema_depth", kind="schema")
    # a reference counts the depth of the type it names
    kind = "Leaf"
    leaf = {"type": "record", "name": "Leaf", "fields": [{"name": "v", "type": {"type": "array", "items": "int"}}]}
    nested: object = kind
    for _ in range(30):
        nested = {"type": "array", "items": nested}
    schema = {"type": "record", "name": "Top", "fields": [{"name": "leaf", "type": leaf}, {"name": "n", "type": nested}]}
    with pytest.raises(UnknownSchema, match="deeper than 32"):
        check_schema_shape(schema, 32)


def test_real_alert_schemas_are_well_inside_the_depth_limit(sample_data):
    for path in ztf_fits_files()[:3]:
        (alert,) = decode_message(path.read_bytes(), schemas=SchemaStore(limits=DecodeLimits(max_schema_depth=8)))
        assert alert.survey == "ztf"


def test_schema_over_the_size_limit_is_refused_before_parsing():
    schema = dict(hostile.ZTF_SCHEMA, doc="x" * (2 * MiB))
    refused(hostile.container(schema, [(1, b"\x00")]), "over the limit of 1048576", "max_schema_bytes", kind="schema")


def test_schema_cache_is_bounded_in_bytes():
    """Distinct large schemas (a doc string makes each one new) never take more than the budget."""
    store = SchemaStore(limits=DecodeLimits(max_schema_cache_bytes=4 * MiB))
    for i in range(40):
        schema = dict(hostile.ZTF_SCHEMA, doc=f"{i} " + "y" * 200_000)
        store.container_schema(json.dumps(schema).encode())
        assert store.cached_bytes <= 2 * MiB  # half of the budget for container schemas
    assert len(store._by_text) >= 2, "recent schemas are still cached"


# ---- codec bombs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [hostile.deflate_bomb, hostile.bzip2_bomb], ids=["deflate", "bzip2"])
def test_codec_bomb_is_refused_at_the_block_limit_without_inflating_it(build):
    bomb = build(64 * MiB)
    assert len(bomb) < 100_000
    with traced_peak() as memory:
        refused(bomb, "decompresses to more than 1048576 bytes", "max_block_bytes", kind="decode",
                limits=DecodeLimits(max_block_bytes=MiB))
    assert memory["peak"] < 8 * MiB, memory


def test_blocks_of_a_message_are_bounded_together():
    import io

    import fastavro

    record = io.BytesIO()
    fastavro.schemaless_writer(record, hostile.ZTF_SCHEMA, hostile.ztf_record({"science": bytes(600_000)}))
    block = hostile._deflate(record.getvalue())  # each block is fine alone: 0.6 MB inflated
    message = hostile.container(hostile.ZTF_SCHEMA, [(1, block)] * 3, codec="deflate")
    refused(message, "more than 1048576 bytes", "max_message_bytes", limits=DecodeLimits(max_message_bytes=MiB))


def test_unknown_codec_is_named():
    refused(hostile.container(hostile.ZTF_SCHEMA, [(1, b"\x00")], codec="brotli"), "unknown Avro container codec",
            "'brotli'", kind="decode")


def test_failed_decodes_free_their_buffers_without_the_garbage_collector():
    """A block that inflates (within the limit) and then fails to decode leaves nothing behind."""
    junk = hostile.container(hostile.ZTF_SCHEMA, [(1, hostile._deflate(b"\x07" * (12 * MiB)))], codec="deflate")
    store = SchemaStore()
    for _ in range(2):  # the first call also caches the schema
        with traced_peak() as memory:
            try:
                decode_message(junk, schemas=store)
            except DecodeError as exc:
                error = exc
    assert memory["peak"] > 12 * MiB, "the block was inflated"
    assert memory["left"] < MiB, f"{memory['left']} bytes still held after the failure"
    del error


# ---- FITS ----------------------------------------------------------------------------------------

def test_fits_header_declaring_80_gb_is_refused_before_allocating():
    with traced_peak() as memory:
        with pytest.raises(DecodeError, match="declares a 100000x100000 image of 80000000000 bytes, over the limit"):
            read_cutout(hostile.fits_size_lie(100_000))
    assert memory["peak"] < MiB


def test_fits_header_declaring_more_than_follows_is_named():
    lie = hostile.fits_bytes(np.zeros((1, 1)), {"NAXIS1": "900", "NAXIS2": "900"})
    with pytest.raises(DecodeError, match="only 2880 bytes follow"):
        read_cutout(lie)


def test_unsupported_bitpix_is_named_in_fits_terms():
    with pytest.raises(DecodeError) as caught:
        read_cutout(hostile.fits_bytes(hostile.noise_stamp(16), bitpix=12))
    assert "unsupported FITS BITPIX 12" in caught.value.reason and "KeyError" not in caught.value.reason


def test_gzip_cutout_bomb_is_refused_at_the_cutout_limit():
    bomb = gzip.compress(bytes(64 * MiB), 9)
    with pytest.raises(DecodeError, match=r"decompresses to more than 4194304 bytes \(max_cutout_bytes\)"):
        read_cutout(bomb)


# ---- many records, huge stamps -------------------------------------------------------------------

def test_many_record_container_is_refused_before_decoding_them():
    message = hostile.many_records(1001)
    with traced_peak() as memory:
        refused(message, "more than 1000 records", "max_records", kind="decode")
    assert memory["peak"] < MiB, "refused from the block headers, before any record was read"
    assert len(decode_message(hostile.many_records(50), schemas=SchemaStore())) == 50


def test_huge_stamps_are_cropped_as_each_record_is_decoded():
    """Twenty records of three 1000x1000 stamps (12 MB of pixels each) in a 0.2 MB body: one record's
    full images at a time, never all twenty."""
    message = hostile.huge_stamps(records=20, side=1000)
    assert len(message) < 400_000
    with traced_peak() as memory:
        alerts = decode_message(message, schemas=SchemaStore(), crop=63)
    assert len(alerts) == 20 and all(image.shape == (63, 63) for a in alerts for image in a.images.values())
    assert memory["peak"] < 80 * MiB, memory  # all twenty records' full images would be 240 MB
    batches, failures = decode_stamps([message], CONTRACTS)
    assert not failures and len(batches["ztf"]) == 20


def test_cropping_keeps_every_stamp_the_model_would_cut():
    rng = np.random.default_rng(7)
    for _ in range(300):
        shape = (int(rng.integers(1, 150)), int(rng.integers(1, 150)))
        shapes = [shape] * 3 if rng.random() < 0.5 else [(int(rng.integers(1, 150)), int(rng.integers(1, 150)))
                                                       for _ in range(3)]
        images = {str(i): rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
        centre = None if rng.random() < 0.5 else (float(rng.uniform(-3, shape[0] + 3)),
                                                  float(rng.uniform(-3, shape[1] + 3)))
        side = int(rng.integers(8, 80))
        size = int(rng.integers(8, side + 1))
        cropped, moved = crop_around_source(images, centre, side)
        for name, image in images.items():
            assert max(cropped[name].shape) <= max(side, *image.shape)
            np.testing.assert_array_equal(fit_stamp(image, size, centre), fit_stamp(cropped[name], size, moved))


# ---- degenerate stamps ---------------------------------------------------------------------------

@pytest.mark.parametrize("science, needle", [
    (np.full((63, 63), 7.5), "constant near the source (every pixel 7.5)"),
    (np.full((63, 63), np.nan), "no finite pixel near the source"),
    (np.ones((1, 1)), "1x1 pixels; at least 8x8"),
    (hostile.noise_stamp(7), "7x7 pixels; at least 8x8"),
], ids=["constant", "all-masked", "1x1", "too-small"])
def test_degenerate_stamps_are_refused_not_scored(science, needle):
    good = hostile.noise_stamp(63)
    message = hostile.ztf_alert_with(science, good, good)
    batches, failures = decode_stamps([message], CONTRACTS)
    assert not any(len(batch) for batch in batches.values()), "a degenerate stamp must not be scored"
    (failure,) = failures
    assert failure.kind == "cutout" and needle in failure.reason, failure
    assert "'science'" in failure.reason


def test_minimum_stamp_side_is_a_setting():
    small = hostile.noise_stamp(12)
    message = hostile.ztf_alert_with(small, small, small)
    assert not decode_stamps([message], CONTRACTS)[1]
    (failure,) = decode_stamps([message], CONTRACTS, schemas=SchemaStore(limits=DecodeLimits(min_stamp_side=16)))[1]
    assert "12x12 pixels; at least 16x16" in failure.reason


# ---- messages ------------------------------------------------------------------------------------

def test_messages_never_show_server_file_paths():
    text = "No such file: '/work/main/.venv/lib/python3.11/site-packages/fastavro/_read.pyx' (see /etc/x.conf)"
    assert "/work" not in scrub_paths(text) and "/etc" not in scrub_paths(text)
    assert scrub_paths("registry http://127.0.0.1:8081/schemas/ids/5 answered") == \
        "registry http://127.0.0.1:8081/schemas/ids/5 answered"
    assert scrub_paths("an image of 63/2 pixels") == "an image of 63/2 pixels"
