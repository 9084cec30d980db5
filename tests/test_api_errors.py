"""The error table of POST /classify: each bad input gets its 4xx and a message naming the
problem (which candidate, which stamp), and the server keeps serving afterwards."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json

import numpy as np
import pytest

from api_support import (
    SMALL_LIMITS, assert_still_serving, candidate_json, decoded, good_request, make_client, real_scorers,
    science_array)
from conftest import ztf_fits_files, ztf_jpeg_files
from service.surveys import CUTOUT_FIELDS
from service.api.app import ApiSettings, create_app
from service.api.auth import TokenAuth


@pytest.fixture(scope="module")
def client():
    with make_client(**SMALL_LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def stamp():
    return science_array()


def refused(client, status: int, *needles: str, json_body=None, content=None, content_type="application/json",
            candidate: int | None = None, stamp: str | None = None, **kwargs) -> dict:
    """Post, check the status and that the message names every needle; then check the server still serves."""
    headers = {"content-type": content_type, **kwargs.pop("headers", {})}
    if json_body is not None:
        content = json.dumps(json_body, allow_nan=True).encode()
    response = client.post("/classify", content=content, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    if candidate is not None:
        assert body["candidate"] == candidate
    if stamp is not None:
        assert body["stamp"] == stamp
    assert_still_serving(client)
    return body


def with_stamps(stamp, **overrides) -> dict:
    """A one-candidate request whose stamps are all ``stamp`` except ``overrides`` (None removes one)."""
    candidate = {"id": "c0", "science": stamp, "template": stamp, "difference": stamp}
    for name, value in overrides.items():
        if value is None:
            candidate.pop(name)
        else:
            candidate[name] = value
    return {"survey": "ztf", "candidates": [candidate]}


def second_candidate_bad(stamp, **overrides) -> dict:
    """Two candidates, the second (position 1) carrying ``overrides``: messages must name it."""
    body = with_stamps(stamp, **overrides)
    body["candidates"].insert(0, {"id": "fine", "science": stamp, "template": stamp, "difference": stamp})
    return body


# ---- the body itself ---------------------------------------------------------------------------------

def test_malformed_json(client):
    refused(client, 400, "malformed JSON", "line 1 column", content=b'{"candidates": [}')


def test_body_not_utf8(client):
    refused(client, 400, "not UTF-8", content=b'{"candidates": "\xff\xfe\xfa"}')


def test_empty_body(client):
    refused(client, 400, "empty body", content=b"")


def test_deeply_nested_json(client):
    refused(client, 400, "nested too deeply", content=b"[" * 100_000 + b"]" * 100_000)


def test_json_number_with_too_many_digits(client):
    """Python refuses to convert integers of more than 4300 digits: a 400, not a crash."""
    refused(client, 400, "malformed JSON", "digits", content=b'{"candidates": [{"id": ' + b"7" * 5000 + b"}]}")


def test_json_that_is_not_an_object(client):
    refused(client, 422, "must be a JSON object", content=b"42")


def test_no_candidates(client):
    refused(client, 422, "candidates", json_body={"survey": "ztf", "candidates": []})


def test_unsupported_content_type(client):
    refused(client, 415, "unsupported content type 'text/csv'", content=b"a,b\n1,2", content_type="text/csv")


# ---- stamps ----------------------------------------------------------------------------------------

def test_missing_stamp(client, stamp):
    refused(client, 422, "candidate 1", "missing stamp(s) ['difference']", json_body=second_candidate_bad(
        stamp, difference=None), candidate=1, stamp="difference")


def test_extra_stamp(client, stamp):
    refused(client, 422, "candidate 1", "'mask'", "unknown field", json_body=second_candidate_bad(stamp, mask=stamp),
            candidate=1)


def test_stamp_one_dimensional(client, stamp):
    refused(client, 422, "candidate 1", "stamp 'template'", "2-D", json_body=second_candidate_bad(
        stamp, template=[1.0, 2.0, 3.0]), candidate=1, stamp="template")


def test_stamp_three_dimensional(client, stamp):
    refused(client, 422, "stamp 'science'", "3 or more dimensions", json_body=with_stamps(
        stamp, science=[[[1.0, 2.0]], [[3.0, 4.0]]]), candidate=0, stamp="science")


def test_stamp_empty(client, stamp):
    refused(client, 422, "stamp 'difference'", "empty", json_body=with_stamps(stamp, difference=[]),
            stamp="difference")
    refused(client, 422, "stamp 'difference'", "row 0 is empty", json_body=with_stamps(stamp, difference=[[]]))


def test_stamp_ragged(client, stamp):
    ragged = [row[:] for row in stamp]
    ragged[5] = ragged[5][:-1]
    refused(client, 422, "stamp 'science'", "row 5 has 62", json_body=with_stamps(stamp, science=ragged),
            stamp="science")


def test_stamps_of_different_shapes(client, stamp):
    smaller = [row[:40] for row in stamp]
    refused(client, 422, "candidate 0", "differ in shape", "template 63x40", json_body=with_stamps(
        stamp, template=smaller))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), None], ids=["NaN", "inf", "-inf", "null"])
def test_stamp_without_any_finite_pixel(client, stamp, value):
    hopeless = [[value] * len(stamp[0]) for _ in stamp]
    refused(client, 422, "stamp 'template'", "no finite pixel", json_body=with_stamps(stamp, template=hopeless),
            stamp="template")


def test_non_finite_everywhere_but_far_from_the_source(client):
    """Finite pixels only far from the source leave the model-size stamp without data: refused too."""
    side = real_scorers()["ztf"].contract.size + 40
    flat = [[1.0] * side for _ in range(side)]
    corner = [[float("nan")] * side for _ in range(side)]
    corner[0][0] = 1.0
    refused(client, 422, "candidate 0", "no finite pixel near the source",
            json_body=with_stamps(flat, difference=corner), candidate=0, stamp="difference")


def test_pixel_not_a_number(client, stamp):
    bad = [row[:] for row in stamp]
    bad[2][3] = "12.5"
    refused(client, 422, "pixel [2][3]", "string", json_body=with_stamps(stamp, science=bad), stamp="science")
    bad[2][3] = True
    refused(client, 422, "pixel [2][3]", "boolean", json_body=with_stamps(stamp, science=bad))


def test_pixel_too_large(client, stamp):
    sentinel = [[0] * 63 for _ in range(63)]
    sentinel[0][0] = 123456789
    text = json.dumps(with_stamps(stamp, template=sentinel)).replace("123456789", "9" * 400)
    refused(client, 422, "stamp 'template'", "too large", content=text.encode(), stamp="template")


def test_stamp_of_the_wrong_type(client, stamp):
    refused(client, 422, "stamp 'science'", "JSON object", json_body=with_stamps(stamp, science={"data": [1]}))


def test_stamp_too_large(client):
    huge = [[1.0] * 3000]
    refused(client, 422, "1x3000", "at most", json_body=with_stamps(huge))


# ---- FITS stamps ------------------------------------------------------------------------------------

def test_stamp_not_base64(client, stamp):
    refused(client, 422, "stamp 'science'", "not valid base64", json_body=with_stamps(stamp, science="not base64!"),
            stamp="science")


def test_stamp_base64_but_not_fits(client, stamp):
    junk = base64.b64encode(b"hello, this is not a FITS file").decode()
    refused(client, 422, "stamp 'template'", "not a usable FITS image", json_body=with_stamps(stamp, template=junk))


def test_stamp_is_a_jpeg(client, stamp):
    """The 2016 ZTF prototype alerts carry JPEG stamps: refused, and named as such."""
    record = decoded_record(ztf_jpeg_files()[0])
    jpeg = base64.b64encode(record[CUTOUT_FIELDS["science"]]["stampData"]).decode()
    refused(client, 422, "stamp 'science'", "JPEG", json_body=with_stamps(stamp, science=jpeg))


def test_stamp_truncated_gzip_fits(client, stamp):
    alert = decoded(ztf_fits_files()[0])
    data = candidate_json(alert, "fits_gz")["science"]
    truncated = base64.b64encode(base64.b64decode(data)[:300]).decode()
    refused(client, 422, "stamp 'science'", "FITS", json_body=with_stamps(stamp, science=truncated))


def test_stamp_truncated_plain_fits(client, stamp):
    alert = decoded(ztf_fits_files()[0])
    plain = base64.b64decode(candidate_json(alert, "fits")["difference"])
    truncated = base64.b64encode(plain[:4000]).decode()  # header intact, pixels cut short
    refused(client, 422, "stamp 'difference'", json_body=with_stamps(stamp, difference=truncated))


def test_stamp_gzip_bomb(client, stamp):
    bomb = base64.b64encode(gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)).decode()
    refused(client, 422, "stamp 'science'", "decompresses to more than", json_body=with_stamps(stamp, science=bomb))


# ---- other fields ----------------------------------------------------------------------------------

def test_unknown_survey(client, stamp):
    body = with_stamps(stamp)
    body["survey"] = "panstarrs"
    refused(client, 422, "survey", "'ztf'", json_body=body)


def test_survey_without_a_model(stamp):
    with make_client({"ztf": real_scorers()["ztf"]}) as c:
        body = with_stamps(stamp)
        body["survey"] = "rubin"
        refused(c, 422, "no model loaded for survey 'rubin'", json_body=body, candidate=0)


def test_centre_not_finite(client, stamp):
    body = with_stamps(stamp)
    body["candidates"][0]["centre"] = [float("nan"), 3]
    refused(client, 422, "candidate 0", "centre", json_body=body, candidate=0)


def test_id_of_the_wrong_type(client, stamp):
    body = with_stamps(stamp)
    body["candidates"][0]["id"] = {"nested": 1}
    refused(client, 422, "candidate 0", "'id'", json_body=body)


def test_id_with_a_lone_surrogate(client):
    """JSON can escape half a UTF-16 pair ("\\ud800"); such an id cannot be echoed in UTF-8: refused."""
    body = good_request()
    body["candidates"][0]["id"] = "SURROGATE"
    text = json.dumps(body).replace('"SURROGATE"', '"\\ud800x"')
    refused(client, 422, "candidate 0", "'id'", "lone surrogate", content=text.encode(), candidate=0)


def test_unknown_field_named_with_a_lone_surrogate(client):
    text = json.dumps(good_request()).replace('{"survey"', '{"\\udc80": 1, "survey"', 1)
    refused(client, 422, "unicode string", content=text.encode())


# ---- limits ----------------------------------------------------------------------------------------

def test_too_many_candidates(client):
    candidate = good_request()["candidates"][0]
    refused(client, 413, "too many candidates: 6", "at most 5", json_body={"candidates": [candidate] * 6})


def test_body_over_the_limit_by_content_length(client):
    refused(client, 413, "over the limit of 600000 bytes", content=b" " * 600_001)


def test_body_over_the_limit_refused_before_reading_it():
    """A declared Content-Length over the limit is refused without reading a byte of the body."""
    app = create_app(real_scorers(), ApiSettings(max_body_bytes=1000), auth=TokenAuth())
    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    status, body = asyncio.run(_call(app, receive, [(b"content-length", b"10000000")]))
    assert status == 413 and b"10000000 bytes is over the limit" in body
    assert reads == []


def test_streamed_body_over_the_limit_stops_reading():
    """A chunked upload (no Content-Length) is cut off as soon as it passes the limit."""
    app = create_app(real_scorers(), ApiSettings(max_body_bytes=10_000), auth=TokenAuth())
    reads = []

    async def receive():  # an endless upload, 1 kB at a time
        reads.append(1)
        return {"type": "http.request", "body": b"[" * 1000, "more_body": True}

    status, body = asyncio.run(_call(app, receive, [(b"transfer-encoding", b"chunked")]))
    assert status == 413 and b"over the limit of 10000 bytes" in body
    assert len(reads) == 11


def test_content_length_not_a_number(stamp):
    app = create_app(real_scorers(), ApiSettings(), auth=TokenAuth())

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    status, body = asyncio.run(_call(app, receive, [(b"content-length", b"lots")]))
    assert status == 400 and b"Content-Length 'lots' is not a number" in body


# ---- raw alert bodies ------------------------------------------------------------------------------

def test_raw_body_random_bytes(client):
    body = refused(client, 422, "alert body cannot be decoded", content=b"\x13\x37" * 500,
                   content_type="application/octet-stream")
    assert "(decode)" in body["detail"]


def test_raw_body_truncated_ztf_alert(client):
    data = ztf_fits_files()[0].read_bytes()
    refused(client, 422, "alert body cannot be decoded", content=data[: len(data) // 2],
            content_type="application/avro")


def test_raw_body_with_jpeg_cutouts(client):
    refused(client, 422, "alert body cannot be decoded (cutout)", "JPEG",
            content=ztf_jpeg_files()[0].read_bytes(), content_type="application/avro")


def test_raw_body_empty(client):
    refused(client, 400, "empty body", content=b"", content_type="application/avro")


def test_raw_body_of_the_other_survey(client):
    refused(client, 422, "alert body cannot be decoded (schema)",
            content=ztf_fits_files()[0].read_bytes(), content_type="application/avro", params={"survey": "rubin"})


def test_raw_body_bad_survey_parameter(client):
    refused(client, 422, "survey", content=ztf_fits_files()[0].read_bytes(), content_type="application/avro",
            params={"survey": "hubble"})


# ---- helpers ---------------------------------------------------------------------------------------

def decoded_record(path):
    """The raw Avro record of a sample alert, even one whose cutouts cannot be decoded."""
    import fastavro

    with open(path, "rb") as handle:
        return next(iter(fastavro.reader(handle)))


async def _call(app, receive, headers):
    """One POST /classify straight through ASGI, with a hand-made ``receive``; (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/classify", "raw_path": b"/classify", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"api"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("api", 80)}
    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_model_giving_no_finite_score():
    """A model that answers NaN for some stamps (a user-supplied one, say) gives a 422 naming the candidate."""

    class NaNForBrightStamps:
        def __init__(self, scorer):
            self.scorer = scorer

        def __getattr__(self, name):  # card, contract, threshold...: the real scorer's
            return getattr(self.scorer, name)

        def score(self, stamps):
            scores = self.scorer.score(stamps)
            bright = np.nanmax(stamps.reshape(len(stamps), -1), axis=1) > 1e6
            return np.where(bright, np.float32("nan"), scores)

    with make_client({"ztf": NaNForBrightStamps(real_scorers()["ztf"])}) as c:
        bright = (np.add.outer(np.arange(63.0), np.arange(63.0)) * 1e5).tolist()
        body = good_request()
        body["candidates"].append({"id": "bright", "science": bright, "template": bright, "difference": bright})
        refused(c, 422, "candidate 1", "no finite score", json_body=body, candidate=1)
