"""service.decode.alerts / service.decode.schemas: every sample alert decodes right, every bad one fails cleanly."""

from __future__ import annotations

import copy
import gzip
import io
import json
import re
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fastavro
import numpy as np
import pytest
from astropy.io import fits as afits

from conftest import rubin_files, ztf_fits_files, ztf_jpeg_files
from service.decode import framing, schemas, ztf_fast_path
from service.decode.alerts import NEGATIVE_DETECTION, DecodeError, decode_message, read_full_records
from service.surveys import CUTOUT_FIELDS
from service.contract import fit_stamp

MJD_OFFSET = 2400000.5


# --------------------------------------------------------------------------- helpers


def read_container(data: bytes) -> tuple[dict, list[dict]]:
    """fastavro's own reading of a container: (writer schema, records)."""
    reader = fastavro.reader(io.BytesIO(data))
    records = list(reader)
    return reader.writer_schema, records


def write_container(schema: dict, records: list[dict], codec: str = "null") -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, schema, records, codec=codec)
    return buffer.getvalue()


def astropy_pixels(data: bytes) -> np.ndarray:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with afits.open(io.BytesIO(data)) as hdus:
            return np.asarray(hdus[0].data).astype(np.float32)


def cutout_data(record: dict, field_name: str) -> bytes:
    value = record[field_name]
    return value["stampData"] if isinstance(value, dict) else value


def assert_images_match_astropy(alert, record):
    candidate = record.get("candidate") or {}
    negative = str(candidate.get("isdiffpos", "t")).lower() in NEGATIVE_DETECTION
    for name, field_name in CUTOUT_FIELDS.items():
        expected = astropy_pixels(cutout_data(record, field_name))
        if name == "difference" and negative:
            expected = np.negative(expected)  # ZTF cuts negative detections out of template - science
        assert alert.images[name].dtype == np.float32
        assert alert.images[name].tobytes() == expected.tobytes(), name


def same_record(a, b) -> bool:
    # repr: NaN fields (e.g. Plx in the Rubin samples) compare equal this way.
    return repr(dict(a)) == repr(dict(b))


def rubin_version_of(path) -> str:
    return re.match(r"v(\d+\.\d+)_", path.name).group(1)


