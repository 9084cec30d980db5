"""Helpers of the model-reload tests: a models folder of copies of the real models, and new
versions published into it the safe way (a new folder renamed into place)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

from conftest import MODELS_DIR
from service.score.model import CARD_FILE, MODEL_FILE

_published = itertools.count()


def copy_model(source: Path, folder: Path, version: str | None = None, **card_changes) -> Path:
    """``source``'s model.onnx and card in ``folder``; the card's version (and other keys) changed if asked."""
    folder.mkdir(parents=True)
    shutil.copyfile(source / MODEL_FILE, folder / MODEL_FILE)
    card = json.loads((source / CARD_FILE).read_text())
    if version is not None:
        card["version"] = version
    card.update(card_changes)
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def models_folder(root: Path, surveys=("ztf",)) -> Path:
    """``root/models`` holding a copy of each survey's shipped model (its ONNX file and card)."""
    models = root / "models"
    for survey in surveys:
        copy_model(MODELS_DIR / survey, models / survey)
    return models


def publish(models: Path, survey: str, source: Path | None = None, version: str | None = None,
            onnx: bytes | None = None, **card_changes) -> Path:
    """Publish a model for ``survey`` under ``models`` as the README says: written into a new folder,
    then renamed into place (the old folder renamed away first). Returns the new folder.

    ``source`` (default: the shipped model of the survey) gives the files; ``version`` and
    ``card_changes`` rewrite its card; ``onnx`` replaces its ONNX file's bytes.
    """
    staging = models / f".{survey}.new-{next(_published)}"
    copy_model(source or MODELS_DIR / survey, staging, version, **card_changes)
    if onnx is not None:
        (staging / MODEL_FILE).write_bytes(onnx)
    live = models / survey
    live.rename(models / f".{survey}.old-{next(_published)}")
    staging.rename(live)
    return live


def truncated_onnx(survey: str = "ztf") -> bytes:
    """The first half of the shipped model's ONNX file: what a copy cut short leaves."""
    data = (MODELS_DIR / survey / MODEL_FILE).read_bytes()
    return data[: len(data) // 2]


def nan_onnx(size: int = 31, channels: int = 3) -> bytes:
    """A valid ONNX model of the shipped ZTF model's input that answers NaN for every stamp."""
    import onnx
    from onnx import TensorProto, helper

    from service.contract import ONNX_INPUT, ONNX_OUTPUT

    stamps = helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", channels, size, size])
    score = helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["N"])
    constants = [helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
                 helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])]
    nodes = [helper.make_node("ReduceMean", [ONNX_INPUT, "axes"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "nan"], [ONNX_OUTPUT])]
    model = helper.make_model(helper.make_graph(nodes, "nan", [stamps], [score], initializer=constants),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def counter(name: str, **labels) -> float:
    """A sample of the process's default registry (0 when absent)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0
