"""The shadow model of ``rbstream consume`` (``--shadow-model``) against a real broker, real models
and the real sample alerts.

1. A shadow that is the shipped ZTF model with another version and threshold (and the shipped
   Rubin model itself): the primary's records are those it publishes without a shadow, every
   alert it scored has one shadow record on the shadow topic naming the shadow, and the
   agreement gauges say what the two models did (same scores: rank correlation 1; labels flip
   for the alerts between the two thresholds).
2. Shadows that fail in ONNX Runtime (a graph whose Reshape cannot work; one that answers NaN),
   or whose records the broker refuses (an invalid shadow topic): the primary delivers and
   commits everything, the failures are counted and logged once.
3. A shadow that cannot stand beside its primary stops the command at start-up (exit 2).

Killing a consumer with a shadow (SIGKILL) is in tests/test_consumer_signals.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import rubin_files, ztf_fits_files, ztf_jpeg_files
from service.publish import records
from service.score.card import label_for
from service.stream.pipeline import ScoringPipeline, SourceMessage
from service.tools import replay
from streaming import (committed, consumer_settings, create_topic, default_models, read_topic,  # noqa: F401
                       running_consumer, scorers, wait_for)

BATCH_SIZE = 8


def metric(series: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(series, labels) or 0.0


def model_copy(source: Path, folder: Path, **card) -> Path:
    """A copy of the model folder ``source`` whose card has ``card``'s fields changed."""
    folder.mkdir(parents=True)
    shutil.copy(source / "model.onnx", folder / "model.onnx")
    document = json.loads((source / "model_card.json").read_text())
    (folder / "model_card.json").write_text(json.dumps({**document, **card}))
    return folder


def graph_model(folder: Path, like, name: str, nodes, initializers) -> Path:
    """A real ONNX model taking ``like``'s input (its card copied, renamed ``name``), the graph ``nodes``."""
    from onnx import TensorProto, helper, save

    from service.contract import ONNX_INPUT, ONNX_OUTPUT

    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", *like.contract.input_shape])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["M"])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_copy(like.path.parent, folder, name=name, version="0.0.1-test")
    save(model, folder / "model.onnx")
    return folder


def raising_model(folder: Path, like) -> Path:
    """Fails at run time in ONNX Runtime: a Reshape to a prime number of rows no batch divides."""
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1_000_003, -1])
    return graph_model(folder, like, "shadow-raises", [
        helper.make_node("Reshape", ["stamps", "shape"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["score"], axes=[1], keepdims=0)], [shape])


def nan_model(folder: Path, like) -> Path:
    """Runs, and answers NaN for every alert (a mean times NaN)."""
    from onnx import TensorProto, helper

    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    return graph_model(folder, like, "shadow-nan", [
        helper.make_node("ReduceMean", ["stamps"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "nan"], ["score"])], [nan])


def replayed(broker, settings, paths) -> list:
    create_topic(broker.bootstrap_servers, settings["input_topic"], partitions=1)  # offsets = replay order
    messages = replay.load_messages(paths)
    assert replay.replay(settings, settings["input_topic"], messages, progress=False).sent == len(messages)
    return messages


def consume_all(broker, settings, scorers, count: int):
    with running_consumer(settings, scorers) as consumer:
        wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]).get(0, -1)
                 >= count, timeout=90, what="every offset committed")
    return consumer


def by_offset(reads) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for read in reads:
        grouped.setdefault(read.source_offset[1], []).append(read)
    return grouped


