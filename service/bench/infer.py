"""``rbstream bench infer``: stamps per second and latency per batch, by batch size and execution provider.

Each configuration is one `service.score.model.Scorer` — CPU through ``session.run`` and through
IO binding; CUDA fp32 with IO binding and a pinned host buffer; TensorRT with fp16 when
its scores stay within 1e-3 of fp32 — scoring batches of 1 to 4096 stamps built from the
real sample alerts. The batch is written into the scorer's own input buffer once, as the
consumer fills it in place, so the figure is the inference cost: host-to-device copy,
graph, and the scores back on the host.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from service.bench import data
from service.bench.report import Result, summarise, time_calls

log = logging.getLogger(__name__)

FULL_BATCH_SIZES = tuple(2**i for i in range(13))  # 1 .. 4096
QUICK_BATCH_SIZES = (1, 8, 64)
#: The project's GPU target: stamps/s at batch 1024 on one H100, default ZTF model.
GPU_TARGET_STAMPS_PER_S = 100_000
GPU_TARGET_BATCH = 1024


def configurations(providers: list[str]) -> list[dict]:
    """What to measure on this machine: (device, io binding, precision) combinations."""
    configs = [{"device": "cpu", "io_binding": False, "precision": "fp32"},
               {"device": "cpu", "io_binding": True, "precision": "fp32"}]
    if "CUDAExecutionProvider" in providers:
        configs.append({"device": "cuda", "io_binding": True, "precision": "fp32"})
    if "TensorrtExecutionProvider" in providers:
        configs.append({"device": "tensorrt", "io_binding": True, "precision": "fp16"})
    return configs


def _stamps_for(survey: str, contract, contract_by_survey, notes: list[str]) -> np.ndarray:
    try:
        return data.real_stamps(survey, contract, contract_by_survey)
    except Exception as exc:  # the decoder may not be there (or may reject everything): say so, go on
        from service.score.acceleration import check_stamps

        notes.append(f"{survey}: real sample stamps unavailable ({exc}); synthetic survey-like stamps used")
        return check_stamps(contract)


def measure(scorer, stamps: np.ndarray, batch_sizes, repeats: int, min_seconds: float,
            max_call_seconds: float) -> tuple[list[dict], list[int]]:
    """Rows of latency and throughput per batch size for one scorer; batch sizes skipped."""
    rows, skipped = [], []
    for batch in batch_sizes:
        if skipped:  # a smaller batch was already too slow: larger ones only more so
            skipped.append(batch)
            continue
        buffer = scorer.input_buffer(batch)
        data.tile(stamps, batch, out=buffer)
        start = time.perf_counter()
        scorer.score(buffer)  # warm-up: allocations, TensorRT/cuDNN kernel choice for this shape
        if time.perf_counter() - start > max_call_seconds:
            skipped.append(batch)
            continue
        per_call = [time_calls(lambda: scorer.score(buffer), min_seconds)[0] for _ in range(repeats)]
        rows.append({"batch": batch, "latency_ms": summarise([s * 1e3 for s in per_call], 4),
                     "stamps_per_s": summarise([batch / s for s in per_call], 1)})
    return rows, skipped


def run(args) -> Result:
    import onnxruntime as ort

    from service.score.model import MODEL_FILE, Scorer

    quick = args.quick
    batch_sizes = tuple(args.batch_sizes) if args.batch_sizes else (QUICK_BATCH_SIZES if quick else FULL_BATCH_SIZES)
    repeats = args.repeats or (2 if quick else 3)
    min_seconds = 0.05 if quick else 0.3
    providers = ort.get_available_providers()
    root = data.models_root(args.models)
    contract_by_survey, notes = data.contracts(args.models)
    surveys = [s for s in (args.survey or data.SURVEYS) if (root / s / MODEL_FILE).exists()]
    if not surveys:
        raise FileNotFoundError(f"no model under {root} for {args.survey or data.SURVEYS}; run `make train`")
    if quick:
        surveys = surveys[:1]
    result = Result("infer", notes=notes, settings={
        "batch_sizes": list(batch_sizes), "repeats": repeats, "min_seconds_per_run": min_seconds,
        "intra_op_threads": args.threads or "onnxruntime default", "models": str(root), "quick": quick,
        "max_call_seconds": args.max_call_seconds})
    result.columns = [("survey", "survey"), ("provider", "provider"), ("precision", "precision"),
                      ("io_binding", "IO binding"), ("host_buffer", "host buffer"), ("batch", "batch"),
                      ("latency_ms", "latency per batch, ms"), ("stamps_per_s", "stamps/s")]
    gpu_rows = []
    for survey in surveys:
        scorer0 = Scorer(root / survey, device="cpu")
        stamps = _stamps_for(survey, scorer0.contract, contract_by_survey, result.notes)
        for config in configurations(providers):
            try:
                scorer = Scorer(root / survey, device=config["device"], intra_op_threads=args.threads,
                                precision=config["precision"], io_binding=config["io_binding"],
                                check_stamps=stamps)
            except Exception as exc:  # a GPU provider present but unusable: report, measure the rest
                result.notes.append(f"{survey} on {config['device']}: cannot load ({exc})")
                continue
            if config["device"] == "cpu" and scorer.io_binding:
                same = bool(np.array_equal(scorer.score(stamps), scorer0.score(stamps)))
                result.notes.append(f"{survey}: CPU scores through IO binding bit-identical to session.run on "
                                    f"{len(stamps)} sample stamps: {same}")
            if config["device"] != "cpu":
                agreement = float(np.max(np.abs(scorer.score(stamps) - scorer0.score(stamps))))
                result.notes.append(f"{survey} on {scorer.provider} ({scorer.precision}): max |score - CPU fp32 "
                                    f"score| over {len(stamps)} sample stamps = {agreement:.2e}")
            rows, skipped = measure(scorer, stamps, batch_sizes, repeats, min_seconds, args.max_call_seconds)
            host = scorer._runner.buffer_kind if scorer._runner is not None else "numpy"
            for row in rows:
                row.update(survey=survey, provider=scorer.provider, precision=scorer.precision,
                           io_binding=scorer.io_binding, host_buffer=host,
                           model=f"{scorer.card.name} {scorer.card.version}")
                result.rows.append(row)
                if scorer.provider != "CPUExecutionProvider" and survey == "ztf":
                    gpu_rows.append(row)
            if skipped:
                result.notes.append(f"{survey} on {scorer.provider} (IO binding {scorer.io_binding}): batch sizes "
                                    f"{skipped} skipped, one call took over {args.max_call_seconds} s")
    if not any(r["provider"] != "CPUExecutionProvider" for r in result.rows):
        # A CUDA-enabled onnxruntime lists its providers even where no GPU (or driver) is usable.
        result.notes.insert(0, f"no GPU available for this run (ONNX Runtime providers: {', '.join(providers)}; "
                               "no session ran on a GPU): CPU only; the H100 target (>= 100,000 stamps/s at "
                               "batch 1024) was not measured")
    at_target = [r for r in gpu_rows if r["batch"] == GPU_TARGET_BATCH]
    if at_target:
        best = max(at_target, key=lambda r: r["stamps_per_s"]["median"])
        result.targets["gpu_stamps_per_s_at_1024"] = {
            "target": f">= {GPU_TARGET_STAMPS_PER_S:,} stamps/s on one H100", "measured": best["stamps_per_s"],
            "met": best["stamps_per_s"]["median"] >= GPU_TARGET_STAMPS_PER_S,
            "provider": best["provider"], "precision": best["precision"]}
    return result