def fits_gz(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    afits.PrimaryHDU(pixels).writeto(buffer)
    return gzip.compress(buffer.getvalue())


# --------------------------------------------------------------------------- the real samples


@pytest.mark.parametrize("path", ztf_fits_files(), ids=lambda p: p.name)
def test_ztf_sample_decodes_with_ids_and_images(path):
    data = path.read_bytes()
    _, (record,) = read_container(data)
    (alert,) = decode_message(data)
    assert alert.survey == "ztf"
    assert alert.candidate_id == record["candid"]
    assert alert.object_id == record["objectId"]
    assert alert.observation_mjd == pytest.approx(record["candidate"]["jd"] - MJD_OFFSET, abs=1e-9)
    assert_images_match_astropy(alert, record)
    assert same_record(alert.record, record)  # the whole record, decoded on demand


@pytest.mark.parametrize("path", ztf_jpeg_files(), ids=lambda p: p.name)
def test_ztf_jpeg_prototypes_are_rejected_naming_the_jpeg(path):
    with pytest.raises(DecodeError) as caught:
        decode_message(path.read_bytes())
    assert caught.value.kind == "cutout"
    assert "cutoutScience.stampData is a JPEG image, not FITS" in caught.value.reason


def test_there_are_16_fits_and_6_jpeg_ztf_samples():
    assert len(ztf_fits_files()) == 16 and len(ztf_jpeg_files()) == 6 and len(rubin_files()) == 10


@pytest.mark.parametrize("path", rubin_files(), ids=lambda p: p.name)
def test_rubin_container_sample_decodes_with_ids_and_images(path):
    data = path.read_bytes()
    writer_schema, (record,) = read_container(data)
    assert writer_schema["name"] == "topLevelRecord"  # broker-renamed: detection must not need the name
    (alert,) = decode_message(data)
    assert alert.survey == "rubin"
    assert alert.candidate_id == record["diaSource"]["diaSourceId"]
    assert alert.object_id == str(record["diaObject"]["diaObjectId"])
    assert alert.observation_mjd == record["diaSource"]["midpointMjdTai"]
    assert alert.centre is None
    assert_images_match_astropy(alert, record)
    assert same_record(alert.record, record)


@pytest.mark.parametrize("path", rubin_files(), ids=lambda p: p.name)
def test_rubin_wire_format_with_official_schema_decodes_like_the_container(path):
    data = path.read_bytes()
    version = rubin_version_of(path)
    wire = schemas.to_wire_format(data, version=version)
    major, minor = map(int, version.split("."))
    assert wire[0] == 0 and int.from_bytes(wire[1:5], "big") == major * 100 + minor
    (from_wire,) = decode_message(wire)
    (from_container,) = decode_message(data)
    assert (from_wire.survey, from_wire.candidate_id, from_wire.object_id, from_wire.observation_mjd) == (
        from_container.survey, from_container.candidate_id, from_container.object_id,
        from_container.observation_mjd)
    for name in CUTOUT_FIELDS:
        assert from_wire.images[name].tobytes() == from_container.images[name].tobytes()
    # The official schema of that version, as lsst-alert-packet ships it, reads the body.
    from lsst.alert.packet import Schema, get_schema_path

    official = Schema.from_file(f"{get_schema_path(major, minor)}/lsst.v{major}_{minor}.alert.avsc")
    assert official.deserialize(wire[5:])["diaSource"]["diaSourceId"] == from_container.candidate_id


def test_version_of_broker_records_is_guessed_right():
    for path in rubin_files():
        _, (record,) = read_container(path.read_bytes())
        expected = tuple(map(int, rubin_version_of(path).split(".")))
        assert schemas.guess_rubin_version(record) == expected
        assert schemas.to_wire_format(path.read_bytes())[1:5] == schemas.to_wire_format(
            path.read_bytes(), version=expected)[1:5]


def rubin_record_with_cutouts(version: tuple[int, int]) -> dict:
    """lsst-alert-packet's sample alert of ``version`` with the real cutouts of a Rubin sample."""
    from lsst.alert.packet import get_schema_path

    path = f"{get_schema_path(*version)}/sample_data/fakeAlert.avro"
    with open(path, "rb") as handle:
        record = next(fastavro.reader(handle))
    _, (real,) = read_container(rubin_files()[-1].read_bytes())
    for field_name in CUTOUT_FIELDS.values():
        record[field_name] = real[field_name]
    return record


@pytest.mark.parametrize("version", schemas.rubin_versions(), ids=lambda v: "%d.%d" % v)
def test_every_shipped_rubin_schema_version_decodes(version):
    record = rubin_record_with_cutouts(version)
    wire = schemas.to_wire_format(record, version=version)
    definition = schemas.official_rubin_schema(version)
    has_science = any(f["name"] == "cutoutScience" for f in definition["fields"])
    if not has_science:
        # Schemas before 6.1 carry no science cutout: the alert cannot feed a 3-image model.
        with pytest.raises(DecodeError) as caught:
            decode_message(wire)
        assert caught.value.kind == "cutout" and "cutoutScience is absent" in caught.value.reason
        return
    (alert,) = decode_message(wire)
    assert alert.survey == "rubin"
    assert alert.candidate_id == record["diaSource"]["diaSourceId"]
    assert alert.images["difference"].shape == (30, 30)


def test_to_wire_format_drops_broker_fields_and_keeps_official_ones():
    data = rubin_files()[0].read_bytes()
    wire = schemas.to_wire_format(data, version="7.4")
    (full,) = read_full_records(wire)
    assert "fink_broker_version" not in full and "brokerIngestMjd" not in full
    assert set(full) == {f["name"] for f in schemas.official_rubin_schema("7.4")["fields"]}


# --------------------------------------------------------------------------- schemas and errors


def test_unknown_schema_id_is_a_schema_error():
    wire = bytearray(schemas.to_wire_format(rubin_files()[-1].read_bytes(), version="9.0"))
    wire[1:5] = (4242).to_bytes(4, "big")
    with pytest.raises(DecodeError) as caught:
        decode_message(bytes(wire))
    assert caught.value.kind == "schema" and "4242" in caught.value.reason


def test_configured_version_reads_ids_the_package_does_not_know():
    wire = bytearray(schemas.to_wire_format(rubin_files()[-1].read_bytes(), version="9.0"))
    wire[1:5] = (4242).to_bytes(4, "big")
    (alert,) = decode_message(bytes(wire), schemas=schemas.SchemaStore(rubin_version="9.0"))
    assert alert.survey == "rubin"


def test_wrong_schema_id_for_the_body_is_a_clean_error():
    wire = bytearray(schemas.to_wire_format(rubin_files()[-1].read_bytes(), version="9.0"))
    wire[1:5] = (704).to_bytes(4, "big")  # body written with 9.0, id says 7.4
    with pytest.raises(DecodeError) as caught:
        decode_message(bytes(wire))
    assert caught.value.kind in ("decode", "schema", "cutout")


class _Registry(BaseHTTPRequestHandler):
    """A minimal Confluent-compatible schema registry: GET /schemas/ids/{id}."""

    known: dict[int, str] = {}
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        match = re.fullmatch(r"/schemas/ids/(\d+)", self.path)
        text = self.known.get(int(match.group(1))) if match else None
        body = json.dumps({"schema": text} if text else {"error_code": 40403, "message": "Schema not found"})
        self.send_response(200 if text else 404)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def registry_url():
    _Registry.known = {17: json.dumps(schemas.official_rubin_schema("9.0"))}
    _Registry.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_schema_registry_resolves_ids(registry_url):
    data = rubin_files()[-1].read_bytes()
    wire = schemas.to_wire_format(data, version="9.0", schema_id=17)
    store = schemas.SchemaStore(registry_url=registry_url)
    (alert,) = decode_message(wire, schemas=store)
    assert alert.candidate_id == decode_message(data)[0].candidate_id
    # The id now in the package's convention (900) is unknown to this registry: no fallback.
    unknown = schemas.to_wire_format(data, version="9.0")
    for _ in range(3):
        with pytest.raises(DecodeError) as caught:
            decode_message(unknown, schemas=store)
        assert caught.value.kind == "schema" and "900" in caught.value.reason
    decode_message(wire, schemas=store)
    # Each id was asked once: known ones are cached, unknown ones remembered for a while.
    assert _Registry.requests == ["/schemas/ids/17", "/schemas/ids/900"]


def test_unreachable_registry_is_a_schema_error():
    wire = schemas.to_wire_format(rubin_files()[-1].read_bytes(), version="9.0")
    store = schemas.SchemaStore(registry_url="http://127.0.0.1:9", timeout=1.0)
    with pytest.raises(DecodeError) as caught:
        decode_message(wire, schemas=store)
    assert caught.value.kind == "schema" and "unreachable" in caught.value.reason


def test_each_writer_schema_is_parsed_once():
    store = schemas.SchemaStore()
    files = ztf_fits_files()
    for _ in range(3):
        for path in files:
            decode_message(path.read_bytes(), schemas=store)
    distinct = {framing.read_container_header(p.read_bytes())[0]["avro.schema"] for p in files}
    assert len(store._by_text) == len(distinct) < len(files)


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 50, 2000, -20000, -100, -17, -1])
def test_truncated_ztf_message_is_a_decode_error(cut):
    data = ztf_fits_files()[0].read_bytes()
    with pytest.raises(DecodeError) as caught:
        decode_message(data[:cut])
    assert caught.value.kind == "decode"


