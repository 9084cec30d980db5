"""Inputs of the benchmarks: the real sample alerts, the models' stamp contracts, stamps to score."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from service.contract import StampContract
from service.surveys import SURVEYS

REPO = Path(__file__).resolve().parents[2]


def sample_dir() -> Path:
    """The real sample alerts: env ``RBSTREAM_SAMPLE_DATA``, default ``../shared/data`` beside the repository."""
    path = Path(os.environ.get("RBSTREAM_SAMPLE_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(f"sample alerts not found at {path}; set RBSTREAM_SAMPLE_DATA")
    return path


def sample_files(survey: str) -> list[Path]:
    """Every sample alert file of ``survey`` (decodable or not)."""
    files = sorted((sample_dir() / survey).glob("*.avro"))
    if not files:
        raise FileNotFoundError(f"no {survey} sample alerts under {sample_dir() / survey}")
    return files


def models_root(path: str | os.PathLike | None = None) -> Path:
    from service.score.model import models_dir

    return Path(path) if path else models_dir()


def contracts(models: str | os.PathLike | None = None) -> tuple[dict[str, StampContract], list[str]]:
    """Each survey's stamp contract, from its default model's card.

    Returns
    -------
    (contracts by survey, notes) — a survey without a model card gets the default
    `StampContract` and a note saying so.
    """
    from service.score.card import CARD_FILE, ModelCard

    root = models_root(models)
    found, notes = {}, []
    for survey in SURVEYS:
        card = root / survey / CARD_FILE
        if card.exists():
            found[survey] = ModelCard.read(card).contract
        else:
            found[survey] = StampContract()
            notes.append(f"no model card at {card}: {survey} stamps use the default StampContract()")
    return found, notes


def decodable_messages(survey: str, contract_by_survey: dict[str, StampContract]) -> tuple[list[bytes], int]:
    """The sample messages of ``survey`` that decode into a stamp batch (the JPEG-stamp ZTF
    prototypes do not), found by decoding each once with the service's own decoder.

    Returns
    -------
    (messages, number rejected)
    """
    from service.decode.stamps import decode_stamps

    messages = [path.read_bytes() for path in sample_files(survey)]
    keep = []
    for message in messages:
        _, failures = decode_stamps([message], contract_by_survey, survey=survey)
        if not failures:
            keep.append(message)
    if not keep:
        raise RuntimeError(f"none of the {len(messages)} {survey} sample alerts decodes")
    return keep, len(messages) - len(keep)


def batch_array(batches) -> np.ndarray:
    """The stamp array of one entry of ``decode_stamps``'s ``batches_by_survey``.

    The decoder's batch object carries its stamps as ``stamps`` (or is the array itself).
    """
    stamps = getattr(batches, "stamps", batches)
    return np.asarray(stamps, dtype=np.float32)


def real_stamps(survey: str, contract: StampContract, contract_by_survey: dict[str, StampContract]) -> np.ndarray:
    """The model-ready stamps of every decodable sample alert of ``survey``."""
    from service.decode.stamps import decode_stamps

    messages, _ = decodable_messages(survey, contract_by_survey)
    batches, _ = decode_stamps(messages, {**contract_by_survey, survey: contract}, survey=survey)
    return batch_array(batches[survey])


def tile(stamps: np.ndarray, rows: int, out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` stamps cycling through ``stamps``, written into ``out`` when given."""
    index = np.arange(rows) % len(stamps)
    if out is None:
        return stamps[index]
    np.take(stamps, index, axis=0, out=out)
    return out
