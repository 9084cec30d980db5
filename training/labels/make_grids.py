"""Render real alerts as image grids for labelling by eye.

One PNG holds a few alerts, one row per alert: science | template | difference
(zscale) | difference (symmetric) | the centres of difference, science and template,
zoomed. The survey's own scores (``rb``, ``drb``, ``reliability``) are never drawn, so
that the labeller is blind to them; rows carry only a running index and the alert's id.
An index CSV (``index,survey,id,object_id,file,page``) ties each row to its alert.

Usage::

    python -m training.labels.make_grids --select rubin --out /tmp/grids
    python -m training.labels.make_grids --select ztf-disputed --out /tmp/grids
    python -m training.labels.make_grids --select ztf-nodrb-lowrb --out /tmp/grids
    python -m training.labels.make_grids --select ztf-model-disputed --scores runs/cv-ztf/out_of_fold.csv \
        --labelled training/labels/eye_labels.csv training/labels/eye_labels_round2.csv --out /tmp/grids

Selections (over ``labels.csv`` of the real-alert folder):

* ``rubin``: every Rubin alert;
* ``ztf-disputed``: ZTF alerts with ``drb < 0.5``, or where ``drb`` and ``rb`` fall on
  different sides of 0.5;
* ``ztf-nodrb-lowrb``: ZTF alerts without ``drb`` whose ``rb < 0.5``;
* ``ztf-model-disputed``: ZTF alerts not yet labelled by eye (in the ``--labelled`` CSVs) that the
  survey calls real (``drb >= 0.5``, or ``rb >= 0.5`` where there is no ``drb``) and our
  model calls bogus: an out-of-fold score (``--scores``, the ``out_of_fold.csv`` of
  ``rbstream train --folds``) below 0.5. Out-of-fold scores exist only outside the test
  split, so the test split is never chosen this way.

The scores are read only to select, never written to the grids or the index.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.visualization import ZScaleInterval  # noqa: E402

from service.decode.alerts import DecodeError, decode_message  # noqa: E402

#: Side of the zoomed centre views (difference, science, template), pixels.
ZOOM_SIZE = 21

#: Colour of NaN / masked pixels: none of the grey levels, so gaps never pass for sky.
NAN_COLOUR = "magenta"

#: Score at which the surveys' own scores call an alert real (used only to select).
CUT = 0.5


def _score(row: dict, name: str) -> float | None:
    value = row.get(name, "")
    return float(value) if value not in ("", None) else None


def select(rows: list[dict], selection: str, model_scores: dict[str, float] | None = None,
           labelled: frozenset[str] = frozenset()) -> list[dict]:
    """Pick the alerts of one selection from the rows of ``labels.csv``.

    Parameters
    ----------
    rows : list of dict
        Rows of ``labels.csv`` (``survey, id, object_id, file, source, rb, drb, reliability``).
    selection : {"rubin", "ztf-disputed", "ztf-nodrb-lowrb", "ztf-model-disputed"}
        See the module docstring.
    model_scores : dict of str to float, optional
        Our model's out-of-fold score by alert id (``ztf-model-disputed`` only).
    labelled : frozenset of str
        Ids already labelled by eye, left out (``ztf-model-disputed`` only).

    Returns
    -------
    list of dict
        The chosen rows, ordered by file name (not by any score).
    """
    chosen = []
    for row in rows:
        rb, drb = _score(row, "rb"), _score(row, "drb")
        if selection == "rubin":
            keep = row["survey"] == "rubin"
        elif selection == "ztf-disputed":
            keep = row["survey"] == "ztf" and drb is not None and (
                drb < CUT or (rb is not None and (rb >= CUT) != (drb >= CUT))
            )
        elif selection == "ztf-nodrb-lowrb":
            keep = row["survey"] == "ztf" and drb is None and rb is not None and rb < CUT
        elif selection == "ztf-model-disputed":
            theirs = drb if drb is not None else rb
            ours = (model_scores or {}).get(row["id"])
            keep = (row["survey"] == "ztf" and row["id"] not in labelled and theirs is not None
                    and theirs >= CUT and ours is not None and ours < CUT)
        else:
            raise ValueError(f"unknown selection {selection!r}")
        if keep:
            chosen.append(row)
    return sorted(chosen, key=lambda r: r["file"])


def zscale_limits(image: np.ndarray) -> tuple[float, float]:
    """IRAF-style zscale limits of the finite pixels (sky-level stretch)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = ZScaleInterval().get_limits(finite)
    if not high > low:
        low, high = float(finite.min()), float(finite.max()) + 1e-6
    return float(low), float(high)


def symmetric_limits(image: np.ndarray, percentile: float = 99.5) -> tuple[float, float]:
    """Limits symmetric about zero at a high percentile of |pixel|: positive and negative
    lobes of a difference image get the same weight, so dipoles read as dipoles."""
    finite = np.abs(image[np.isfinite(image)])
    if finite.size == 0:
        return -1.0, 1.0
    half = float(np.percentile(finite, percentile)) or float(finite.max()) or 1.0
    return -half, half


def centre_of(alert, shape: tuple[int, int]) -> tuple[int, int]:
    """Pixel of the source: the alert's own centre when its cutouts were truncated."""
    if alert.centre is not None:
        return int(round(alert.centre[0])), int(round(alert.centre[1]))
    return shape[0] // 2, shape[1] // 2


