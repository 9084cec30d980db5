"""Data sources for training: every one ends as raw stamps in the contract's layout.

Each loader returns a `Dataset` per split (``train``, ``valid``, ``test``) whose
``stamps`` are float32 ``[n, len(contract.raw_inputs), size, size]`` of raw pixels
(NaN where there is no data) — what the service feeds the exported graph — and
``labels`` are 1 (real) or 0 (bogus).

Sources (``[data] source``):

``simulator``
    `training.simulate` with the survey profile; deterministic by ``seed``.
``chunks``
    ``.npz`` chunks under ``path_to_chunks``. Each chunk holds ``stamps`` (float
    ``[n, k, h, w]``, raw pixels, NaN allowed), ``labels`` (int ``[n]``, 1 real, 0 bogus)
    and ``channels`` (``k`` image names among science/template/difference, the order of
    axis 1); optionally ``ids``. Stamps larger than the model size are centre-cropped
    (`service.contract.fit_stamp`). ``data_interface = "directory"``: sub-folders
    ``train``, ``validate``, ``test`` (Deep-HiTS's ``chunks_train``... also accepted);
    ``"random"``: every chunk in the folder, pooled and split at random.
``alerts``
    Real Avro alert files, labelled by a CSV and/or their own survey scores and split by
    object (`training.real`), decoded with the service's own `service.decode.alerts.decode_message`
    and `service.contract.assemble`; simulated rehearsal stamps may join the training split.
``braai``
    braai-style ``.npy`` triplets ``[n, h, w, 3]`` (or ``[n, 3, h, w]``) plus a CSV with a
    ``label`` column, one row per triplet.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from service.contract import RAW_IMAGES, StampContract, fit_stamp
from training import real

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
#: Sub-folder names of a ``directory`` chunk layout, per split (rbstream's, then Deep-HiTS's).
CHUNK_FOLDERS = {"train": ("train", "chunks_train"), "valid": ("validate", "valid", "chunks_validate"),
                 "test": ("test", "chunks_test")}


class DataError(ValueError):
    """Training data that cannot be used (missing file, wrong shape, unknown label...)."""


@dataclass
class Dataset:
    """One split: raw stamps in the contract's layout and their labels."""

    stamps: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray | None = None  # simulator kind of each stamp, when known
    #: Training targets in [0, 1] where they are not the labels themselves (soft weak labels).
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def training_targets(self) -> np.ndarray:
        """What the loss pulls each score towards: ``targets``, else the labels."""
        return (self.labels if self.targets is None else self.targets).astype(np.float32)

    def subset(self, index) -> "Dataset":
        return Dataset(self.stamps[index], self.labels[index], None if self.kinds is None else self.kinds[index],
                       None if self.targets is None else self.targets[index])


def to_contract(stamps: np.ndarray, channels: Sequence[str], contract: StampContract) -> np.ndarray:
    """Reorder images named ``channels`` (axis 1) to ``contract.raw_inputs`` and fit them to its size."""
    channels = [str(c) for c in channels]
    missing = [c for c in contract.raw_inputs if c not in channels]
    if missing:
        raise DataError(f"stamps lack image(s) {missing}; they hold {channels}, the model needs "
                        f"{list(contract.raw_inputs)}")
    index = [channels.index(c) for c in contract.raw_inputs]
    stamps = np.asarray(stamps, dtype=np.float32)[:, index]
    if stamps.shape[-2:] == (contract.size, contract.size):
        return np.ascontiguousarray(stamps)
    out = np.empty((len(stamps), len(index), contract.size, contract.size), dtype=np.float32)
    for i in range(len(stamps)):
        for j in range(len(index)):
            out[i, j] = fit_stamp(stamps[i, j], contract.size)
    return out


# --------------------------------------------------------------------------- simulator
def simulated(config, contract: StampContract, progress: bool = False) -> dict[str, Dataset]:
    sizes = {"train": config.N_train, "valid": config.N_valid, "test": config.N_test}
    # each split has its own seed, so the test set never overlaps the training set
    return {split: _simulate(config, contract, sizes[split], config.seed * 10 + offset, progress)
            for offset, split in enumerate(SPLITS)}


