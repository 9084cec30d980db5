"""Property-based tests: whatever is thrown at POST /classify, the answer is a 200 or a 4xx
with a JSON message, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_support import assert_still_serving, make_client
from conftest import rubin_files, ztf_fits_files

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Finite and non-finite numbers, huge integers, strings, nulls, booleans: every JSON scalar.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
# Keys the API knows, so that random documents get past the first checks often enough to reach the deep ones.
keys = st.one_of(st.sampled_from(["candidates", "survey", "science", "template", "difference", "id", "centre"]),
                 st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                          st.dictionaries(keys, inner, max_size=6)), max_leaves=40)
pixels = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.none(),
                   st.integers(min_value=-(10**5), max_value=10**5))
stamps = st.one_of(
    st.lists(st.lists(pixels, min_size=0, max_size=12), min_size=0, max_size=12),  # ragged, empty, 2-D
    st.integers(1, 70).flatmap(lambda n: st.lists(st.lists(pixels, min_size=n, max_size=n), min_size=1, max_size=70)),
    st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),  # base64 junk
    documents,
)
candidates = st.fixed_dictionaries(
    {}, optional={"science": stamps, "template": stamps, "difference": stamps,
                  "id": st.one_of(st.text(max_size=5), st.integers(), st.floats()),
                  "survey": st.sampled_from(["ztf", "rubin", "other"]),
                  "centre": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3)})


@pytest.fixture(scope="module")
def client():
    with make_client(max_candidates=8, max_body_bytes=2_000_000) as c:
        yield c


def check(response) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert "results" in body if response.status_code == 200 else body["detail"]


@FUZZ
@given(document=documents)
def test_random_json_documents(client, document):
    check(client.post("/classify", content=json.dumps(document).encode(), headers={"content-type": "application/json"}))


# Almost-JSON text: the tokens of a request in random order, with the literals that trip parsers
# (an integer past Python's 4300-digit conversion limit, 1e999, NaN, lone surrogates).
tokens = st.sampled_from(['{', '}', '[', ']', ',', ':', '"candidates"', '"survey"', '"science"', '"template"',
                          '"difference"', '"id"', '"centre"', '"ztf"', '"rubin"', 'null', 'true', 'NaN', 'Infinity',
                          '-Infinity', '0', '-1.5e3', '1e999', '7' * 5000, '"\\ud800"', '"SIMPLE"', ' '])


@FUZZ
@given(text=st.lists(tokens, max_size=60).map("".join))
def test_random_almost_json_text(client, text):
    check(client.post("/classify", content=text.encode(), headers={"content-type": "application/json"}))


@FUZZ
@given(survey=st.sampled_from([None, "ztf", "rubin"]), batch=st.lists(candidates, min_size=1, max_size=3))
def test_random_candidates(client, survey, batch):
    body = {"candidates": batch} if survey is None else {"survey": survey, "candidates": batch}
    check(client.post("/classify", content=json.dumps(body).encode(), headers={"content-type": "application/json"}))


@FUZZ
@given(data=st.binary(max_size=2000),
       content_type=st.sampled_from(["application/json", "application/avro", "application/octet-stream"]))
def test_random_bytes(client, data, content_type):
    check(client.post("/classify", content=data, headers={"content-type": content_type}))


ALERTS = [p.read_bytes() for p in ztf_fits_files()[:3] + rubin_files()[:3]]


@FUZZ
@given(which=st.integers(0, len(ALERTS) - 1), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8))
def test_damaged_real_alerts(client, which, cut, flips):
    """Real alerts truncated and with bytes overwritten: scored (damage in pixels) or refused, never a 500."""
    data = bytearray(ALERTS[which][: max(1, int(len(ALERTS[which]) * cut))] if cut < 1.0 else ALERTS[which])
    for position, value in flips:
        data[int(position * len(data))] = value
    check(client.post("/classify", content=bytes(data), headers={"content-type": "application/avro"}))


def test_zz_still_serving_after_the_fuzzing(client):
    assert_still_serving(client)


# ---- structured attacks (tests/hostile.py) ----------------------------------------------------------

import hostile  # noqa: E402
import numpy as np  # noqa: E402

HOSTILE_BODIES = {
    "recursive schema, data 5000 deep": hostile.recursive_container(5000),
    "schema nested 400 deep": hostile.deeply_nested_schema_container(400),
    "deflate bomb (1 GB)": hostile.deflate_bomb(1 << 30),
    "1001 records": hostile.many_records(1001),
    "FITS header declaring 80 GB": hostile.ztf_container([hostile.ztf_record(
        {n: hostile.fits_size_lie() for n in ("science", "template", "difference")})]),
    "constant stamp": hostile.ztf_alert_with(np.full((63, 63), 2.0), hostile.noise_stamp(63), hostile.noise_stamp(63)),
    "1x1 stamps": hostile.ztf_alert_with(np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1))),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_structured_attack_bodies_get_a_422_naming_the_problem(client, name):
    response = client.post("/classify", content=HOSTILE_BODIES[name], headers={"content-type": "application/avro"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    expected = {"recursive schema, data 5000 deep": "recursive", "schema nested 400 deep": "max_schema_depth",
                "deflate bomb (1 GB)": "max_block_bytes", "1001 records": "max_records",
                "FITS header declaring 80 GB": "max_cutout_bytes", "constant stamp": "constant",
                "1x1 stamps": "1x1 pixels"}[name]
    assert expected in detail, detail
    assert "/work" not in detail and "Traceback" not in detail


@pytest.mark.parametrize("stamp, needle", [
    ([[4.0] * 40 for _ in range(40)], "constant near the source"),
    ([[1.0]], "1x1 pixels"),
    ([[float("nan")] * 40 for _ in range(40)], "no finite pixel"),
], ids=["constant", "1x1", "all-masked"])
def test_degenerate_json_stamps_get_a_422(client, stamp, needle):
    good = hostile.noise_stamp(len(stamp)).tolist()
    body = {"survey": "ztf", "candidates": [{"id": "d", "science": stamp, "template": good, "difference": good}]}
    response = client.post("/classify", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422 and needle in response.json()["detail"], response.text
    assert response.json()["stamp"] in ("science", "template")  # 1x1: every stamp is, the first checked is named


def test_unsupported_bitpix_is_named_to_the_client(client):
    fits = base64.b64encode(hostile.fits_bytes(hostile.noise_stamp(40), bitpix=12)).decode()
    good = hostile.noise_stamp(40).tolist()
    body = {"candidates": [{"science": fits, "template": good, "difference": good}]}
    response = client.post("/classify", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422 and "unsupported FITS BITPIX 12" in response.json()["detail"], response.text