def zoom(image: np.ndarray, centre: tuple[int, int], size: int = ZOOM_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` window around ``centre``, NaN-padded past the edges."""
    half = size // 2
    out = np.full((size, size), np.nan, dtype=np.float32)
    r0, c0 = centre[0] - half, centre[1] - half
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + size, image.shape[0]), min(c0 + size, image.shape[1])
    if re > rs and ce > cs:
        out[rs - r0:re - r0, cs - c0:ce - c0] = image[rs:re, cs:ce]
    return out


def _show(ax, image: np.ndarray, limits: tuple[float, float], cmap, centre=None) -> None:
    ax.imshow(np.ma.masked_invalid(image), origin="lower", cmap=cmap, vmin=limits[0],
              vmax=limits[1], interpolation="nearest")
    if centre is not None:
        # Ticks beside, not on, the source: the centre pixel must stay visible.
        ax.plot([centre[1] - 6, centre[1] - 3], [centre[0], centre[0]], color="cyan", lw=0.8)
        ax.plot([centre[1], centre[1]], [centre[0] - 6, centre[0] - 3], color="cyan", lw=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def render_page(entries: list[tuple[int, dict, object]], path: Path) -> None:
    """Draw one PNG: a row per alert (science, template, difference, difference zoom).

    Parameters
    ----------
    entries : list of (int, dict, Alert or str)
        Running index, the ``labels.csv`` row, and the decoded alert (or the reason it
        did not decode, drawn as text).
    path : Path
        Where the PNG goes.
    """
    grey = plt.get_cmap("gray").copy()
    grey.set_bad(NAN_COLOUR)
    diverging = plt.get_cmap("RdBu_r").copy()
    diverging.set_bad(NAN_COLOUR)
    fig, axes = plt.subplots(len(entries), 7, figsize=(7 * 2.0, len(entries) * 2.1), squeeze=False)
    for axrow, (index, row, alert) in zip(axes, entries):
        label = f"#{index}  {row['survey']} {row['id']}"
        if isinstance(alert, str):
            for ax in axrow:
                ax.axis("off")
            axrow[0].set_title(f"{label}: {alert}", fontsize=7, loc="left")
            continue
        images = alert.images
        shape = images["difference"].shape
        centre = centre_of(alert, shape)
        for ax, name in zip(axrow[:2], ("science", "template")):
            _show(ax, images[name], zscale_limits(images[name]), grey, centre)
        diff = images["difference"]
        _show(axrow[2], diff, zscale_limits(diff), grey, centre)
        _show(axrow[3], diff, symmetric_limits(diff), diverging, centre)
        window = zoom(diff, centre)
        finite = window[np.isfinite(window)]
        half = float(np.abs(finite).max()) if finite.size else 1.0
        _show(axrow[4], window, (-half or -1.0, half or 1.0), diverging)
        # Faint sources vanish in a full-cutout stretch; the centre at its own zscale shows them.
        for ax, name in zip(axrow[5:], ("science", "template")):
            centre_window = zoom(images[name], centre)
            _show(ax, centre_window, zscale_limits(centre_window), grey)
        axrow[0].set_title(label, fontsize=8, loc="left")
        axrow[1].set_title("template", fontsize=6)
        axrow[2].set_title(f"diff zscale {shape[0]}x{shape[1]}", fontsize=6)
        axrow[3].set_title("diff ±p99.5", fontsize=6)
        axrow[4].set_title(f"diff centre {ZOOM_SIZE}px", fontsize=6)
        axrow[5].set_title("science centre", fontsize=6)
        axrow[6].set_title("template centre", fontsize=6)
    fig.tight_layout(pad=0.3, h_pad=0.6, w_pad=0.2)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=Path("../shared/real"), help="real-alert folder with labels.csv")
    parser.add_argument("--select", required=True,
                        choices=("rubin", "ztf-disputed", "ztf-nodrb-lowrb", "ztf-model-disputed"))
    parser.add_argument("--scores", type=Path, help="out_of_fold.csv of a cross-validation (ztf-model-disputed)")
    parser.add_argument("--labelled", type=Path, nargs="+", default=[],
                        help="eye-label CSVs whose alerts are left out (ztf-model-disputed)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/grids"))
    parser.add_argument("--per-page", type=int, default=10)
    parser.add_argument("--start-index", type=int, default=0, help="first running index (keeps indices unique across selections)")
    args = parser.parse_args(argv)

    model_scores, labelled = None, frozenset()
    if args.scores:
        with open(args.scores, newline="") as handle:
            model_scores = {row["id"]: float(row["score"]) for row in csv.DictReader(handle)}
    for path in args.labelled:
        with open(path, newline="") as handle:
            labelled |= frozenset(row["id"] for row in csv.DictReader(handle))
    if args.select == "ztf-model-disputed" and model_scores is None:
        parser.error("--select ztf-model-disputed needs --scores")
    with open(args.real / "labels.csv", newline="") as handle:
        rows = select(list(csv.DictReader(handle)), args.select, model_scores, labelled)
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / f"{args.select}_index.csv"
    with open(index_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "survey", "id", "object_id", "file", "page"])
        for page_start in range(0, len(rows), args.per_page):
            page = page_start // args.per_page
            entries = []
            for offset, row in enumerate(rows[page_start:page_start + args.per_page]):
                index = args.start_index + page_start + offset
                # An alert that cannot be drawn keeps its row, with the reason, so the
                # index and the grids never silently drop one.
                try:
                    alerts = decode_message((args.real / row["file"]).read_bytes())
                    alert = next((a for a in alerts if str(a.candidate_id) == row["id"]), None)
                    if alert is None:
                        alert = f"no alert with id {row['id']} in {row['file']}"
                except (OSError, DecodeError) as error:
                    alert = f"did not decode: {error}"
                entries.append((index, row, alert))
                writer.writerow([index, row["survey"], row["id"], row["object_id"], row["file"], page])
            render_page(entries, args.out / f"{args.select}_{page:03d}.png")
    print(f"{len(rows)} alerts, {index_path}")


if __name__ == "__main__":
    main()
