"""Helpers of the explanation tests: a small exported model with its torch weights, stamps of real alerts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_model(folder: Path, survey: str = "ztf", size: int = 21, seed: int = 0):
    """An untrained but genuine rbstream model (rotation-pooled CNN, in-graph normalisation) exported to
    ``folder`` as ``model.onnx`` + ``weights.pt`` + ``model_card.json``, loaded as a CPU `Scorer`."""
    import torch

    from service.contract import StampContract
    from service.score.model import Scorer
    from training.export import export_onnx
    from training.model import ARCHITECTURES, ArchConfig, RealBogusNet

    torch.manual_seed(seed)
    contract = StampContract(channels=("template", "science", "difference", "snr_difference"), size=size)
    net = RealBogusNet(contract, ArchConfig(**ARCHITECTURES["tiny"])).eval()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    check = rng.normal(100.0, 10.0, (8, 3, size, size)).astype(np.float32)
    export_onnx(net, folder / "model.onnx", check)
    card = {"name": f"tiny-{survey}", "version": "0", "survey": survey, "threshold": 0.5,
            "input": contract.to_dict()}
    (folder / "model_card.json").write_text(json.dumps(card))
    return Scorer(folder, device="cpu")