@pytest.mark.parametrize("cut", [1, 5, 6, 100, -30000, -1])
def test_truncated_wire_message_is_a_decode_error(cut):
    wire = schemas.to_wire_format(rubin_files()[-1].read_bytes(), version="9.0")
    with pytest.raises(DecodeError) as caught:
        decode_message(wire[:cut])
    assert caught.value.kind == "decode"


@pytest.mark.parametrize("message", [None, b"", b"hello world", b"{\"candid\": 1}", "text", 12])
def test_not_an_alert_is_a_decode_error(message):
    with pytest.raises(DecodeError) as caught:
        decode_message(message)
    assert caught.value.kind == "decode"


def ztf_sample() -> tuple[dict, dict]:
    return read_container(ztf_fits_files()[-1].read_bytes())[0], read_container(ztf_fits_files()[-1].read_bytes())[1][0]


@pytest.mark.parametrize("field_name", list(CUTOUT_FIELDS.values()))
def test_missing_cutout_is_a_cutout_error(field_name):
    from service.decode.stamps import decode_stamps
    from service.contract import StampContract

    schema, record = ztf_sample()
    record[field_name] = None
    batches, (failure,) = decode_stamps([write_container(schema, [record])], {"ztf": StampContract()})
    assert not sum(len(batch) for batch in batches.values())
    assert failure.kind == "cutout" and field_name in failure.reason and "null" in failure.reason


