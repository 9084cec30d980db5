"""service.decode.stamps.decode_stamps: messages -> per-survey stamp batches, every bad message a Failure."""

from __future__ import annotations

import copy
import gzip
import io

import fastavro
import numpy as np
import pytest
from astropy.io import fits as afits

from conftest import rubin_files, ztf_fits_files, ztf_jpeg_files
from service.decode.alerts import decode_message
from service.decode.stamps import Failure, SurveyStamps, decode_stamps
from service.contract import StampContract, assemble

CONTRACTS = {
    "ztf": StampContract(channels=("template", "science", "difference"), size=63),
    "rubin": StampContract(channels=("template", "science", "difference", "snr_difference"), size=31),
}


def mixed_messages() -> tuple[list[bytes], dict[int, str]]:
    """All 32 samples interleaved with junk; returns the messages and the expected failure kinds."""
    messages: list[bytes] = []
    expected: dict[int, str] = {}
    for ztf, rubin in zip(ztf_fits_files() + ztf_jpeg_files(), rubin_files() * 3):
        messages.append(ztf)
        messages.append(rubin)
    messages = [p.read_bytes() for p in messages]
    jpeg = {p.read_bytes() for p in ztf_jpeg_files()}
    for index, message in enumerate(messages):
        if message in jpeg:
            expected[index] = "cutout"
    for junk in (b"", b"garbage", messages[0][:1000]):
        expected[len(messages)] = "decode"
        messages.append(junk)
    return messages, expected


def test_decode_stamps_groups_by_survey_and_reports_failures():
    messages, expected = mixed_messages()
    batches, failures = decode_stamps(messages, CONTRACTS)
    assert {f.index: f.kind for f in failures} == expected
    assert [f.index for f in failures] == sorted(f.index for f in failures)
    assert all(isinstance(f, Failure) and f.reason for f in failures)
    assert set(batches) == {"ztf", "rubin"}
    for survey, batch in batches.items():
        assert isinstance(batch, SurveyStamps) and batch.survey == survey
        contract = CONTRACTS[survey]
        assert batch.stamps.shape == (len(batch.alerts), *contract.input_shape)
        assert batch.stamps.dtype == np.float32 and batch.stamps.flags.c_contiguous
        assert len(batch.indices) == len(batch.alerts)
        for row, (alert, index) in enumerate(zip(batch.alerts, batch.indices)):
            assert alert.survey == survey
            # The stamp of each row is the one of the message it points to, assembled on its own.
            (again,) = decode_message(messages[index])
            assert again.candidate_id == alert.candidate_id
            single = assemble(again.images, contract, again.centre)
            np.testing.assert_array_equal(batch.stamps[row], single)
    # Every message is accounted for exactly once.
    scored = set(batches["ztf"].indices) | set(batches["rubin"].indices)
    assert scored.isdisjoint(expected) and scored | set(expected) == set(range(len(messages)))
    assert len(batches["ztf"]) == 16 and len(batches["rubin"]) == 22


def test_survey_without_a_model_is_a_schema_failure():
    messages = [p.read_bytes() for p in ztf_fits_files()[:2] + rubin_files()[:2]]
    batches, failures = decode_stamps(messages, {"ztf": CONTRACTS["ztf"]})
    assert set(batches) == {"ztf"} and batches["ztf"].indices == [0, 1]
    assert [(f.index, f.kind) for f in failures] == [(2, "schema"), (3, "schema")]
    assert "no model for rubin alerts" in failures[0].reason


def test_stamp_error_is_a_cutout_failure_and_the_rest_is_scored():
    reader = fastavro.reader(io.BytesIO(ztf_fits_files()[0].read_bytes()))
    schema, record = reader.writer_schema, next(reader)
    blank = copy.deepcopy(record)
    buffer = io.BytesIO()
    afits.PrimaryHDU(np.full((63, 63), np.nan, dtype=np.float32)).writeto(buffer)
    blank["cutoutDifference"]["stampData"] = gzip.compress(buffer.getvalue())
    out = io.BytesIO()
    fastavro.writer(out, schema, [blank])
    messages = [ztf_fits_files()[1].read_bytes(), out.getvalue(), ztf_fits_files()[2].read_bytes()]
    batches, failures = decode_stamps(messages, CONTRACTS)
    assert [(f.index, f.kind) for f in failures] == [(1, "cutout")]
    assert "no finite pixel" in failures[0].reason
    assert batches["ztf"].indices == [0, 2] and batches["ztf"].stamps.shape[0] == 2
    assert batches["ztf"].stamps.flags.c_contiguous


def test_several_alerts_in_one_message_share_its_index():
    reader = fastavro.reader(io.BytesIO(ztf_fits_files()[0].read_bytes()))
    schema, record = reader.writer_schema, next(reader)
    second = dict(record, candid=record["candid"] + 1)
    out = io.BytesIO()
    fastavro.writer(out, schema, [record, second])
    batches, failures = decode_stamps([b"junk", out.getvalue()], CONTRACTS)
    assert batches["ztf"].indices == [1, 1] and not [f for f in failures if f.index == 1]
    assert [a.candidate_id for a in batches["ztf"].alerts] == [record["candid"], record["candid"] + 1]


def test_empty_input():
    assert decode_stamps([], CONTRACTS) == ({}, [])


def test_survey_argument_is_passed_on():
    messages = [ztf_fits_files()[0].read_bytes(), rubin_files()[0].read_bytes()]
    batches, failures = decode_stamps(messages, CONTRACTS, survey="ztf")
    assert set(batches) == {"ztf"} and [(f.index, f.kind) for f in failures] == [(1, "schema")]


def test_worker_processes_give_the_same_result():
    messages, expected = mixed_messages()
    messages = messages * 4  # enough for the pool to be used (MIN_MESSAGES_PER_WORKER per worker)
    local_batches, local_failures = decode_stamps(messages, CONTRACTS)
    pool_batches, pool_failures = decode_stamps(messages, CONTRACTS, workers=2)
    assert [(f.index, f.kind, f.reason) for f in pool_failures] == [
        (f.index, f.kind, f.reason) for f in local_failures]
    for survey in local_batches:
        assert pool_batches[survey].indices == local_batches[survey].indices
        assert pool_batches[survey].stamps.tobytes() == local_batches[survey].stamps.tobytes()
        first = pool_batches[survey].alerts[0]
        assert repr(dict(first.record)) == repr(dict(local_batches[survey].alerts[0].record))
