"""The training loop: one readable function, `train`, in the spirit of nanoGPT.

Iteration-based, like Deep-HiTS: validate every ``validate_every_batches`` iterations,
stop early on the validation loss (Deep-HiTS's patience rule), checkpoint every
``savestep`` iterations, decay the learning rate by iteration.

Determinism and resume: everything random in iteration ``i`` (the epoch's order, the
augmentation, dropout) is drawn from generators seeded by ``(seed, i)`` or
``(seed, epoch)``, so a run resumed from a checkpoint repeats exactly what the
uninterrupted run did. A checkpoint also stores the model, optimiser, scheduler,
early-stopping state, history, best weights and the global RNG states.

A run folder holds::

    checkpoints/checkpoint_<iteration>.pt   the last two checkpoints
    tensorboard/                            TensorBoard scalars
    model.onnx, model_card.json             the exported best model and its card
    history.png, roc.png, det.png           plots
    history.json, test_scores.npz           raw history and test-set scores
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.score.model import CARD_FILE, MODEL_FILE
from training import report
from training.calibrate import CalibrationError, calibrate, sigmoid
from training.config import ConfigError, TrainConfig
from training.data import load_datasets
from training.export import export_onnx, measure_inference, model_card, write_card
from training.model import RealBogusNet, count_parameters

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
EVAL_BATCH = 512


# --------------------------------------------------------------------------- pieces
def lr_factor(config: TrainConfig, iteration: int) -> float:
    """Learning-rate multiplier at ``iteration`` (Caffe/Deep-HiTS policies)."""
    if config.lr_policy == "step":
        return config.gamma ** (iteration // config.stepsize)
    if config.lr_policy == "exp":
        return config.gamma ** iteration
    if config.lr_policy == "inv":
        return (1.0 + config.gamma * iteration) ** (-config.power)
    return 1.0


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.base_lr, betas=(config.momentum, 0.999),
                            weight_decay=config.weight_decay)


def augment(stamps: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """On-the-fly augmentation of a batch of RAW stamps (switchable in ``[augment]``)."""
    aug = config.table("augment")
    n = stamps.shape[0]
    if aug["rot90"]:
        k = torch.randint(0, 4, (n,), generator=generator)
        stamps = torch.stack([torch.rot90(s, int(r), (1, 2)) for s, r in zip(stamps, k)])
    if aug["flip"]:
        flip = torch.rand(n, generator=generator) < 0.5
        stamps = torch.where(flip[:, None, None, None], torch.flip(stamps, (3,)), stamps)
    if aug["shift"]:
        # shift by up to `shift` pixels; what comes in is NaN, which the graph masks
        m = aug["shift"]
        size = stamps.shape[-1]
        padded = F.pad(stamps, (m, m, m, m), value=float("nan"))
        offsets = torch.randint(0, 2 * m + 1, (n, 2), generator=generator)
        stamps = torch.stack([p[:, r:r + size, c:c + size] for p, (r, c) in zip(padded, offsets.tolist())])
    if aug["noise"] > 0:
        # noise in units of each image's own (robust) noise level, so it is survey-independent
        flat = stamps.flatten(2)
        finite = torch.where(torch.isfinite(flat), flat, torch.nan)
        median = finite.nanmedian(-1, keepdim=True).values
        mad = (finite - median).abs().nanmedian(-1, keepdim=True).values
        sigma = torch.nan_to_num(1.4826 * mad, nan=0.0).unsqueeze(-1)
        stamps = stamps + aug["noise"] * sigma * torch.randn(stamps.shape, generator=generator)
    return stamps


def raw_augmentation(config: TrainConfig) -> bool:
    """Whether augmentation changes pixel statistics (then stamps are normalised per batch)."""
    aug = config.table("augment")
    return bool(aug["shift"]) or aug["noise"] > 0


@torch.no_grad()
def predict(net: RealBogusNet, stamps: np.ndarray | torch.Tensor, normalised: bool = False,
            device: str = "cpu") -> np.ndarray:
    """Logits of ``net`` on stamps (raw, or already normalised), in eval mode, batch by batch."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(stamps), EVAL_BATCH):
        x = torch.as_tensor(stamps[start:start + EVAL_BATCH]).to(device)
        out.append((net.forward_normalised(x) if normalised else net(x)).cpu())
    net.train(was_training)
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)


def evaluate(net, stamps, labels: np.ndarray, normalised: bool, device: str) -> tuple[float, float]:
    logits = predict(net, stamps, normalised, device)
    y = torch.as_tensor(labels, dtype=torch.float32)
    loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), y))
    accuracy = float(((logits >= 0) == (labels == 1)).mean())
    return loss, accuracy


def latest_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint file, else the newest one of the run folder."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted((path / CHECKPOINTS).glob("checkpoint_*.pt")) if path.is_dir() else []
    if not found:
        raise ConfigError(f"resume: no checkpoint at {path}; accepted: a checkpoint_*.pt file or a run folder "
                          "holding checkpoints/")
    return found[-1]


