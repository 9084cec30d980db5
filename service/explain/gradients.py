"""Gradient attributions (saliency, integrated gradients) with Captum on a model's torch weights.

The ONNX file has no gradients; a trained model ships its torch weights beside it
(``weights.pt``, `training.model.save_weights`), the same graph as ``model.onnx``. Before
any attribution is computed, the weights are checked to give the ONNX model's scores of
the very stamps being explained (`SCORE_TOLERANCE`): an explanation of another model
would be worse than none. torch and Captum are imported only here, and only when a
gradient method is asked for (``pip install 'rbstream[explain]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.explain.attributions import ExplainError

#: Integrated-gradients baselines. ``noise`` (the default): Gaussian noise at each image's
#: median and robust sigma, a stamp with the same sky and noise and no source (seeded by the
#: stamp's bytes: the same stamp gets the same baseline; a rotated stamp another draw);
#: ``blur``: each image blurred by a Gaussian a quarter of the stamp wide (Sturmfels et al.
#: 2020), which rotates with the input, but keeps a bright star's halo, so on Rubin stamps
#: its attributions spread over the star (median share at simulated sources 0.14 against
#: 0.88 with ``noise``); ``zero``: all pixels 0. The model standardises each
#: image, so a constant baseline is a degenerate input for it: ``zero`` is offered to compare, and
#: its completeness error says how poor it is.
BASELINES = ("blur", "noise", "zero")
#: Largest |torch score - ONNX score| accepted for the weights to stand for the ONNX model.
SCORE_TOLERANCE = 1e-4
WEIGHTS_FILE = "weights.pt"

_CACHE: dict = {}


def _torch():
    try:
        import captum  # noqa: F401
        import torch
    except ModuleNotFoundError as exc:
        raise ExplainError(f"saliency and integrated gradients need torch and Captum ({exc.name} is not installed): "
                           "pip install 'rbstream[explain]'; occlusion needs neither") from None
    return torch


def weights_path(scorer) -> Path:
    return Path(scorer.path).parent / WEIGHTS_FILE


def load_graph(path: str | Path):
    """The torch `ScoringGraph` saved at ``path`` (raw stamps -> score), in eval mode, cached by path and mtime."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"gradient methods need the model's torch weights, and there is no {path}; "
                           "retrain or export the model with its weights, or use occlusion")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _CACHE:
        from training.model import load_weights

        try:
            graph = load_weights(path)
        except Exception as exc:  # a corrupt or foreign file: say so, never explain something else
            raise ExplainError(f"cannot load the torch weights {path}: {type(exc).__name__}: {exc}") from None
        for parameter in graph.parameters():
            parameter.requires_grad_(False)
        _CACHE.clear()
        _CACHE[key] = graph.to(torch.float32)
    return _CACHE[key]


def load_for(scorer, stamps: np.ndarray, onnx_scores: np.ndarray):
    """The torch graph of ``scorer``'s model, checked to reproduce its ONNX scores of ``stamps``."""
    graph = load_graph(weights_path(scorer))
    torch_scores = score(graph, stamps)
    worst = float(np.max(np.abs(torch_scores - np.asarray(onnx_scores, dtype=np.float64)), initial=0.0))
    if not worst <= SCORE_TOLERANCE:
        raise ExplainError(f"the torch weights {weights_path(scorer)} do not match {scorer.path}: scores differ "
                           f"by up to {worst:.3g} (> {SCORE_TOLERANCE:g}); they belong to another model")
    return graph


def score(graph, stamps: np.ndarray) -> np.ndarray:
    """The torch graph's scores of ``stamps``, float64."""
    torch = _torch()
    with torch.no_grad():
        return graph(torch.from_numpy(np.ascontiguousarray(stamps, dtype=np.float32))).double().numpy()


def saliency(graph, stamps: np.ndarray) -> np.ndarray:
    """d score / d pixel, signed, ``[n, raw images, size, size]`` float32 (Captum ``Saliency``, ``abs=False``)."""
    torch = _torch()
    from captum.attr import Saliency

    inputs = torch.from_numpy(np.ascontiguousarray(stamps, dtype=np.float32)).requires_grad_(True)
    maps = Saliency(graph).attribute(inputs, abs=False).detach().numpy()
    return _clean(maps, stamps)


def make_baseline(stamps: np.ndarray, kind: str) -> np.ndarray:
    """An integrated-gradients baseline for each stamp (`BASELINES`); NaN where the stamp is masked."""
    stamps = np.asarray(stamps, dtype=np.float32)
    finite = np.isfinite(stamps)
    if kind == "zero":
        baseline = np.zeros_like(stamps)
    elif kind == "blur":
        from scipy.ndimage import gaussian_filter

        filled = _fill_masked(stamps)
        sigma = stamps.shape[-1] / 4.0
        baseline = gaussian_filter(filled.astype(np.float64), sigma=(0, 0, sigma, sigma), mode="reflect")
    elif kind == "noise":
        filled = _fill_masked(stamps)
        baseline = np.empty_like(stamps)
        for i, stamp in enumerate(filled):
            # Seeded by the stamp's bytes: the same stamp gets the same baseline, hence the same answer.
            rng = np.random.default_rng(np.frombuffer(stamp.tobytes(), dtype=np.uint32)[:64].astype(np.uint64))
            for c, image in enumerate(stamp):
                median = np.median(image)
                sigma = 1.4826 * np.median(np.abs(image - median)) or float(np.std(image)) or 1.0
                baseline[i, c] = rng.normal(median, sigma, image.shape)
    else:
        raise ExplainError(f"integrated-gradients baseline {kind!r}; accepted: {', '.join(BASELINES)}")
    return np.where(finite, baseline, np.nan).astype(np.float32)


