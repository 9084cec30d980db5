"""Where the triplet and the no-difference-image models look: integrated gradients averaged
over the real and over the bogus alerts of the held-out real test split.

At most `PER_CLASS` alerts of each class are used. Each alert's |attribution| map is scaled to sum to 1 over its images, so that every alert
weighs the same; the means per class are drawn per image (template, science, difference),
and the share of the attribution each image holds is printed.

    PYTHONPATH=. python docs/make_mean_attributions.py ztf    # writes docs/mean_attributions_ztf.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from service.explain.gradients import integrated_gradients, load_graph, weights_path
from service.score.model import Scorer, models_dir
from training import real
from training.adapt import EVALUATION_THRESHOLD
from training.evaluate import held_out

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "real"
EYE_LABELS = Path(__file__).resolve().parents[1] / "training" / "labels" / "eye_labels.csv"
PER_CLASS = 60


def mean_maps(model: Path, alerts: list[real.RealAlert], steps: int) -> tuple[dict[int, np.ndarray], Scorer]:
    scorer = Scorer(model, device="cpu")
    stamps, kept, _ = real.stamps(alerts, scorer.contract)
    graph = load_graph(weights_path(scorer))
    maps = np.abs(integrated_gradients(graph, stamps, baseline="noise", steps=steps)[0])
    maps /= np.maximum(maps.sum(axis=(1, 2, 3), keepdims=True), 1e-12)
    labels = np.array([a.label for a in kept])
    return {label: maps[labels == label].mean(0) for label in (1, 0) if (labels == label).any()}, scorer


def main(survey: str, steps: int = 64) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    triplet, nodiff = models_dir() / survey, models_dir() / f"{survey}-nodiff"
    alerts, _ = real.read_alerts(real.alert_files(REAL_DATA / survey))
    real.assign_labels(alerts, [real.read_label_table(EYE_LABELS)], ["drb", "rb"] if survey == "ztf" else [],
                       (EVALUATION_THRESHOLD, EVALUATION_THRESHOLD))
    test = [a for a in real.by_split(alerts, held_out(triplet, None))["test"] if a.label is not None]
    # at most PER_CLASS of each class (the first by file name): the mean settles well before
    test = [a for label in (1, 0) for a in [a for a in test if a.label == label][:PER_CLASS]]
    fig, axes = plt.subplots(4, 3, figsize=(7.5, 10), squeeze=False)
    for row, (name, model) in enumerate((("triplet", triplet), ("no-diff", nodiff))):
        means, scorer = mean_maps(model, test, steps)
        for offset, (label, mean) in enumerate(sorted(means.items(), reverse=True)):
            r = 2 * row + offset
            shares = mean.sum(axis=(1, 2))
            print(f"{survey} {name} {'real' if label else 'bogus'}: " + ", ".join(
                f"{image} {share:.0%}" for image, share in zip(scorer.contract.raw_inputs, shares)))
            for col, image in enumerate(("template", "science", "difference")):
                ax = axes[r, col]
                ax.set_xticks([])
                ax.set_yticks([])
                if image in scorer.contract.raw_inputs:
                    i = scorer.contract.raw_inputs.index(image)
                    ax.imshow(mean[i], cmap="magma", vmin=0, vmax=mean.max(), origin="lower")
                    ax.set_title(f"{image} ({shares[i]:.0%})", fontsize=8)
                else:
                    ax.text(0.5, 0.5, "not an input", ha="center", va="center", fontsize=8)
                    ax.set_title(image, fontsize=8)
            axes[r, 0].set_ylabel(f"{name}\n{'real' if label else 'bogus'}", fontsize=9)
    fig.suptitle(f"{survey}: mean |integrated gradients| on the real test split", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(__file__).resolve().parent / f"mean_attributions_{survey}.png"
    fig.savefig(out, dpi=70)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