@pytest.mark.kafka
def test_a_shadow_scores_every_alert_beside_a_primary_that_publishes_as_without_it(broker, scorers, default_models,
                                                                                   tmp_path):
    paths = ztf_fits_files() + ztf_jpeg_files() + rubin_files()
    messages = replay.load_messages(paths)
    # What the primary publishes without a shadow: the same pipeline, in process.
    expected = ScoringPipeline(scorers, records.RecordEncoder("scores")).execute(
        [SourceMessage(m.value, offset=i) for i, m in enumerate(messages)])
    ztf_scores = np.sort([o.record["score"] for o in expected.scores if o.survey == "ztf"])
    assert len(ztf_scores) == len(ztf_fits_files())
    # The shadow's threshold between two middle scores, so that some labels flip but not all.
    shadow_threshold = float((ztf_scores[5] + ztf_scores[6]) / 2)
    primary_threshold = scorers["ztf"].threshold
    assert ztf_scores[5] < shadow_threshold < ztf_scores[6] and shadow_threshold != primary_threshold
    flips = sum(label_for(s, primary_threshold) != label_for(s, shadow_threshold) for s in ztf_scores)
    assert 0 < flips < len(ztf_scores), "the chosen thresholds should flip some labels and keep others"
    retuned = model_copy(default_models / "ztf", tmp_path / "ztf-retuned", version="2.0.0-shadow",
                         threshold=shadow_threshold)

    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE, device="cpu",
                                 shadow_model=[f"ztf={retuned}", f"rubin={default_models / 'rubin'}"])
    assert settings["shadow_topic"] is None  # the default: <output-topic>-shadow
    replayed(broker, settings, paths)
    scored_before = {s: metric("rbstream_shadow_alerts_scored_total", survey=s) for s in ("ztf", "rubin")}
    skipped_before = {s: metric("rbstream_shadow_alerts_skipped_total", survey=s) for s in ("ztf", "rubin")}
    consumer = consume_all(broker, settings, scorers, len(messages))
    primary = by_offset(read_topic(broker.bootstrap_servers, settings["output_topic"], count=len(expected.scores)))
    shadow = by_offset(read_topic(broker.bootstrap_servers, f"{settings['output_topic']}-shadow",
                                  count=len(expected.scores)))

    # The primary's records: as without a shadow (the time of scoring aside).
    assert sorted(primary) == sorted(o.source.offset for o in expected.scores)
    for out in expected.scores:
        (read,) = primary[out.source.offset]
        (record,) = read.items
        assert record["score"] == pytest.approx(out.record["score"], abs=1e-6)
        assert {k: v for k, v in record.items() if k not in ("score", "scored_at")} == \
            {k: v for k, v in out.record.items() if k not in ("score", "scored_at")}
    # One shadow record per alert the primary scored, naming the shadow, keyed and traced alike
    # (a shadow slower than the primary would skip batches; on this short stream it keeps up).
    assert {s: metric("rbstream_shadow_alerts_skipped_total", survey=s) - skipped_before[s]
            for s in ("ztf", "rubin")} == {"ztf": 0, "rubin": 0}
    assert sorted(shadow) == sorted(primary), "alerts the primary dead-lettered are not shadowed"
    versions = {"ztf": "2.0.0-shadow", "rubin": consumer.scorers["rubin"].card.version}
    thresholds = {"ztf": shadow_threshold, "rubin": consumer.scorers["rubin"].threshold}
    for offset, reads in shadow.items():
        assert len(reads) == 1, f"offset {offset}: {len(reads)} shadow records"
        (record,) = reads[0].items
        (main,) = primary[offset][0].items
        survey = main["survey"]
        assert (record["survey"], record["candidate_id"], record["object_id"]) == \
            (survey, main["candidate_id"], main["object_id"])
        assert reads[0].key == primary[offset][0].key and reads[0].headers == primary[offset][0].headers
        assert record["model_version"] == versions[survey] and record["threshold"] == pytest.approx(thresholds[survey])
        assert record["score"] == pytest.approx(main["score"], abs=1e-6)  # the same network
        assert record["label"] == label_for(record["score"], thresholds[survey])

    # The agreement gauges over the window (--monitor-window 1000: all of this stream).
    assert metric("rbstream_shadow_rank_correlation", survey="ztf") == pytest.approx(1.0)
    assert metric("rbstream_shadow_rank_correlation", survey="rubin") == pytest.approx(1.0)
    assert metric("rbstream_shadow_label_flip_share", survey="ztf") == pytest.approx(flips / len(ztf_scores))
    assert metric("rbstream_shadow_label_flip_share", survey="rubin") == 0.0
    assert metric("rbstream_shadow_window_alerts", survey="ztf") == len(ztf_fits_files())
    assert metric("rbstream_shadow_window_alerts", survey="rubin") == len(rubin_files())
    for survey, n in (("ztf", len(ztf_fits_files())), ("rubin", len(rubin_files()))):
        assert metric("rbstream_shadow_alerts_scored_total", survey=survey) - scored_before[survey] == n
    assert metric("rbstream_shadow_model_info", survey="ztf", name=consumer.scorers["ztf"].card.name,
                  version="2.0.0-shadow", provider="CPUExecutionProvider") == 1