#: Gauss-Legendre points per piece of the path when integrated gradients refine it.
SEGMENT_STEPS = 16


def integrated_gradients(graph, stamps: np.ndarray, baseline: str | np.ndarray = "noise", steps: int = 512,
                         refine: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Captum's ``IntegratedGradients`` from ``baseline``, with ``steps`` gradient evaluations per stamp.

    The model's score is a calibrated sigmoid: along the path from a sourceless baseline it
    often jumps from ~0 to ~1 over a small fraction of the way, which a fixed rule spends
    most of its points missing; cutting the path where the error is (below) gives smaller
    completeness errors than Captum's fixed rule at the same number of gradients.
    With ``refine``, integrated gradients being additive along the path, the path is cut
    into pieces, each integrated by Captum with `SEGMENT_STEPS` Gauss-Legendre points, and
    the piece with the largest completeness error is halved until ``steps`` are spent; the
    sum over pieces is the attribution. Without it (or with fewer than ``2 * SEGMENT_STEPS``
    steps) Captum integrates the whole path with ``steps`` points.

    Parameters
    ----------
    baseline : str or ndarray
        A `BASELINES` name, or the baseline stamps themselves ``[n, raw images, size, size]``.

    Returns
    -------
    attributions : ndarray
        ``[n, raw images, size, size]`` float32; 0 at masked pixels (they are masked along the
        whole path, so the model never sees them).
    completeness_error : ndarray
        ``[n]``: sum of attributions - (score(stamp) - score(baseline)).
    baseline_scores : ndarray
        ``[n]``: score(baseline).
    """
    stamps = np.ascontiguousarray(stamps, dtype=np.float32)
    base = make_baseline(stamps, baseline) if isinstance(baseline, str) else np.asarray(baseline, dtype=np.float32)
    if base.shape != stamps.shape:
        raise ExplainError(f"baseline of shape {base.shape} for stamps of shape {stamps.shape}")
    # Masked in the stamp -> masked in the baseline: the path never un-masks a pixel.
    base = np.where(np.isfinite(stamps), base, np.nan).astype(np.float32)
    if refine and steps >= 2 * SEGMENT_STEPS:
        maps = np.stack([_refined(graph, stamps[i:i + 1], base[i:i + 1], steps) for i in range(len(stamps))])
    else:
        maps = _captum_ig(graph, stamps, base, steps)
    maps = _clean(maps, stamps)
    baseline_scores = score(graph, base)
    errors = maps.reshape(len(maps), -1).astype(np.float64).sum(-1) - (score(graph, stamps) - baseline_scores)
    return maps, errors, baseline_scores


def _captum_ig(graph, stamps: np.ndarray, base: np.ndarray, steps: int) -> np.ndarray:
    torch = _torch()
    from captum.attr import IntegratedGradients

    inputs = torch.from_numpy(np.ascontiguousarray(stamps, dtype=np.float32)).requires_grad_(True)
    maps = IntegratedGradients(graph).attribute(inputs, baselines=torch.from_numpy(np.ascontiguousarray(base)),
                                                n_steps=steps, internal_batch_size=len(stamps) * steps)
    # NaN (masked) pixels: gradient 0 times NaN; they carry nothing.
    return np.nan_to_num(maps.detach().numpy(), nan=0.0)


def _refined(graph, stamp: np.ndarray, base: np.ndarray, steps: int) -> np.ndarray:
    """Integrated gradients of one stamp ``[1, ...]`` over a path cut where the completeness error is largest."""
    def point(t: float) -> np.ndarray:
        return (base + np.float32(t) * (stamp - base)).astype(np.float32)

    def piece(a: float, b: float):
        start, end = point(a), point(b)
        maps = _captum_ig(graph, end, start, SEGMENT_STEPS)[0]
        ends = score(graph, np.concatenate([start, end]))
        return maps, abs(float(maps.astype(np.float64).sum()) - float(ends[1] - ends[0]))

    pieces = {(0.0, 1.0): piece(0.0, 1.0)}
    for _ in range(steps // SEGMENT_STEPS - 1):
        (a, b), _ = max(pieces.items(), key=lambda item: item[1][1])
        if (b - a) < 1e-6:
            break
        del pieces[(a, b)]
        middle = (a + b) / 2.0
        pieces[(a, middle)] = piece(a, middle)
        pieces[(middle, b)] = piece(middle, b)
    return np.sum([maps for maps, _ in pieces.values()], axis=0)


def _fill_masked(stamps: np.ndarray) -> np.ndarray:
    """Masked pixels replaced by their image's median of finite pixels (0 if it has none)."""
    flat = np.where(np.isfinite(stamps), stamps, np.nan).reshape(*stamps.shape[:2], -1)
    with np.errstate(all="ignore"):
        median = np.nan_to_num(np.nanmedian(flat, axis=-1), nan=0.0)[..., None, None]
    return np.where(np.isfinite(stamps), stamps, median).astype(np.float32)


def _clean(maps: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """Attributions at masked pixels are 0: the model replaced those pixels by a constant."""
    return np.where(np.isfinite(stamps) & np.isfinite(maps), maps, 0.0).astype(np.float32)