@pytest.mark.parametrize("empty", [False, True], ids=["null", "empty"])
def test_an_alert_without_a_difference_decodes_and_says_why_it_lacks_one(empty):
    schema, record = ztf_sample()
    if empty:
        record["cutoutDifference"]["stampData"] = b""
    else:
        record["cutoutDifference"] = None
    (alert,) = decode_message(write_container(schema, [record]))
    assert sorted(alert.images) == ["science", "template"]
    assert alert.unreadable["difference"].startswith("cutoutDifference")
    assert ("empty" if empty else "null") in alert.unreadable["difference"]


@pytest.mark.parametrize(
    "stamp,words",
    [
        (b"", "empty"),
        (gzip.compress(b"this is not FITS" * 200), "FITS"),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "PNG"),
        (fits_gz(np.zeros((3, 4, 5), dtype=np.float32)), "2-D"),
    ],
    ids=["empty", "gzip-not-fits", "bad-gzip", "png", "3d"],
)
def test_bad_stamp_data_is_a_cutout_error(stamp, words):
    schema, record = ztf_sample()
    record["cutoutTemplate"]["stampData"] = stamp
    with pytest.raises(DecodeError) as caught:
        decode_message(write_container(schema, [record]))
    assert caught.value.kind == "cutout" and "cutoutTemplate" in caught.value.reason
    assert words in caught.value.reason


def test_plain_fits_stamp_data_is_accepted():
    schema, record = ztf_sample()
    record["cutoutScience"]["stampData"] = gzip.decompress(record["cutoutScience"]["stampData"])
    (alert,) = decode_message(write_container(schema, [record]))
    assert alert.images["science"].shape == (63, 63)


def test_survey_is_recognised_by_fields_not_schema_names():
    schema, record = ztf_sample()
    renamed = copy.deepcopy(schema)
    renamed["name"], renamed["namespace"] = "topLevelRecord", "some.broker"
    (alert,) = decode_message(write_container(renamed, [record]))
    assert alert.survey == "ztf" and alert.candidate_id == record["candid"]


def test_survey_argument_rejects_the_other_survey():
    with pytest.raises(DecodeError) as caught:
        decode_message(ztf_fits_files()[0].read_bytes(), survey="rubin")
    assert caught.value.kind == "schema" and "expected a rubin alert, got a ztf alert" in caught.value.reason
    assert decode_message(rubin_files()[0].read_bytes(), survey="rubin")[0].survey == "rubin"


