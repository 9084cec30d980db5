"""``rbstream train``: train a real-bogus model and export it to ONNX.

No torch at module level: ``rbstream --help`` and the service never import it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from service.surveys import SURVEYS

log = logging.getLogger(__name__)

#: Surveys whose default model `--defaults` trains (hits with --with-hits; each one's
#: template+science model, ``<survey>-nodiff``, with --with-nodiff).
DEFAULT_SURVEYS = SURVEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", type=Path, metavar="FILE",
                      help="a TOML config or a Deep-HiTS input.txt ([vars] section)")
    what.add_argument("--defaults", action="store_true",
                      help="train the default model of each survey (ztf, rubin) into models/<survey>/")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="run folder (default: runs/<name>-<UTC time>; with --defaults: runs/default-<survey>)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="resume from a checkpoint file or run folder (no PATH: the --out folder)")
    parser.add_argument("--with-hits", action="store_true", help="with --defaults: also train models/hits")
    parser.add_argument("--with-nodiff", action="store_true",
                        help="with --defaults: also the no-difference-image models (template and science only), "
                             "models/<survey>-nodiff")
    parser.add_argument("--surveys", nargs="+", choices=(*SURVEYS, "hits", *(f"{s}-nodiff" for s in SURVEYS)),
                        help="with --defaults: only these default models")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="with --defaults: where to publish (default: the service's models/ folder)")
    parser.add_argument("--finetune-from", type=Path, metavar="RUN",
                        help="start from this run folder or .pt file (overrides [finetune] from)")
    parser.add_argument("--folds", type=int, metavar="N",
                        help="with --config (real alerts, split by object): cross-validate instead, N runs each "
                             "validated on one of N folds of the objects outside the test split; their "
                             "out-of-fold scores are judged together (training.crossval)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (overrides the config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def _overrides(args) -> dict:
    out = {}
    if args.threads:
        out["threads"] = args.threads
    if args.no_progress:
        out["progress"] = False
    if args.finetune_from:
        out["finetune"] = {"from": str(args.finetune_from.resolve())}
    return out


def main(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.data import DataError

    try:
        if args.defaults and (args.folds is not None or args.finetune_from):
            raise ConfigError("--folds and --finetune-from go with --config (--defaults chains its own stages)")
        if args.folds is not None and args.resume:
            raise ConfigError("--folds: a cross-validation starts afresh; --resume is for one run")
        if args.defaults:
            return _defaults(args)
        if args.folds is not None:
            return _cross_validate(args)
        config = load_config(args.config, _overrides(args))
        run_dir = args.out or Path("runs") / f"{config.name}-{_utc_now()}"
        resume = run_dir if args.resume is True else args.resume
        from training.train import train

        card = train(config, run_dir, resume=resume)
    except (ConfigError, DataError) as exc:
        print(f"rbstream train: {exc}", file=sys.stderr)
        return 2
    _summary(card, run_dir)
    return 0


def _defaults(args) -> int:
    """Each survey's default model in two stages: simulations (``<survey>.toml``), then, where
    ``<survey>-adapt.toml`` exists, fine-tuning and calibration on real alerts, judged beside
    the simulation-only model (`training.adapt`)."""
    from service.score.model import DEFAULT_MODELS_DIR
    from training.adapt import REAL_ROC, side_by_side
    from training.config import adaptation_config, builtin_config, load_config
    from training.export import publish, write_card
    from training.train import train

    surveys = tuple(args.surveys or DEFAULT_SURVEYS + (("hits",) if args.with_hits else ()))
    if args.with_nodiff:
        surveys += tuple(f"{s}-nodiff" for s in surveys if s in DEFAULT_SURVEYS)
    models_dir = args.models_dir or DEFAULT_MODELS_DIR
    started = time.time()
    for name in surveys:  # a survey, or a survey's no-diff model
        root = (args.out or Path("runs")) / f"default-{name}"
        if root.exists() and not args.resume:
            shutil.rmtree(root)  # a fresh run: stale checkpoints must not be resumed by accident
        stages = {"simulation_only": root / "simulation"}
        card = train(load_config(builtin_config(name), _overrides(args)), stages["simulation_only"],
                     resume=_resumable(stages["simulation_only"], args))
        adapt_config = adaptation_config(name)
        if adapt_config is not None:
            stages["adapted"] = root / "adapted"
            config = load_config(adapt_config, {**_overrides(args),
                                                "finetune": {"from": str(stages["simulation_only"])}})
            card = train(config, stages["adapted"], resume=_resumable(stages["adapted"], args))
            card = card.extended(side_by_side(config, stages, stages["adapted"]))
            write_card(card, stages["adapted"])
        final = list(stages.values())[-1]
        target = publish(final, Path(models_dir) / name, extra=(REAL_ROC,) if "adapted" in stages else ())
        _summary(card, target)
    print(f"default models {', '.join(surveys)} trained in {time.time() - started:.0f} s")
    return 0


def _cross_validate(args) -> int:
    from training.crossval import REPORT, cross_validate, summary

    out = args.out or Path("runs") / f"crossval-{args.config.stem}-{_utc_now()}"
    report = cross_validate(args.config, args.folds, out, _overrides(args))
    print(summary(report))
    print(f"-> {out / REPORT}")
    return 0


def _utc_now() -> str:
    """The time in run-folder names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _resumable(run_dir: Path, args) -> Path | None:
    """``run_dir`` when ``--resume`` was asked and it holds a checkpoint (a stage not begun starts afresh)."""
    return run_dir if args.resume and (run_dir / "checkpoints").is_dir() else None


def _summary(card, where: Path) -> None:
    m = card.test_metrics
    auc, fpr, fnr = ("undefined" if v is None else f"{v:.4f}" for v in (m.roc_auc, m.fpr, m.fnr))
    print(f"{card.name} ({card.survey}): test accuracy {m.accuracy:.4f}, ROC AUC {auc}, "
          f"FPR {fpr} / FNR {fnr} at {card.threshold:g}, "
          f"{card.training.seconds:.0f} s -> {where}")
