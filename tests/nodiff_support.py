"""A real model without the difference image, and real alerts that lack a usable difference.

The model is the project's own network (`training.model.RealBogusNet`, the tiny
architecture), untrained, on template and science only, exported by `training.export`
with a model card as training writes it: what matters to the service is its contract
(``raw_inputs`` = template, science), not its skill.
"""

from __future__ import annotations

import gzip
import io
import json
import warnings
from pathlib import Path

import fastavro
import numpy as np

from conftest import ztf_fits_files

NODIFF_CHANNELS = ("template", "science")


def nodiff_model(folder: Path, survey: str = "ztf", size: int = 16, name: str = "nodiff-test") -> Path:
    """Export an untrained tiny template+science `RealBogusNet` to ``folder``; returns the folder."""
    import torch

    from service.contract import StampContract
    from training.export import export_onnx
    from training.model import ARCHITECTURES, ArchConfig, RealBogusNet

    contract = StampContract(channels=NODIFF_CHANNELS, size=size)
    torch.manual_seed(0)
    net = RealBogusNet(contract, ArchConfig(**ARCHITECTURES["tiny"])).eval()
    folder.mkdir(parents=True, exist_ok=True)
    card = {"name": name, "version": "0", "survey": survey, "threshold": 0.5, "input": contract.to_dict()}
    (folder / "model_card.json").write_text(json.dumps(card))
    stamps = np.random.default_rng(3).normal(0, 1, (8, *contract.input_shape)).astype(np.float32)
    export_onnx(net, folder / "model.onnx", stamps)
    return folder


def all_nan_fits_gz(shape=(63, 63)) -> bytes:
    """A gzip FITS cutout whose every pixel is NaN (an all-masked stamp)."""
    from astropy.io import fits

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits.PrimaryHDU(np.full(shape, np.nan, dtype=np.float32)).writeto(buffer)
    return gzip.compress(buffer.getvalue())


#: The ways a ZTF alert can lack a usable difference image.
WAYS = ("null", "empty", "masked")


def ztf_without_difference(how: str, path: Path | None = None) -> bytes:
    """A real ZTF alert (the first sample, or ``path``) rewritten with its difference cutout
    ``null`` (the field), ``empty`` (no stampData bytes) or ``masked`` (an all-NaN FITS)."""
    path = path or ztf_fits_files()[0]
    reader = fastavro.reader(io.BytesIO(path.read_bytes()))
    schema = reader.writer_schema
    records = list(reader)
    for record in records:
        if how == "null":
            record["cutoutDifference"] = None
        elif how == "empty":
            record["cutoutDifference"]["stampData"] = b""
        elif how == "masked":
            record["cutoutDifference"]["stampData"] = all_nan_fits_gz()
        else:
            raise ValueError(f"how: {how!r}; one of {WAYS}")
    out = io.BytesIO()
    fastavro.writer(out, schema, records)
    return out.getvalue()