def test_neither_survey_is_a_schema_error():
    schema = {"type": "record", "name": "thing", "fields": [{"name": "x", "type": "long"}]}
    with pytest.raises(DecodeError) as caught:
        decode_message(write_container(schema, [{"x": 1}]))
    assert caught.value.kind == "schema" and "neither" in caught.value.reason


def test_container_with_several_alerts_and_deflate_codec():
    schema, record = ztf_sample()
    second = copy.deepcopy(record)
    second["candid"] += 1
    for codec in ("null", "deflate"):
        alerts = decode_message(write_container(schema, [record, second], codec=codec))
        assert [a.candidate_id for a in alerts] == [record["candid"], record["candid"] + 1]
        assert same_record(alerts[1].record, second)


def test_prototype_without_object_id_uses_alert_id():
    schema, (record,) = read_container(ztf_jpeg_files()[0].read_bytes())
    assert "objectId" not in record
    stamp = ztf_sample()[1]["cutoutScience"]
    for field_name in CUTOUT_FIELDS.values():
        record[field_name] = dict(stamp)
    (alert,) = decode_message(write_container(schema, [record]))
    assert alert.object_id == str(record["alertId"]) and alert.candidate_id == record["candid"]


def test_rubin_alert_without_dia_object():
    _, (record,) = read_container(rubin_files()[-1].read_bytes())
    record["diaObject"] = None
    (alert,) = decode_message(schemas.to_wire_format(record, version="9.0"))
    assert alert.object_id == str(record["diaSource"]["diaObjectId"])


# --------------------------------------------------------------------------- CCD-edge cutouts

TRUNCATED = {p.name: p for p in ztf_fits_files() if p.name in {
    "396522680015040001.avro", "396522680015040002.avro", "472263571115115014.avro"}}


def test_three_samples_are_cut_at_the_ccd_edge():
    shapes = sorted(decode_message(p.read_bytes())[0].images["difference"].shape for p in TRUNCATED.values())
    assert shapes == [(41, 63), (45, 63), (63, 53)]


