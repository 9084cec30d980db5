"""Pictures and files of explanations: a PNG per alert, an ``.npz`` of the arrays, an index page.

The PNG has one row per method and one column per raw image (science, template,
difference): each cutout in grey (a percentile stretch), its attribution map over it in
a diverging colour map centred on 0 (red: the pixel raises the score, blue: it lowers
it; each panel has its own colour bar, since attributions per ADU differ by orders of
magnitude between a bright science image and the difference). The title
gives the ids, our score, the survey's own score and the model. matplotlib is imported
here only (the ``explain`` extra); without it PNGs cannot be made, and saying so is the
caller's job (`RenderError`).
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from service.explain.attributions import Explanation

#: Column order of the picture: the order people read a triplet in.
DISPLAY_ORDER = ("science", "template", "difference")
_METHOD_TITLES = {"occlusion": "occlusion (score drop)", "saliency": "saliency (d score / d pixel)",
                  "integrated-gradients": "integrated gradients"}


class RenderError(RuntimeError):
    """A picture that cannot be drawn here (matplotlib missing)."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise RenderError("PNG pictures need matplotlib: pip install 'rbstream[explain]'") from None
    return plt


def stretch(image: np.ndarray) -> np.ndarray:
    """Grey levels 0..1 from the 1st-99.5th percentile of the finite pixels (masked pixels: NaN)."""
    finite = image[np.isfinite(image)]
    if not finite.size:
        return np.full(image.shape, np.nan)
    low, high = np.percentile(finite, [1.0, 99.5])
    return np.clip((image - low) / ((high - low) or 1.0), 0.0, 1.0)


def describe(meta: Mapping) -> str:
    """One line of ids and scores for a title: ``id``, ``object_id``, ``score``, ``survey_score(_name)``."""
    parts = [f"{meta.get('survey', '')} {meta.get('id', '')}".strip()]
    if meta.get("object_id"):
        parts.append(f"object {meta['object_id']}")
    if meta.get("score") is not None:
        parts.append(f"score {meta['score']:.3f}")
    if meta.get("survey_score") is not None:
        parts.append(f"{meta.get('survey_score_name') or 'survey score'} {meta['survey_score']:.3f}")
    return " · ".join(parts)


def render_png(stamp: np.ndarray, explanations: Mapping[str, Explanation], meta: Mapping) -> bytes:
    """The PNG of one candidate: ``stamp`` ``[raw images, size, size]`` and its explanations by method."""
    plt = _pyplot()
    methods = list(explanations)
    first = explanations[methods[0]]
    channels = list(first.channels)
    columns = [name for name in DISPLAY_ORDER if name in channels] + [n for n in channels if n not in DISPLAY_ORDER]
    figure, axes = plt.subplots(len(methods), len(columns), figsize=(2.3 * len(columns), 2.4 * len(methods) + 0.5),
                                squeeze=False)
    for row, method in enumerate(methods):
        explanation = explanations[method]
        for col, name in enumerate(columns):
            ax = axes[row][col]
            index = channels.index(name)
            # Each panel its own limit: in raw ADU a bright science image has far smaller gradients
            # per pixel than the difference, and a shared limit would show it blank.
            limit = float(np.max(np.abs(explanation.attributions[index]))) or 1.0
            ax.imshow(stretch(stamp[index]), cmap="gray", origin="lower", interpolation="nearest")
            heat = ax.imshow(explanation.attributions[index], cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.6,
                             origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(_METHOD_TITLES.get(method, method), fontsize=8)
            colorbar = figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
            colorbar.ax.tick_params(labelsize=5)
        if explanation.completeness_error is not None:
            axes[row][-1].text(1.0, -0.08, f"completeness error {explanation.completeness_error:+.2g}",
                               transform=axes[row][-1].transAxes, ha="right", va="top", fontsize=6)
    figure.suptitle(f"{describe(meta)}\nmodel {first.model} {first.model_version}", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def save_npz(path: Path, stamp: np.ndarray, explanations: Mapping[str, Explanation], meta: Mapping) -> None:
    """``stamp``, ``<method>`` (attributions), ``channels``, ``model``, ids and scores, and per method its
    parameters (``<method>_parameters``, JSON) and completeness error, when it has one."""
    import json

    first = next(iter(explanations.values()))
    arrays = {"stamp": stamp, "channels": np.array(first.channels), "model": np.array(first.model),
              "model_version": np.array(first.model_version), "meta": np.array(json.dumps(dict(meta), default=str))}
    for method, explanation in explanations.items():
        key = method.replace("-", "_")
        arrays[key] = explanation.attributions
        arrays[f"{key}_parameters"] = np.array(json.dumps(explanation.parameters))
        if explanation.completeness_error is not None:
            arrays[f"{key}_completeness_error"] = np.array(explanation.completeness_error)
            arrays[f"{key}_baseline_score"] = np.array(explanation.baseline_score)
    np.savez_compressed(path, **arrays)


def write_index(folder: Path, entries: Sequence[Mapping]) -> Path:
    """``index.html`` in ``folder``: one row per alert (its picture, ids, scores) and the files that failed.

    Each entry has ``png``, ``npz`` (file names in ``folder``) and the `describe` fields, or ``error``.
    """
    rows = []
    for entry in entries:
        if entry.get("error"):
            rows.append(f"<tr><td>{html.escape(str(entry.get('file', '')))}</td><td colspan=2 class=error>"
                        f"{html.escape(entry['error'])}</td></tr>")
            continue
        rows.append(f"<tr><td>{html.escape(describe(entry))}<br><a href=\"{html.escape(entry['npz'])}\">arrays</a>"
                    f"</td><td><img src=\"{html.escape(entry['png'])}\" alt=\"{html.escape(describe(entry))}\">"
                    "</td></tr>")
    page = ("<!doctype html><meta charset=utf-8><title>rbstream explanations</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}.error{color:#b00}</style>"
            f"<h1>rbstream explanations</h1><p>{len(entries)} alert(s). Red: the pixel raises the score; "
            "blue: it lowers it.</p><table>" + "".join(rows) + "</table>\n")
    path = folder / "index.html"
    path.write_text(page)
    return path
