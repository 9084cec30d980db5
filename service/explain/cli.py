"""``rbstream explain``: attribution pictures and arrays for alert files.

For each alert: ``<survey>_<id>.png`` (science, template and difference, each under its
heatmap, one row per method, with our score, the survey's score and the ids) and
``<survey>_<id>.npz`` (the arrays, `service.explain.render.save_npz`); with a folder among
the inputs, also ``index.html``. Occlusion runs on the ONNX model; saliency and integrated
gradients need torch, Captum and the model's ``weights.pt`` (``pip install 'rbstream[explain]'``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from service.surveys import SURVEY_CHOICES

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from service.explain.attributions import OCCLUSION_BASELINES, METHODS

    env = os.environ.get
    parser.add_argument("inputs", nargs="+", metavar="ALERT_OR_FOLDER",
                        help="alert files (.avro: a ZTF container, a Rubin message) or folders searched for *.avro")
    parser.add_argument("--method", default="occlusion", choices=(*METHODS, "all"), help="attribution method")
    parser.add_argument("--out", default="explanations", help="folder for the PNGs, .npz files and index.html")
    parser.add_argument("--models-dir", default=env("RBSTREAM_MODELS_DIR"),
                        help="folder with one model per survey (default: models/; env RBSTREAM_MODELS_DIR)")
    parser.add_argument("--model-ztf", default=env("RBSTREAM_MODEL_ZTF"), metavar="PATH", help="ZTF model folder")
    parser.add_argument("--model-rubin", default=env("RBSTREAM_MODEL_RUBIN"), metavar="PATH", help="Rubin model folder")
    parser.add_argument("--survey", default="auto", choices=SURVEY_CHOICES,
                        help="survey of the alert files (auto: told from the bytes)")
    parser.add_argument("--window", type=int, default=5, help="occlusion: side of the patch, pixels")
    parser.add_argument("--stride", type=int, default=2, help="occlusion: step of the patch, pixels")
    parser.add_argument("--occlusion-baseline", default="median", choices=OCCLUSION_BASELINES,
                        help="occlusion: what a patch is replaced by (the image's median, 0, or masked)")
    parser.add_argument("--baseline", default="noise", choices=("noise", "blur", "zero"),
                        help="integrated gradients: the baseline stamp (noise: each image's sky and noise, no source)")
    parser.add_argument("--steps", type=int, default=512,
                        help="integrated gradients: gradient evaluations per alert")


def alert_paths(inputs) -> tuple[list[Path], bool]:
    """The alert files named by ``inputs`` (folders searched recursively) and whether a folder was among them."""
    files, folder = [], False
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folder = True
            files.extend(sorted(p for p in path.rglob("*.avro") if p.is_file()))
        else:
            files.append(path)
    return files, folder


def main(args) -> int:
    from service.decode.alerts import DecodeError, decode_message
    from service.contract import StampError, assemble
    from service.explain.attributions import ExplainError, GradientOptions, OcclusionOptions, explain_stamps, normalise_methods
    from service.explain.render import RenderError, render_png, save_npz, write_index
    from service.score.model import ModelError, load_scorers

    try:
        methods = normalise_methods(args.method)
        occlusion_options = OcclusionOptions(args.window, args.stride, args.occlusion_baseline)
        gradient_options = GradientOptions(args.baseline, args.steps)
        explicit = {s: p for s, p in (("ztf", args.model_ztf), ("rubin", args.model_rubin)) if p}
        scorers = load_scorers(args.models_dir, explicit=explicit, device="cpu")
    except (ExplainError, ModelError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    files, from_folder = alert_paths(args.inputs)
    if not files:
        log.error("no alert file in %s", " ".join(args.inputs))
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries, failed = [], 0
    for path in files:
        try:
            alerts = decode_message(path.read_bytes(), args.survey)
        except (DecodeError, OSError) as exc:
            failed += 1
            log.error("%s: %s", path, exc)
            entries.append({"file": str(path), "error": str(exc)})
            continue
        for alert in alerts:
            meta = {"file": str(path), "survey": alert.survey, "id": alert.candidate_id, "object_id": alert.object_id,
                    "survey_score": alert.survey_score, "survey_score_name": alert.survey_score_name}
            scorer = scorers.get(alert.survey)
            try:
                if scorer is None:
                    raise ExplainError(f"no model loaded for survey {alert.survey!r}; loaded: {sorted(scorers)}")
                stamp = assemble(alert.images, scorer.contract, alert.centre)
                (explanations,) = explain_stamps(scorer, stamp[None], methods, occlusion_options, gradient_options)
                meta["score"] = next(iter(explanations.values())).score
                stem = f"{alert.survey}_{alert.candidate_id}"
                (out / f"{stem}.png").write_bytes(render_png(stamp, explanations, meta))
                save_npz(out / f"{stem}.npz", stamp, explanations, meta)
            except (ExplainError, RenderError) as exc:
                # The same cause would fail every alert (no weights, no torch): stop with the reason.
                log.error("%s", exc)
                return 2
            except StampError as exc:
                failed += 1
                log.error("%s (%s %s): %s", path, alert.survey, alert.candidate_id, exc)
                entries.append({**meta, "error": str(exc)})
                continue
            entries.append({**meta, "png": f"{stem}.png", "npz": f"{stem}.npz"})
            log.info("%s: %s score %.3f -> %s.png", path.name, alert.candidate_id, meta["score"], stem)
    if from_folder:
        log.info("index: %s", write_index(out, entries))
    return 1 if failed else 0