@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_source_lands_at_the_stamp_centre_after_fit_stamp(name):
    (alert,) = decode_message(TRUNCATED[name].read_bytes())
    assert alert.centre is not None
    rows, cols = alert.images["difference"].shape
    assert alert.centre != ((rows - 1) / 2, (cols - 1) / 2)
    size = 63
    stamp = np.nan_to_num(fit_stamp(alert.images["difference"], size, alert.centre))
    # Brightest pixel of the 3x3-smoothed difference within 4 pixels of the stamp centre: one of
    # these sources is faint (mag 20.8), so single pixels are noise-dominated, the 3x3 sum is not.
    smooth = sum(np.roll(np.roll(stamp, dr, 0), dc, 1) for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    centre = (size - 1) // 2
    window = smooth[centre - 4 : centre + 5, centre - 4 : centre + 5]
    peak = np.unravel_index(np.argmax(np.abs(window)), window.shape)  # a negative detection is a dip
    assert abs(peak[0] - 4) <= 1 and abs(peak[1] - 4) <= 1, peak
    # and the padding went to the side the CCD ended on
    padded_rows = np.isnan(fit_stamp(alert.images["difference"], size, alert.centre)).all(axis=1)
    if rows < size:
        assert padded_rows[0] and not padded_rows[-1]


def test_full_size_cutouts_have_no_centre():
    for path in ztf_fits_files():
        (alert,) = decode_message(path.read_bytes())
        if alert.images["difference"].shape == (63, 63):
            assert alert.centre is None


# --------------------------------------------------------------------------- the fast ZTF path


@pytest.mark.parametrize("path", ztf_fits_files(), ids=lambda p: p.name)
def test_fast_path_finds_exactly_fastavros_cutouts(path):
    from service.decode import alerts

    data = path.read_bytes()
    _, (record,) = read_container(data)
    (fast,) = [r for r, _ in alerts._read_records(data, schemas.SchemaStore(), alerts.FAST)]
    assert isinstance(fast, ztf_fast_path.TailRecord), "the history-skipping path was not taken"
    assert "prv_candidates" not in fast
    for field_name in CUTOUT_FIELDS.values():
        assert fast[field_name] == record[field_name]
    assert fast["candid"] == record["candid"]
    for key in ("jd", "xpos", "ypos", "candid"):
        assert fast["candidate"][key] == record["candidate"][key]


def test_fast_path_steps_aside_for_unusual_cutouts():
    from service.decode import alerts

    schema, record = ztf_sample()
    # A non-ASCII file name and a null cutout: the backwards search finds nothing it trusts,
    # and the record is read from the front.
    record["cutoutScience"]["fileName"] = "é.fits.gz"
    plain = write_container(schema, [record])
    (fast,) = [r for r, _ in alerts._read_records(plain, schemas.SchemaStore(), alerts.FAST)]
    assert not isinstance(fast, ztf_fast_path.TailRecord)
    (alert,) = decode_message(plain)
    assert alert.images["science"].shape == (63, 63)


def test_stamp_that_mimics_a_cutout_tail_still_decodes_right():
    # The difference stamp carries, after its gzip stream, bytes shaped like three whole
    # cutout fields, the last a broken gzip stream. The backwards search takes them; that
    # stamp then fails to decode, and the record is re-read from the front, which gives
    # the true images (the real stamp's trailing bytes are ignored by gzip).
    from service.decode import alerts

    schema, record = ztf_sample()
    truth = decode_message(write_container(schema, [record]))[0]

    def cutout_field(name: bytes, stamp: bytes) -> bytes:
        return b"\x00" + framing.encode_long(len(name)) + name + framing.encode_long(len(stamp)) + stamp

    good = record["cutoutTemplate"]["stampData"]
    mimic = (cutout_field(b"fake-sci.fits.gz", good) + cutout_field(b"fake-ref.fits.gz", good)
             + cutout_field(b"fake-diff.fits.gz", b"\x1f\x8b\x08" + b"\x00" * 40))
    record["cutoutDifference"]["stampData"] += mimic
    data = write_container(schema, [record])
    (taken,) = [r for r, _ in alerts._read_records(data, schemas.SchemaStore(), alerts.FAST)]
    assert taken["cutoutScience"]["fileName"] == "fake-sci.fits.gz"  # the search was fooled...
    (alert,) = decode_message(data)  # ...and decode_message was not
    for key in CUTOUT_FIELDS:
        assert alert.images[key].tobytes() == truth.images[key].tobytes(), key


def test_scoring_reader_schema_exists_for_every_known_writer():
    # Without it decoding stays right but reads every history in full: keep it derivable.
    store = schemas.SchemaStore()
    for version in schemas.rubin_versions():
        assert store.schema_for_id(schemas.rubin_schema_id(*version)).reader is not None, version
    for path in ztf_fits_files() + ztf_jpeg_files() + rubin_files():
        writer = store.container_schema(framing.read_container_header(path.read_bytes())[0]["avro.schema"])
        assert writer.reader is not None, path.name
        if writer.survey == "ztf":
            assert writer.head is not None and writer.tail is not None, path.name


def test_negative_ztf_detections_get_a_science_minus_template_difference():
    """ZTF cuts isdiffpos='f' detections out of template - science; decoded, every
    difference is science - template, so a fading source is a dip, as the contract says."""
    checked = 0
    for path in ztf_fits_files():
        (alert,) = decode_message(path.read_bytes())
        if str(alert.record["candidate"]["isdiffpos"]).lower() not in NEGATIVE_DETECTION:
            continue
        images = {k: fit_stamp(v, 7, alert.centre) for k, v in alert.images.items()}
        assert np.nansum(images["difference"]) < 0, path.name
        checked += 1
    assert checked > 0
