"""Draw `docs/artifacts_real_vs_simulated.png`: real bogus alerts beside the simulator's kinds.

Each row is one artifact family: a real alert of the shared real set (left: science,
template, difference, as the model sees them, centre-cropped to its stamp size) and a
draw of the simulator kind meant to look like it (right). Run from the repository root,
with the shared real alerts beside it::

    python docs/make_artifact_grid.py [../shared/real]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.decode.alerts import decode_message  # noqa: E402
from service.contract import fit_stamp  # noqa: E402
from training.profiles import get_profile  # noqa: E402
from training.simulate import simulate_triplet  # noqa: E402

#: (simulator kind, real alert file under the shared real folder, seed of the simulated draw)
ROWS = [
    ("star_ring", "rubin/396895612567600.avro", 2),
    ("star_dipole", "rubin/396950876717163.avro", 0),
    ("saturated_star", "ztf/697252382215010000.avro", 0),
    ("ghost", "rubin/396895612567699.avro", 2),
    ("trail", "rubin/396895612567642.avro", 0),
    ("banding", "rubin/396895612567654.avro", 2),
    ("scattered_light", "ztf/2481130162315015006.avro", 2),
    ("noise", "rubin/396895411241031.avro", 0),
]
IMAGES = ("science", "template", "difference")
OUTPUT = Path(__file__).parent / "artifacts_real_vs_simulated.png"


def asinh_stretch(image: np.ndarray) -> np.ndarray:
    """Median-subtracted, in units of 3 robust sigmas, asinh-compressed; NaN shown as the median."""
    finite = image[np.isfinite(image)]
    median = np.median(finite)
    mad = 1.4826 * np.median(np.abs(finite - median)) + 1e-9
    return np.arcsinh((np.where(np.isfinite(image), image, median) - median) / (3 * mad))


def show(axes, images: dict, title: str) -> None:
    for ax, name in zip(axes, IMAGES):
        stretched = asinh_stretch(images[name].astype(float))
        top = np.percentile(np.abs(stretched), 99.5)
        ax.imshow(stretched, cmap="gray", origin="lower", vmin=-top if name == "difference" else -2, vmax=top)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(title, fontsize=6)


def main(real_folder: str = "../shared/real") -> None:
    fig, axes = plt.subplots(len(ROWS), 6, figsize=(6.0, 1.05 * len(ROWS)))
    for row, (kind, file, seed) in enumerate(ROWS):
        alert = decode_message(Path(real_folder, file).read_bytes())[0]
        profile = get_profile(alert.survey)
        real = {n: fit_stamp(alert.images[n], profile.stamp_size, alert.centre) for n in IMAGES}
        show(axes[row, :3], real, f"real {alert.survey}")
        simulated = simulate_triplet(profile, np.random.default_rng([seed, 0]), kind).images
        show(axes[row, 3:], simulated, kind)
    for col, name in enumerate(IMAGES * 2):
        axes[0, col].set_title(("real " if col < 3 else "sim. ") + name[:4], fontsize=6)
    fig.tight_layout(pad=0.2, h_pad=0.2, w_pad=0.1)
    fig.savefig(OUTPUT, dpi=72)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main(*sys.argv[1:])
