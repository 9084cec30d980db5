"""The scanning page's labels: kept across restarts, two labellers never overwrite each other, and the
export is the CSV that training's ``alerts`` source and ``rbstream evaluate`` read."""

from __future__ import annotations

import csv
import io
import shutil

import pytest

from api_support import make_client
from conftest import ztf_fits_files
from service.api.app import ApiSettings, create_app
from service.api.auth import TokenAuth
from service.api.scan_labels import COLUMNS, LabelInputError, LabelStore
from training.real import alert_files, read_label_table


def test_labels_survive_reopening_the_store(tmp_path):
    store = LabelStore(tmp_path)
    store.put("ztf", 123, "real", "ann", object_id="ZTF1", file="a.avro")
    store.close()
    again = LabelStore(tmp_path)
    assert [(r["labeller"], r["label"]) for r in again.of("ztf", 123)] == [("ann", "real")]


def test_a_second_labeller_is_kept_beside_the_first_and_disagreement_exports_as_unsure(tmp_path):
    store = LabelStore(tmp_path)
    store.put("ztf", 1, "real", "ann")
    store.put("ztf", 1, "bogus", "bob", family="trail")
    assert sorted((r["labeller"], r["label"]) for r in store.of("ztf", 1)) == [("ann", "real"), ("bob", "bogus")]
    (row,) = csv.DictReader(io.StringIO(store.export_csv()))
    assert row["label"] == "unsure" and "ann real" in row["comment"] and "bob bogus" in row["comment"]
    every = list(csv.DictReader(io.StringIO(store.export_csv(every_labeller=True))))
    assert len(every) == 2


def test_a_labeller_relabelling_replaces_only_their_own_label(tmp_path):
    store = LabelStore(tmp_path)
    store.put("ztf", 1, "real", "ann")
    store.put("ztf", 1, "bogus", "bob")
    store.put("ztf", 1, "bogus", "ann", family="cosmic ray")
    assert sorted((r["labeller"], r["label"], r["family"]) for r in store.of("ztf", 1)) == [
        ("ann", "bogus", "cosmic ray"), ("bob", "bogus", "")]
    (row,) = csv.DictReader(io.StringIO(store.export_csv()))
    assert (row["label"], row["family"]) == ("bogus", "cosmic ray")


@pytest.mark.parametrize("label, labeller, needle", [("maybe", "ann", "accepted"), ("real", " ", "labeller")])
def test_bad_labels_are_refused(tmp_path, label, labeller, needle):
    with pytest.raises(LabelInputError, match=needle):
        LabelStore(tmp_path).put("ztf", 1, label, labeller)


def test_the_export_is_read_by_training(tmp_path):
    """labels.csv, beside the queue's alert files, is both training's label table and its list of alerts."""
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    for path in ztf_fits_files()[:2]:
        shutil.copy(path, alerts / path.name)
    app = create_app(settings=ApiSettings(scan_alerts=str(alerts), scan_labels_dir=str(alerts)), auth=TokenAuth())
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        items = client.get("/scan/api/queue").json()["items"]
        assert len(items) == 2
        for item, label in zip(items, ("real", "bogus")):
            answer = client.post("/scan/api/labels", json={"key": item["key"], "label": label, "labeller": "ann",
                                                           "family": "noise peak" if label == "bogus" else ""})
            assert answer.status_code == 200, answer.text
        exported = client.get("/scan/api/labels.csv").text
    assert exported.splitlines()[0] == ",".join(COLUMNS)
    assert exported == (alerts / "labels.csv").read_text()
    table = read_label_table(alerts / "labels.csv")
    assert {int(item["id"]): value for item, value in zip(items, [(1, None), (0, "noise peak")])} == table.by_id
    assert sorted(alert_files(alerts / "labels.csv")) == sorted(alerts.glob("*.avro"))


def test_labelling_refuses_bad_requests_and_unknown_candidates(tmp_path):
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    shutil.copy(ztf_fits_files()[0], alerts)
    with make_client(scan_alerts=str(alerts), scan_labels_dir=str(tmp_path / "labels")) as client:
        (item,) = client.get("/scan/api/queue").json()["items"]
        unknown = client.post("/scan/api/labels", json={"key": "ztf:5", "label": "real", "labeller": "a"})
        assert unknown.status_code == 404 and "ztf:5" in unknown.json()["detail"]
        answer = client.post("/scan/api/labels", json={"key": item["key"], "label": "maybe", "labeller": "a"})
        assert answer.status_code == 422 and "accepted" in answer.json()["detail"]
        assert client.post("/scan/api/labels", json={"key": item["key"], "label": "real"}).status_code == 422
        assert client.get("/scan/api/candidate/ztf:3").status_code == 404


def test_the_page_is_served_whole_and_offline():
    with make_client() as client:
        page = client.get("/scan")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Nothing fetched from elsewhere: no external script, style or font.
    assert "http://" not in page.text and "https://" not in page.text


@pytest.mark.kafka
def test_the_queue_can_be_the_last_alerts_of_the_stream(broker, tmp_path):
    """The last N alerts of the topic the consumer scores, newest included after a refresh; the consumer's
    own offsets untouched (no commits)."""
    from confluent_kafka import Producer

    from streaming import create_topic, unique

    topic = unique("scan-alerts")
    create_topic(broker.bootstrap_servers, topic)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    files = ztf_fits_files()[:4]
    for path in files[:3]:
        producer.produce(topic, path.read_bytes())
    producer.flush(10)
    settings = dict(scan_topic=topic, scan_bootstrap_servers=broker.bootstrap_servers, scan_recent=2,
                    scan_labels_dir=str(tmp_path / "labels"))
    with make_client(**settings) as client:
        first = client.get("/scan/api/queue").json()
        assert "last 2 alerts" in first["source"]
        ids = [item["id"] for item in first["items"]]
        from api_support import decoded

        assert ids == [str(decoded(p).candidate_id) for p in files[1:3]]
        producer.produce(topic, files[3].read_bytes())
        producer.flush(10)
        assert [i["id"] for i in client.get("/scan/api/queue").json()["items"]] == ids  # no refresh: same queue
        refreshed = [i["id"] for i in client.get("/scan/api/queue?refresh=true").json()["items"]]
        assert refreshed == [str(decoded(p).candidate_id) for p in files[2:4]]
        # A candidate shown before the refresh can still be labelled: labels go by key, not position.
        answer = client.post("/scan/api/labels", json={"key": first["items"][0]["key"], "label": "real",
                                                       "labeller": "ann"})
        assert answer.status_code == 200, answer.text


def test_an_unreachable_stream_is_a_clear_503(tmp_path):
    from service.tools.broker import free_port

    settings = dict(scan_topic="alerts", scan_bootstrap_servers=f"127.0.0.1:{free_port('127.0.0.1')}",
                    scan_labels_dir=str(tmp_path / "labels"))
    with make_client(**settings) as client:
        answer = client.get("/scan/api/queue")
    assert answer.status_code == 503 and "cannot read the scanning queue" in answer.json()["detail"]