def save_checkpoint(run_dir: Path, state: dict, keep: int = 2) -> Path:
    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint_{state['iteration']:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint under the final name
    for old in sorted(folder.glob("checkpoint_*.pt"))[:-keep]:
        old.unlink()
    return path


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig, run_dir: str | Path, resume: str | Path | None = None) -> dict:
    """Train, evaluate on the test split, export ONNX, write the card and plots.

    Parameters
    ----------
    config : TrainConfig
    run_dir : path
        The run folder (created).
    resume : path, optional
        Checkpoint file or run folder to resume from; defaults to ``config.resume``.

    Returns
    -------
    dict
        The model card.
    """
    started = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    device = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    contract = config.contract
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    # ---- data
    t0 = time.time()
    splits, data_info = load_datasets(config, contract, progress=config.progress)
    train_set, valid_set, test_set = splits["train"], splits["valid"], splits["test"]
    log.info("data: %s, train %d, valid %d, test %d (%.1f s)", data_info["source"], len(train_set),
             len(valid_set), len(test_set), time.time() - t0)

    # ---- model
    _seed_all(config.seed)
    net = RealBogusNet(contract, config.arch).to(device)
    finetune = config.table("finetune")
    frozen = 0
    if finetune["from"]:
        source = latest_checkpoint(Path(finetune["from"]))
        state = torch.load(source, map_location=device, weights_only=False)
        weights = state["best"]["model"] or state["model"]
        try:
            net.load_state_dict(weights)
        except RuntimeError as exc:
            raise ConfigError(f"finetune.from: {source} does not fit this architecture/input: {exc}") from None
        frozen = net.freeze(finetune["freeze"])
        log.info("fine-tuning from %s, %d layer(s) frozen", source, frozen)
    optimizer = make_optimizer(config, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(config, it))

    # Without pixel-level augmentation the normalisation of a stamp never changes: do it once.
    normalised = not raw_augmentation(config)
    if normalised:
        train_x = _normalise_all(net, train_set.stamps)
        valid_x = _normalise_all(net, valid_set.stamps)
        train_set.stamps = valid_set.stamps = None  # the raw copies are not needed any more (memory)
    else:
        train_x, valid_x = torch.from_numpy(train_set.stamps), torch.from_numpy(valid_set.stamps)
    train_y = torch.from_numpy(train_set.training_targets())

    n_batches = max(len(train_set) // config.batch_size, 1)
    max_iterations = config.n_epochs * n_batches

    # ---- state (everything a checkpoint holds)
    iteration = 0
    best = {"loss": math.inf, "iteration": 0, "model": None}
    patience = config.ini_patience
    history: list[dict] = []
    running = {"loss": 0.0, "correct": 0, "seen": 0}
    stopped_early = False

    resume = resume or config.resume
    if resume:
        path = latest_checkpoint(Path(resume))
        state = torch.load(path, map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        iteration, best, patience = state["iteration"], state["best"], state["patience"]
        history, running, stopped_early = state["history"], state["running"], state["stopped_early"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log.info("resumed from %s at iteration %d", path, iteration)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=iteration + 1 if iteration else None)
    progress = None
    if config.progress:
        from tqdm import tqdm

        progress = tqdm(total=max_iterations, initial=iteration, desc=f"training {config.name}", unit="it",
                        dynamic_ncols=True, leave=False)
    log.info("model: %d parameters, %s, %d iterations at most (%d per epoch)", count_parameters(net),
             config.arch.activation_function, max_iterations, n_batches)

    net.train()
    while iteration < max_iterations and not stopped_early:
        epoch, batch_index = divmod(iteration, n_batches)
        order = np.random.default_rng([config.seed, 1, epoch]).permutation(len(train_set))
        index = torch.from_numpy(order[batch_index * config.batch_size:(batch_index + 1) * config.batch_size])
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
        torch.manual_seed(config.seed * 7_919 + iteration)  # dropout of this iteration
        x = augment(train_x[index], config, generator)
        y = train_y[index].to(device)
        x = x.to(device)
        logits = net.forward_normalised(x) if normalised else net(x)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        iteration += 1
        running["loss"] += loss.item() * len(y)
        running["correct"] += int(((logits.detach() >= 0) == (y == 1)).sum())
        running["seen"] += len(y)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        last = iteration == max_iterations
        if iteration % config.validate_every_batches == 0 or last:
            valid_loss, valid_accuracy = evaluate(net, valid_x, valid_set.labels, normalised, device)
            entry = {"iteration": iteration, "epoch": iteration / n_batches,
                     "train_loss": running["loss"] / max(running["seen"], 1),
                     "train_accuracy": running["correct"] / max(running["seen"], 1),
                     "valid_loss": valid_loss, "valid_accuracy": valid_accuracy,
                     "lr": scheduler.get_last_lr()[0]}
            history.append(entry)
            running = {"loss": 0.0, "correct": 0, "seen": 0}
            for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr"):
                writer.add_scalar(key.replace("_", "/", 1), entry[key], iteration)
            # Deep-HiTS's early stopping (the Theano tutorial's patience rule)
            if valid_loss < best["loss"]:
                if valid_loss < best["loss"] * config.improvement_threshold:
                    patience = max(patience, int(iteration * config.patience_increase))
                best = {"loss": valid_loss, "iteration": iteration,
                        "model": {k: v.detach().clone() for k, v in net.state_dict().items()}}
            message = (f"iter {iteration:6d} epoch {entry['epoch']:5.2f} | train loss {entry['train_loss']:.4f} "
                       f"acc {entry['train_accuracy']:.4f} | valid loss {valid_loss:.4f} acc {valid_accuracy:.4f}"
                       f" | lr {entry['lr']:.2e} | best {best['loss']:.4f}@{best['iteration']} patience {patience}")
            (progress.write if progress is not None else log.info)(message)
            if patience <= iteration:
                stopped_early = not last
                if stopped_early:
                    (progress.write if progress is not None else log.info)(
                        f"early stop at iteration {iteration}: no improvement below "
                        f"{config.improvement_threshold} x best since iteration {best['iteration']}")

        if iteration % config.savestep == 0 or stopped_early or iteration == max_iterations:
            save_checkpoint(run_dir, {
                "iteration": iteration, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best": best, "patience": patience, "history": history,
                "running": running, "stopped_early": stopped_early, "config": config.to_dict(),
                "contract": contract.to_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            })
    if progress is not None:
        progress.close()
    writer.flush()

    # ---- test the best model, export it, write the card and plots
    if best["model"] is not None:
        net.load_state_dict(best["model"])
    net.eval().cpu()
    threshold = float(config.table("export")["threshold"])
    calibration = None
    if config.table("export")["calibration"] == "temperature":
        simulated = 0 if valid_set.kinds is None else sum(str(k).startswith("simulated") for k in valid_set.kinds)
        population = (f"the validation split of data.source = {data_info['source']}: {len(valid_set)} samples "
                      f"({simulated} of them simulated), {valid_set.labels.mean():.1%} real")
        try:
            calibration = calibrate(predict(net, valid_x, normalised), valid_set.labels, population)
        except CalibrationError as exc:
            raise ConfigError(f"export.calibration = \"temperature\": {exc}") from None
        log.info("calibration: temperature %.3f fitted on %s; validation ECE %.4f -> %.4f",
                 calibration["temperature"], population, calibration["ece_before"], calibration["ece_after"])
    temperature = calibration["temperature"] if calibration else 1.0
    test_logits = predict(net, test_set.stamps)
    test_scores = sigmoid(test_logits, temperature)
    # labelled real detections are few: their AUC needs its interval; simulations are unlimited
    test_metrics = report.metrics(test_set.labels, test_scores, threshold, test_set.kinds,
                                  interval=data_info["source"] in ("alerts", "braai"))
    for key in ("accuracy", "roc_auc", "fpr", "fnr"):
        writer.add_scalar(f"test/{key}", test_metrics[key], iteration)
    writer.close()
    np.savez_compressed(run_dir / "test_scores.npz", scores=test_scores.astype(np.float32), labels=test_set.labels)
    (run_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")

    verification = export_onnx(net, run_dir / MODEL_FILE, test_set.stamps, opset=config.table("export")["opset"],
                               max_mb=config.table("export")["max_mb"], temperature=temperature)
    report.plot_history(history, run_dir / "history.png")
    report.plot_roc(test_set.labels, test_scores, run_dir / "roc.png", title=config.name)
    report.plot_det(test_set.labels, test_scores, run_dir / "det.png", threshold=threshold, title=config.name)
    training_info = {
        "iterations": iteration, "epochs": round(iteration / n_batches, 3), "best_iteration": best["iteration"],
        "best_valid_loss": best["loss"], "stopped_early": stopped_early, "max_iterations": max_iterations,
        "parameters": count_parameters(net), "frozen_layers": frozen,
        "finetuned_from": finetune["from"], "seconds": round(time.time() - started, 1), "threads": config.threads,
        "device": device, "torch": torch.__version__,
        "final_valid": history[-1] if history else None,
    }
    inference = measure_inference(run_dir / MODEL_FILE, test_set.stamps, threads=config.threads)
    card = model_card(config, contract, data_info, test_metrics, verification, training_info, inference,
                      calibration)
    write_card(card, run_dir)
    log.info("test: accuracy %.4f, ROC AUC %.4f, FPR %.4f, FNR %.4f at %.2f, Brier %.4f, ECE %.4f; "
             "inference %.3f ms/stamp (batch %d, %d threads); card %s", test_metrics["accuracy"],
             test_metrics["roc_auc"], test_metrics["fpr"], test_metrics["fnr"], threshold, test_metrics["brier"],
             test_metrics["ece"], inference["ms_per_stamp"], inference["batch"], inference["threads"],
             run_dir / CARD_FILE)
    return card


@torch.no_grad()
def _normalise_all(net: RealBogusNet, stamps: np.ndarray) -> torch.Tensor:
    parts = [net.normaliser(torch.from_numpy(stamps[i:i + 2048])) for i in range(0, len(stamps), 2048)]
    return torch.cat(parts) if parts else torch.empty(0)