@pytest.mark.kafka
def test_a_failing_shadow_is_counted_and_logged_once_and_the_primary_goes_on(broker, scorers, tmp_path, caplog,
                                                                             capfd):
    caplog.set_level(logging.DEBUG, logger="service.stream.shadow")
    paths = ztf_fits_files() + rubin_files()
    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE, device="cpu", shadow_model=[
        f"ztf={raising_model(tmp_path / 'raises', scorers['ztf'])}",
        f"rubin={nan_model(tmp_path / 'nan', scorers['rubin'])}"], shadow_topic=f"shadow-of-{tmp_path.name}")
    messages = replayed(broker, settings, paths)
    before = {(s, k): metric("rbstream_shadow_failures_total", survey=s, kind=k)
              for s, k in (("ztf", "inference"), ("rubin", "non_finite"))}
    consumer = consume_all(broker, settings, scorers, len(messages))

    assert consumer.shadow.scorers["ztf"].card.name == "shadow-raises"  # it did run beside the primary
    scores = read_topic(broker.bootstrap_servers, settings["output_topic"], count=len(messages))
    assert sorted(r.source_offset[1] for r in scores) == list(range(len(messages))), "every primary record"
    for read in scores:
        (record,) = read.items
        assert record["model_version"] == scorers[record["survey"]].card.version
    assert committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]) == {0: len(messages)}
    assert read_topic(broker.bootstrap_servers, settings["shadow_topic"], timeout=5) == []
    assert metric("rbstream_shadow_failures_total", survey="ztf", kind="inference") - before["ztf", "inference"] \
        == len(ztf_fits_files())
    assert metric("rbstream_shadow_failures_total", survey="rubin", kind="non_finite") - before["rubin", "non_finite"] \
        == len(rubin_files())

    shadow_logs = [r for r in caplog.records if r.name == "service.stream.shadow"]
    for survey, kind in (("ztf", "inference"), ("rubin", "non_finite")):
        tag = f"shadow model ({survey}, {kind})"
        warned = [r for r in shadow_logs if r.levelno == logging.WARNING and r.getMessage().startswith(tag)]
        assert len(warned) == 1, [r.getMessage() for r in warned]
        assert len([r for r in shadow_logs if r.levelno == logging.DEBUG and r.getMessage().startswith(tag)]) >= 1, \
            "two or more batches: the later failures at debug level"
    # ONNX Runtime's own error, in rbstream's log line (its per-batch stderr lines are off for the shadow).
    assert "cannot be reshaped" not in capfd.readouterr().err
    assert "cannot be reshaped" in next(r.getMessage() for r in shadow_logs if "(ztf, inference)" in r.getMessage())


@pytest.mark.kafka
def test_shadow_records_the_broker_refuses_are_counted_and_the_primary_goes_on(broker, scorers, default_models,
                                                                               caplog):
    """A shadow topic the broker refuses ("Broker: Invalid topic")."""
    paths = ztf_fits_files()
    settings = consumer_settings(broker.bootstrap_servers, batch_size=BATCH_SIZE, device="cpu",
                                 shadow_model=[str(default_models / "ztf")], shadow_topic="not a valid topic!")
    messages = replayed(broker, settings, paths)
    before = metric("rbstream_shadow_failures_total", survey="ztf", kind="publish")
    with running_consumer(settings, scorers):
        wait_for(lambda: committed(broker.bootstrap_servers, settings["group_id"], settings["input_topic"]).get(0, -1)
                 >= len(messages), timeout=90, what="every offset committed")
        wait_for(lambda: metric("rbstream_shadow_failures_total", survey="ztf", kind="publish") - before
                 >= len(messages), timeout=60, what="every shadow record's failed delivery counted")
    assert metric("rbstream_shadow_failures_total", survey="ztf", kind="publish") - before == len(messages)
    assert len(read_topic(broker.bootstrap_servers, settings["output_topic"], count=len(messages))) == len(messages)
    assert metric("rbstream_shadow_window_alerts", survey="ztf") == len(messages)  # compared all the same
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.getMessage().startswith("shadow model (ztf, publish)")]
    # The broker's refusal comes back as a delivery report; once librdkafka knows, produce() refuses itself.
    assert len(warned) == 1 and ("Invalid topic" in warned[0] or "Unknown topic" in warned[0]), warned


def test_a_shadow_that_cannot_stand_beside_its_primary_stops_the_command_at_start_up(default_models, tmp_path,
                                                                                     caplog):
    from api_support import two_channel_model
    from service.cli import main as rbstream

    two_channel_model(tmp_path / "two-channel")
    required = ["consume", "--input-topic", "a", "--output-topic", "s", "--dlq-topic", "d", "--device", "cpu"]
    assert rbstream(required + ["--shadow-model", f"ztf={tmp_path / 'two-channel'}"]) == 2
    assert "takes other input than the ztf primary" in caplog.text and "channels" in caplog.text
    caplog.clear()
    assert rbstream(required + ["--survey", "ztf", "--shadow-model", f"rubin={default_models / 'rubin'}"]) == 2
    assert "no primary rubin model is loaded" in caplog.text
    caplog.clear()
    assert rbstream(required + ["--shadow-model", str(default_models / "ztf"), "--shadow-topic", "s"]) == 2
    assert "shadow_topic 's' is also the output topic" in caplog.text