def _simulate(config, contract: StampContract, n: int, seed: int, progress: bool = False) -> Dataset:
    from dataclasses import replace

    from training.simulate import simulate

    profile = replace(config.profile, stamp_size=contract.size)
    d = simulate(profile, n, seed=seed, config=config.simulator, progress=progress, workers=config.threads)
    return Dataset(to_contract(d["stamps"], d["channels"], contract), d["labels"], d["kinds"])


# --------------------------------------------------------------------------- chunks
def write_chunks(folder: str | Path, stamps: np.ndarray, labels: np.ndarray, channels: Sequence[str],
                 n_cand_chunk: int, ids: np.ndarray | None = None) -> list[Path]:
    """Write a data set as ``.npz`` chunks of ``n_cand_chunk`` candidates (the documented format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, len(labels), n_cand_chunk)):
        part = slice(start, start + n_cand_chunk)
        path = folder / f"chunk_{k:05d}.npz"
        arrays = dict(stamps=np.asarray(stamps[part], dtype=np.float32), labels=np.asarray(labels[part]),
                      channels=np.array([str(c) for c in channels]))
        if ids is not None:
            arrays["ids"] = np.asarray(ids[part])
        np.savez_compressed(path, **arrays)
        paths.append(path)
    return paths


def read_chunk(path: Path, contract: StampContract, default_channels: Sequence[str]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "stamps" not in z or "labels" not in z:
                raise DataError(f"{path}: a chunk needs arrays 'stamps' and 'labels', has {sorted(z.files)}")
            stamps, labels = z["stamps"], z["labels"]
            channels = [str(c) for c in z["channels"]] if "channels" in z else list(default_channels)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz chunk: {exc}") from None
    if stamps.ndim != 4 or stamps.shape[1] != len(channels) or len(stamps) != len(labels):
        raise DataError(f"{path}: stamps must be [n, {len(channels)} channels, h, w] with n = len(labels); "
                        f"got stamps {stamps.shape}, labels {labels.shape}")
    return Dataset(to_contract(stamps, channels, contract), _check_labels(labels, str(path)))


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise DataError(f"{where}: labels must be 0 (bogus) or 1 (real); found {np.unique(labels[bad])[:5]}")
    return labels.astype(np.int64)


def _concat(parts: list[Dataset]) -> Dataset:
    kinds = None if any(p.kinds is None for p in parts) else np.concatenate([p.kinds.astype(str) for p in parts])
    targets = None if all(p.targets is None for p in parts) else np.concatenate([p.training_targets() for p in parts])
    return Dataset(np.concatenate([p.stamps for p in parts]), np.concatenate([p.labels for p in parts]), kinds,
                   targets)


def chunks(config, contract: StampContract) -> dict[str, Dataset]:
    root = Path(config.path_to_chunks)
    if not root.is_dir():
        raise DataError(f"path_to_chunks: no such folder {root}")
    default_channels = config.table("data")["triplet_channels"]
    caps = {"train": config.N_train, "valid": config.N_valid, "test": config.N_test}
    if config.data_interface == "directory":
        out = {}
        for split in SPLITS:
            folder = next((root / name for name in CHUNK_FOLDERS[split] if (root / name).is_dir()), None)
            if folder is None:
                raise DataError(f"path_to_chunks: {root} has no {' or '.join(CHUNK_FOLDERS[split])} folder "
                                "(data_interface = \"directory\")")
            files = sorted(folder.glob("*.npz"))
            if not files:
                raise DataError(f"{folder}: no .npz chunk")
            out[split] = _concat([read_chunk(f, contract, default_channels) for f in files]).subset(
                slice(0, caps[split]))
        return out
    files = sorted(root.glob("*.npz"))
    if not files:
        raise DataError(f"path_to_chunks: no .npz chunk in {root} (data_interface = \"random\")")
    return split_at_random(_concat([read_chunk(f, contract, default_channels) for f in files]), config)


def split_at_random(pool: Dataset, config) -> dict[str, Dataset]:
    """Shuffle a pool (by ``seed``) and cut it into valid, test and train (the rest, at most N_train)."""
    n = len(pool)
    n_valid, n_test = config.N_valid, config.N_test
    if n_valid + n_test >= n:
        raise DataError(f"N_valid + N_test = {n_valid + n_test} leaves no training data out of {n} samples; "
                        "accepted: N_valid + N_test < number of samples")
    order = np.random.default_rng([config.seed, 7]).permutation(n)
    return {"valid": pool.subset(order[:n_valid]), "test": pool.subset(order[n_valid:n_valid + n_test]),
            "train": pool.subset(order[n_valid + n_test:][: config.N_train])}


# --------------------------------------------------------------------------- labels CSV
def read_labels_csv(path: str | Path, id_columns: Sequence[str] = real.ID_COLUMNS
                    ) -> tuple[list[int] | None, np.ndarray]:
    """A labels CSV with one row per sample: a ``label`` column (1/0, real/bogus, true/false), maybe an id column."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"labels: no such file {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "label" not in fields:
            raise DataError(f"{path}: needs a 'label' column; has {fields}")
        id_column = next((c for c in id_columns if c in fields), None)
        ids, labels = [], []
        for line, row in enumerate(reader, start=2):
            label = real.parse_label(row["label"], f"{path}:{line}")
            if label is None:
                raise DataError(f"{path}:{line}: label {row['label']!r}; accepted here: 1/0, real/bogus, true/false")
            labels.append(label)
            if id_column:
                try:
                    ids.append(int(row[id_column]))
                except (TypeError, ValueError):
                    raise DataError(f"{path}:{line}: {id_column} {row[id_column]!r} is not an integer") from None
    return (ids if id_column else None), np.array(labels, dtype=np.int64)


# --------------------------------------------------------------------------- alerts
def alerts(config, contract: StampContract, progress: bool = False) -> dict[str, Dataset]:
    """Labelled real alerts (`training.real`), split by object, plus simulated rehearsal stamps in training."""
    d = config.table("data")
    try:
        found, failures = real.read_alerts(real.alert_files(d["alerts"]), d["survey_format"])
        tables = [real.read_label_table(d["labels"])] if d["labels"] else []
    except real.LabelError as exc:
        raise DataError(str(exc)) from None
    for name, reason in failures:
        log.warning("skipped %s: %s", name, reason)
    real.assign_labels(found, tables, d["label_from"], tuple(d["weak_label_bands"]), soft=d["weak_targets"] == "soft")
    labelled = [a for a in found if a.label is not None]
    log.info("alerts: %d decoded, %d labelled (%s)", len(found), len(labelled),
             dict(Counter(a.label_source for a in labelled)))
    if d["split"] == "random":
        return split_at_random(_real_dataset(labelled, contract), config)
    splits = {name: _real_dataset(group, contract) for name, group in real.split_by_config(labelled, d).items()}
    train = splits["train"]
    index = np.arange(len(train))
    if d["balance"] and len(set(train.labels.tolist())) == 2:
        # brokers keep mostly real alerts: the few real artifacts are shown as often as the reals
        counts = np.bincount(train.labels, minlength=2)
        index = np.concatenate([np.tile(np.flatnonzero(train.labels == c), int(np.ceil(counts.max() / counts[c])))
                                for c in (0, 1)])
    train = train.subset(np.tile(index, d["real_repeat"]))
    if d["rehearsal"]:
        rehearsal = _simulate(config, contract, d["rehearsal"], seed=config.seed * 10 + 3, progress=progress)
        rehearsal.kinds = np.array([f"simulated {k}" for k in rehearsal.kinds])
        train = _concat([train, rehearsal])
    splits["train"] = train
    if d["rehearsal_valid"]:
        # too few labelled alerts of one class to validate and calibrate on: add simulated ones
        simulated_valid = _simulate(config, contract, d["rehearsal_valid"], seed=config.seed * 10 + 4)
        simulated_valid.kinds = np.array([f"simulated {k}" for k in simulated_valid.kinds])
        splits["valid"] = _concat([splits["valid"], simulated_valid])
    return splits


def _real_dataset(alerts: Sequence[real.RealAlert], contract: StampContract) -> Dataset:
    stamps, kept, failures = real.stamps(alerts, contract)
    for name, reason in failures:
        log.warning("skipped %s: %s", name, reason)
    kinds = np.array([f"{a.label_source}: {a.family}" if a.family else str(a.label_source) for a in kept])
    targets = np.array([a.label if a.target is None else a.target for a in kept], dtype=np.float32)
    return Dataset(stamps, np.array([a.label for a in kept], dtype=np.int64), kinds, targets)


def read_alerts(files: Sequence[Path], labels_csv: str | Path, contract: StampContract, survey: str = "auto"
                ) -> Dataset:
    """Alert files labelled by a CSV (ids or file names), as one data set; unlabelled alerts are skipped."""
    try:
        found, failures = real.read_alerts(files, survey)
        real.assign_labels(found, [real.read_label_table(labels_csv)])
    except real.LabelError as exc:
        raise DataError(str(exc)) from None
    for name, reason in failures:
        log.warning("skipped %s: %s", name, reason)
    labelled = [a for a in found if a.label is not None]
    if not labelled:
        raise DataError(f"no labelled alert could be used out of {len(files)} file(s): {failures[:3]}")
    return _real_dataset(labelled, contract)


# --------------------------------------------------------------------------- braai
def braai(config, contract: StampContract) -> dict[str, Dataset]:
    data = config.table("data")
    path = Path(data["triplets"])
    if not path.exists():
        raise DataError(f"data.triplets: no such file {path}")
    triplets = np.load(path, mmap_mode="r", allow_pickle=False)
    _, labels = read_labels_csv(data["labels"])
    channels = data["triplet_channels"]
    if triplets.ndim != 4 or len(triplets) != len(labels):
        raise DataError(f"{path}: expected [n, h, w, {len(channels)}] triplets with n = {len(labels)} labels, "
                        f"got {triplets.shape}")
    if triplets.shape[-1] == len(channels) and triplets.shape[1] != len(channels):
        triplets = np.moveaxis(triplets, -1, 1)  # braai stores channels last
    return split_at_random(Dataset(to_contract(triplets, channels, contract), _check_labels(labels, str(path))),
                           config)


LOADERS = {"simulator": simulated, "chunks": chunks, "alerts": alerts, "braai": braai}


def load_datasets(config, contract: StampContract, progress: bool = False) -> tuple[dict[str, Dataset], dict]:
    """The three splits of the configured source, and a description for the model card."""
    source = config.table("data")["source"]
    if source == "simulator":
        splits = simulated(config, contract, progress=progress)
        where = {"simulator": config.simulator.__dict__ | {"bogus_weights": dict(config.simulator.bogus_weights)},
                 "profile": config.profile.to_dict(), "seed": config.seed}
    else:
        splits = alerts(config, contract, progress) if source == "alerts" else LOADERS[source](config, contract)
        where = {"path_to_chunks": config.path_to_chunks, "data_interface": config.data_interface} \
            if source == "chunks" else {k: config.table("data")[k] for k in ("alerts", "labels", "triplets")}
        if source == "alerts":
            where.update({k: config.table("data")[k] for k in (
                "label_from", "weak_label_bands", "weak_targets", "split", "holdout", "fold", "rehearsal", "rehearsal_valid",
                "balance", "real_repeat")})
            where["kinds"] = {split: dict(Counter(d.kinds.tolist())) for split, d in splits.items()}
    for split, d in splits.items():
        if len(d) == 0:
            raise DataError(f"the {split} split is empty")
    info = {"source": source, **where,
            "size": {split: int(len(d)) for split, d in splits.items()},
            "real_fraction": {split: float(d.labels.mean()) for split, d in splits.items()}}
    return splits, info


__all__ = ["Dataset", "DataError", "load_datasets", "write_chunks", "read_labels_csv", "RAW_IMAGES"]
