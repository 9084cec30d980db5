"""Export a trained network to ONNX, verify it against PyTorch, and write its model card.

The exported graph takes ``stamps`` float32 ``[batch, raw_inputs, size, size]`` of raw
pixels (NaN allowed; the batch axis is dynamic) and returns ``score`` float32 ``[batch]``,
the probability of "real". `export_onnx` runs the file with ONNX Runtime on a test batch
(which includes NaN pixels, an all-NaN channel and rotated copies) and fails unless every
score is within `PARITY_TOLERANCE` of PyTorch's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from service.contract import ONNX_INPUT, ONNX_OUTPUT
from service.score.card import CARD_FILE, ModelCard
from service.score.model import MODEL_FILE
from training.model import WEIGHTS_FILE, RealBogusNet, ScoringGraph, save_weights

log = logging.getLogger(__name__)
# The ONNX optimiser logs every initializer it deduplicates at INFO: noise in a training log.
for _name in ("onnx_ir", "onnxscript", "torch.onnx"):
    logging.getLogger(_name).setLevel(logging.WARNING)

PARITY_TOLERANCE = 1e-5
PLOTS = ("history.png", "roc.png", "det.png")


#: The exporter's note, on every node, of the source line it came from: it holds the
#: checkout's absolute path and line numbers, so the same weights exported from another
#: clone, or after an edit elsewhere in the file, would give other bytes.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


class ExportError(RuntimeError):
    """The ONNX file does not reproduce the PyTorch model (or cannot be written)."""


def verification_batch(stamps: np.ndarray, n: int = 16, seed: int = 0) -> np.ndarray:
    """Real test stamps plus the awkward cases: NaN regions, an all-NaN channel, inf."""
    rng = np.random.default_rng(seed)
    batch = np.array(stamps[:n], dtype=np.float32, copy=True)
    if len(batch) >= 4:
        batch[0, :, : batch.shape[2] // 3] = np.nan     # cut at a CCD edge
        batch[1, 0] = np.nan                           # a channel with no data at all
        batch[2, :, 3, 4] = np.inf                     # a non-finite pixel
        batch[3] = rng.normal(0.0, 1.0, batch[3].shape)  # plain noise
    return batch


def onnx_scores(path: Path, stamps: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(stamps, dtype=np.float32)})[0]


def export_onnx(net: RealBogusNet, path: Path, check_stamps: np.ndarray, opset: int = 18,
                max_mb: float = 5.0, tolerance: float = PARITY_TOLERANCE, temperature: float = 1.0) -> dict:
    """Export ``net`` to ``path`` and verify it; returns the verification summary.

    Raises
    ------
    ExportError
        When ONNX Runtime and PyTorch disagree by more than ``tolerance`` on the
        verification batch, or the file is larger than ``max_mb``. The file is removed.
    """
    path = Path(path)
    graph = ScoringGraph(net, temperature).eval().cpu()
    example = torch.from_numpy(np.ascontiguousarray(check_stamps[:2], dtype=np.float32))
    tmp = path.with_suffix(".tmp.onnx")
    # The exporter prints its progress on stdout; keep the training log readable.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation chatter
        torch.onnx.export(graph, (example,), str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          opset_version=opset, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={"stamps": {0: torch.export.Dim("batch", min=1)}})
    try:
        _drop_stack_traces(tmp)
        summary = verify(graph, tmp, check_stamps, tolerance)
        size_mb = tmp.stat().st_size / 1e6
        if size_mb > max_mb:
            raise ExportError(f"{tmp.name}: {size_mb:.2f} MB is over export.max_mb = {max_mb}")
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    save_weights(graph, path.parent / WEIGHTS_FILE)
    summary.update(size_mb=round(size_mb, 3), opset=opset)
    return summary


def _drop_stack_traces(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [entry for entry in node.metadata_props if entry.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def verify(graph: ScoringGraph, onnx_path: Path, check_stamps: np.ndarray,
           tolerance: float = PARITY_TOLERANCE) -> dict:
    """Compare ONNX Runtime with PyTorch, in the form training ran, on the verification
    batch (and its rotations)."""
    import onnx

    onnx.checker.check_model(str(onnx_path))
    batch = verification_batch(check_stamps)
    rotated = np.rot90(batch, 1, axes=(2, 3)).copy()
    with torch.no_grad():
        expected = graph.as_trained(torch.from_numpy(batch)).numpy()
    got = onnx_scores(onnx_path, batch)
    got_rotated = onnx_scores(onnx_path, rotated)
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} != PyTorch {expected.shape}")
    if not np.isfinite(got).all():
        raise ExportError("ONNX scores are not all finite on the verification batch (NaN handling broken)")
    parity = float(np.max(np.abs(got - expected)))
    rotation = float(np.max(np.abs(got_rotated - got)))
    if not parity <= tolerance:
        raise ExportError(f"ONNX Runtime and PyTorch disagree by {parity:.3g} > {tolerance:g}")
    if not rotation <= tolerance:
        raise ExportError(f"the ONNX model is not rotation invariant: {rotation:.3g} > {tolerance:g}")
    return {"parity_max_abs_diff": parity, "rotation_max_abs_diff": rotation, "verification_batch": len(batch)}


def measure_inference(path: Path, stamps: np.ndarray, batch: int = 256, threads: int = 2,
                      repeats: int = 9) -> dict:
    """ONNX Runtime CPU cost of the exported model: ms per stamp at ``batch`` on ``threads``
    threads (median, min and max of ``repeats`` timed runs after a warm-up), with the
    machine's load average, since a shared machine slows every figure down."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(np.resize(np.asarray(stamps, dtype=np.float32), (batch, *stamps.shape[1:])))
    for _ in range(2):
        session.run([ONNX_OUTPUT], {ONNX_INPUT: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run([ONNX_OUTPUT], {ONNX_INPUT: x})
        times.append((time.perf_counter() - start) * 1e3 / batch)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"ms_per_stamp": round(float(np.median(times)), 4), "ms_per_stamp_min": round(min(times), 4),
            "ms_per_stamp_max": round(max(times), 4), "batch": batch, "threads": threads,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "cpus": os.cpu_count(),
            "load_average_1m": round(load[0], 2)}


def git_commit(cwd: Path | None = None) -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training"], cwd=cwd.parent
                               if cwd.name == "training" else cwd, capture_output=True, text=True, timeout=10).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_card(config, contract, data_info: dict, test_metrics: dict, verification: dict,
               training: dict, inference: dict | None = None, calibration: dict | None = None) -> ModelCard:
    """The model card: what the model is, what it takes, how it was trained, how good it is.

    Raises
    ------
    service.score.card.ModelError
        When a section is not what `ModelCard` reads (a field missing or of the wrong type).
    """
    return ModelCard.from_dict({
        "name": config.name,
        "version": config.version,
        "survey": config.survey,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "threshold": float(config.table("export")["threshold"]),
        "input": contract.to_dict(),
        "output": {"name": ONNX_OUTPUT, "meaning": "probability that the detection is real", "shape": ["batch"]},
        "architecture": {**config.arch.to_dict(), "rotation_pooling": "mean over 8 dihedral views"
                         if config.arch.dihedral else "mean over 4 rotations"},
        "data": data_info,
        "training": training,
        "test_metrics": test_metrics,
        "verification": verification,
        "inference": inference,
        "calibration": calibration,
        "config": config.to_dict(),
    }, f"model card of {config.name}")


def write_card(card: ModelCard, folder: Path) -> Path:
    """Write ``card`` into the run folder ``folder`` (as `CARD_FILE`)."""
    return card.write(Path(folder) / CARD_FILE)


def publish(run_dir: Path, target: Path, extra: tuple[str, ...] = ()) -> Path:
    """Copy a run's model, card and plots (and the ``extra`` files) into ``target`` (e.g. ``models/ztf``)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, WEIGHTS_FILE, CARD_FILE, *PLOTS, *extra):
        src = Path(run_dir) / name
        if not src.exists():
            raise ExportError(f"{src}: missing, cannot publish the run")
        shutil.copy2(src, target / name)
    return target
