"""Why a stamp got its score: attribution maps over the raw pixels the model receives.

Three methods (`METHODS`):

``occlusion``
    A patch slides over each image of the stamp in turn and is replaced by a baseline
    (by default the image's median, i.e. its sky); a pixel's attribution is the mean drop
    of the score over the patches that cover it (Zeiler & Fergus 2014), the quantity
    Captum's ``Occlusion`` computes. It runs on the ONNX model alone (`Scorer.score`,
    every occluded stamp of a candidate in a few batches), so the service needs no torch.
``saliency``
    The gradient of the score with respect to the input pixels (Simonyan et al. 2014),
    by Captum's ``Saliency`` on the model's torch weights (`service.explain.gradients`).
``integrated-gradients``
    Captum's ``IntegratedGradients`` (Sundararajan et al. 2017) from a configurable
    baseline with a configurable number of steps, on a path refined where the score
    changes fast (`service.explain.gradients.integrated_gradients`); the result carries its
    completeness error, sum(attributions) - (score(x) - score(baseline)), the method's own check.

The exported graph normalises in-graph, so attributions are with respect to the raw
pixels (ADU) the service receives: a map's units are "score per ADU" (saliency) or
"score" (occlusion, integrated gradients). Masked pixels (NaN, inf) carry none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Method names, as the CLI and the API take them.
METHODS = ("occlusion", "saliency", "integrated-gradients")
#: Methods that need the model's torch weights (``weights.pt`` beside ``model.onnx``).
GRADIENT_METHODS = ("saliency", "integrated-gradients")
#: What an occluded patch is replaced by.
OCCLUSION_BASELINES = ("median", "zero", "masked")
#: Occluded stamps scored per ONNX call (a candidate needs a few hundred to a few thousand).
OCCLUSION_BATCH = 1024


class ExplainError(ValueError):
    """A method that cannot be computed for this model or input; the message says why."""


@dataclass(frozen=True)
class OcclusionOptions:
    """Patch side and stride in pixels, and what a patch is replaced by (`OCCLUSION_BASELINES`)."""

    window: int = 5
    stride: int = 2
    baseline: str = "median"

    def __post_init__(self):
        if self.window < 1 or self.stride < 1:
            raise ExplainError(f"occlusion window and stride must be at least 1, got {self.window} and {self.stride}")
        if self.baseline not in OCCLUSION_BASELINES:
            raise ExplainError(f"occlusion baseline {self.baseline!r}; accepted: {', '.join(OCCLUSION_BASELINES)}")


@dataclass(frozen=True)
class GradientOptions:
    """Integrated gradients: the baseline (`service.explain.gradients.BASELINES`) and the number of steps."""

    baseline: str = "noise"
    steps: int = 512

    def __post_init__(self):
        from service.explain.gradients import BASELINES

        if self.baseline not in BASELINES:
            raise ExplainError(f"integrated-gradients baseline {self.baseline!r}; accepted: {', '.join(BASELINES)}")
        if not 2 <= self.steps <= 1024:
            raise ExplainError(f"integrated-gradients steps must be 2 to 1024, got {self.steps}")


@dataclass
class Explanation:
    """One method's attributions for one stamp.

    Attributes
    ----------
    method : str
        One of `METHODS`.
    attributions : ndarray
        float32 ``[raw images, size, size]``, in the order of ``channels``; 0 at masked pixels.
    channels : tuple of str
        The raw images (the model contract's ``raw_inputs``).
    model, model_version, survey : str
        Which model produced it (model card ``name``, ``version``, ``survey``).
    score : float
        The model's score of the stamp (by the ONNX model).
    parameters : dict
        The method's settings (window, stride, baseline, steps).
    completeness_error : float or None
        Integrated gradients only: sum of attributions minus (score - baseline score).
    baseline_score : float or None
        Integrated gradients only: the model's score of the baseline.
    """

    method: str
    attributions: np.ndarray
    channels: tuple[str, ...]
    model: str
    model_version: str
    survey: str
    score: float
    parameters: dict = field(default_factory=dict)
    completeness_error: float | None = None
    baseline_score: float | None = None


def normalise_methods(method: str) -> tuple[str, ...]:
    """``all`` or one method name -> the methods to run, in `METHODS` order."""
    if method == "all":
        return METHODS
    if method not in METHODS:
        raise ExplainError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}, all")
    return (method,)


def occlusion_baseline(stamps: np.ndarray, kind: str) -> np.ndarray:
    """What occluded pixels become, ``[n, raw images, 1, 1]``: each image's median of finite pixels, 0 or NaN
    (NaN: the model's own masking, as for pixels off the CCD)."""
    n, k = stamps.shape[:2]
    if kind == "zero":
        return np.zeros((n, k, 1, 1), dtype=np.float32)
    if kind == "masked":
        return np.full((n, k, 1, 1), np.nan, dtype=np.float32)
    flat = np.where(np.isfinite(stamps), stamps, np.nan).reshape(n, k, -1)
    with np.errstate(all="ignore"):
        median = np.nanmedian(flat, axis=-1)
    return np.nan_to_num(median, nan=0.0).astype(np.float32).reshape(n, k, 1, 1)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start of every patch along one axis, as Captum's ``Occlusion`` places them."""
    if window > size:
        raise ExplainError(f"occlusion window {window} is larger than the {size}-pixel stamp")
    return list(range(0, size - window + 1, stride))


def occlusion(score, stamps: np.ndarray, options: OcclusionOptions = OcclusionOptions()) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion attributions of each stamp, from a scoring function alone.

    Parameters
    ----------
    score : callable
        ``[batch, raw images, size, size]`` float32 -> ``[batch]`` scores, e.g. `Scorer.score`.
    stamps : ndarray
        ``[n, raw images, size, size]`` model input (raw pixels, NaN allowed).
    options : OcclusionOptions

    Returns
    -------
    attributions : ndarray
        float32 ``[n, raw images, size, size]``: per pixel, the mean over the patches
        covering it of score(stamp) - score(stamp with the patch replaced); 0 at masked pixels
        and at pixels no patch covers.
    scores : ndarray
        The scores of the stamps themselves, ``[n]``.
    """
    stamps = np.asarray(stamps, dtype=np.float32)
    n, k, height, width = stamps.shape
    rows = window_starts(height, options.window, options.stride)
    cols = window_starts(width, options.window, options.stride)
    w = options.window
    baseline = occlusion_baseline(stamps, options.baseline)
    patches = [(c, r, q) for c in range(k) for r in rows for q in cols]
    coverage = np.zeros((k, height, width), dtype=np.float32)
    for c, r, q in patches:
        coverage[c, r:r + w, q:q + w] += 1.0
    attributions = np.zeros_like(stamps)
    scores = np.asarray(score(stamps), dtype=np.float32).reshape(-1)
    for i in range(n):
        # Every occluded version of stamp i, scored in batches: one ONNX call per batch, not per patch.
        drops = np.empty(len(patches), dtype=np.float32)
        for start in range(0, len(patches), OCCLUSION_BATCH):
            chunk = patches[start:start + OCCLUSION_BATCH]
            occluded = np.repeat(stamps[i:i + 1], len(chunk), axis=0)
            for j, (c, r, q) in enumerate(chunk):
                occluded[j, c, r:r + w, q:q + w] = baseline[i, c, 0, 0]
            drops[start:start + len(chunk)] = scores[i] - np.asarray(score(occluded), dtype=np.float32).reshape(-1)
        for drop, (c, r, q) in zip(drops, patches):
            attributions[i, c, r:r + w, q:q + w] += drop
    with np.errstate(invalid="ignore", divide="ignore"):
        attributions = np.where(coverage > 0, attributions / coverage, 0.0)
    attributions = np.where(np.isfinite(stamps), attributions, 0.0).astype(np.float32)
    return attributions, scores


def explain_stamps(scorer, stamps: np.ndarray, methods: tuple[str, ...],
                   occlusion_options: OcclusionOptions = OcclusionOptions(),
                   gradient_options: GradientOptions | None = None) -> list[dict[str, Explanation]]:
    """Every method's `Explanation` of every stamp: one dict method -> explanation per stamp.

    Parameters
    ----------
    scorer : service.score.model.Scorer
        The ONNX model; gradient methods load its torch weights (``weights.pt`` beside
        ``model.onnx``) and check that they give the ONNX model's scores.
    stamps : ndarray
        ``[n, raw images, size, size]`` model input.

    Raises
    ------
    ExplainError
        When a gradient method is asked for and torch, Captum or the weights are missing,
        or the weights do not reproduce the ONNX model's scores.
    """
    stamps = np.asarray(stamps, dtype=np.float32)
    card = scorer.card
    channels = tuple(scorer.contract.raw_inputs)
    out: list[dict[str, Explanation]] = [{} for _ in range(len(stamps))]

    def record(method, maps, scores, parameters, errors=None, baseline_scores=None):
        for i in range(len(stamps)):
            out[i][method] = Explanation(
                method=method, attributions=maps[i], channels=channels, model=card.name,
                model_version=card.version, survey=card.survey, score=float(scores[i]), parameters=dict(parameters),
                completeness_error=None if errors is None else float(errors[i]),
                baseline_score=None if baseline_scores is None else float(baseline_scores[i]))

    scores = None
    if "occlusion" in methods:
        maps, scores = occlusion(scorer.score, stamps, occlusion_options)
        record("occlusion", maps, scores, {"window": occlusion_options.window, "stride": occlusion_options.stride,
                                           "baseline": occlusion_options.baseline})
    wanted = [m for m in methods if m in GRADIENT_METHODS]
    if wanted:
        from service.explain import gradients

        scores = scorer.score(stamps) if scores is None else scores
        graph = gradients.load_for(scorer, stamps, scores)
        if "saliency" in wanted:
            record("saliency", gradients.saliency(graph, stamps), scores, {})
        if "integrated-gradients" in wanted:
            options = gradient_options or GradientOptions()
            maps, errors, baseline_scores = gradients.integrated_gradients(graph, stamps, options.baseline,
                                                                           options.steps)
            record("integrated-gradients", maps, scores, {"baseline": options.baseline, "steps": options.steps},
                   errors, baseline_scores)
    return out
