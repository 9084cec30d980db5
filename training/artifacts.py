"""Shapes of the optical and detector artifacts that real alert streams are full of.

Each function draws one noiseless layer on a square canvas of side ``canvas`` pixels
(row, column coordinates; the simulator places it and sets its amplitude):

* `annulus` — a pupil ghost or out-of-focus "donut": a large, soft-edged ring of low
  surface brightness, the image of the telescope pupil reflected off the optics;
* `trail` — a satellite, aircraft or meteor trail: a straight streak across the
  whole canvas, as wide as the PSF or wider (a defocused low-orbit satellite), either
  continuous or broken into glints;
* `banding` — readout patterns: offsets constant along rows (or columns), in bands a
  few pixels high, on one or both sides of an amplifier boundary, with a step across it;
* `scattered_light` — a smooth glow: the far halo of a bright star off the stamp, a
  broad diffuse patch, or a gradient;
* `bleed` — charge of saturated pixels that spills along the readout column.

They were drawn after looking at the stamps of real ZTF and Rubin alerts (the shared real
alerts): ghosts and trails there are faint and much larger than the stamp, banding sits
beside bright stars on one side of a boundary, bleeds leave saturated columns.
"""

from __future__ import annotations

import numpy as np


def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:canvas, 0:canvas]
    return y.astype(np.float64), x.astype(np.float64)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below -1, 1 above +1, a smooth ramp between (a soft edge)."""
    t = np.clip(0.5 * (x + 1.0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def annulus(canvas: int, row: float, col: float, outer: float, inner: float, softness: float,
            fill: float = 0.0) -> np.ndarray:
    """A ring between radii ``inner`` and ``outer`` centred at (row, col), peak 1.

    ``softness`` (pixels) is the width of its edges (the ghost is out of focus: no sharp
    rim); ``fill`` is the relative level inside the hole (0: a clean donut).
    """
    y, x = _grid(canvas)
    r = np.hypot(y - row, x - col)
    outside_hole = _smoothstep((r - inner) / softness)
    inside_disc = _smoothstep((outer - r) / softness)
    return inside_disc * (fill + (1.0 - fill) * outside_hole)


def trail(canvas: int, row: float, col: float, angle: float, sigma: float,
          glint_period: float = 0.0) -> np.ndarray:
    """A straight streak through (row, col) at position angle ``angle`` (radians), peak 1.

    Its cross-section is a Gaussian of width ``sigma`` (at least the PSF's); it runs off
    the canvas at both ends. With ``glint_period`` > 0 the brightness along it is
    modulated with that period (a tumbling satellite's glints), brightest at (row, col).
    """
    y, x = _grid(canvas)
    along = (x - col) * np.cos(angle) + (y - row) * np.sin(angle)
    across = -(x - col) * np.sin(angle) + (y - row) * np.cos(angle)
    layer = np.exp(-0.5 * (across / sigma) ** 2)
    if glint_period > 0:
        layer *= np.cos(np.pi * along / glint_period) ** 4
    return layer


def banding(canvas: int, rng: np.random.Generator, amplitude: float) -> tuple[np.ndarray, dict]:
    """A readout pattern: offsets constant along rows, in bands, with an amplifier step.

    The bands are 1-4 rows high with Gaussian offsets of rms ``amplitude``; with
    probability 1/2 they cover only one side of a vertical amplifier boundary (a bright
    star's crosstalk or an unstable amplifier), and the two sides differ by a step of up
    to ``amplitude``. Rows only: the caller rotates the layer for column banding.

    Returns
    -------
    layer : ndarray
    truth : dict
        ``boundary`` (first column of the right-hand amplifier) and ``banded_side``
        (``both``, ``left`` or ``right``).
    """
    offsets = np.empty(canvas)
    row = 0
    while row < canvas:
        height = int(rng.integers(1, 5))
        offsets[row:row + height] = rng.normal(0.0, amplitude)
        row += height
    boundary = int(rng.integers(canvas // 4, 3 * canvas // 4))
    side = str(rng.choice(["both", "left", "right"], p=[0.5, 0.25, 0.25]))
    layer = np.repeat(offsets[:, None], canvas, axis=1)
    if side == "left":
        layer[:, boundary:] = 0.0
    elif side == "right":
        layer[:, :boundary] = 0.0
    layer[:, boundary:] += rng.uniform(-1.0, 1.0) * amplitude
    return layer, {"boundary": boundary, "banded_side": side}


def scattered_light(canvas: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A smooth, large-scale glow over the canvas, scaled to a range of 1 over it.

    ``halo``: the power-law wing of a bright star 0.7-2 canvases away; ``glow``: a
    Gaussian patch half to one and a half canvases wide; ``gradient``: a plane.
    """
    y, x = _grid(canvas)
    centre = (canvas - 1) / 2.0
    flavour = str(rng.choice(["halo", "glow", "gradient"]))
    angle = rng.uniform(0, 2 * np.pi)
    if flavour == "halo":
        distance = rng.uniform(0.7, 2.0) * canvas
        r = np.hypot(y - centre - distance * np.sin(angle), x - centre - distance * np.cos(angle))
        layer = (1.0 + (r / (0.2 * canvas)) ** 2) ** -rng.uniform(1.0, 2.0)
    elif flavour == "glow":
        offset = rng.uniform(0.0, 0.5) * canvas
        width = rng.uniform(0.5, 1.5) * canvas
        r2 = (y - centre - offset * np.sin(angle)) ** 2 + (x - centre - offset * np.cos(angle)) ** 2
        layer = np.exp(-0.5 * r2 / width**2)
    else:
        layer = (x - centre) * np.cos(angle) + (y - centre) * np.sin(angle)
    layer = layer - layer.min()
    return layer / layer.max(), flavour


def bleed(image: np.ndarray, saturation: float, axis: int) -> np.ndarray:
    """Spill the charge above ``saturation`` along ``axis`` (0: columns bleed up and down).

    Each line's excess over the full well runs out of its saturated run in both
    directions, filling pixels to ``saturation`` until it is used up (charge is
    conserved up to the last partial pixel). Returns a new image, not yet clipped.
    """
    out = np.moveaxis(image.copy(), axis, 0)
    for line in np.flatnonzero((out > saturation).any(axis=0)):
        column = out[:, line]
        full = np.flatnonzero(column > saturation)
        extra = int((column[full] - saturation).sum() // saturation)
        low, high = full.min(), full.max()
        up, down = extra - extra // 2, extra // 2
        column[max(low - up, 0):low] = saturation
        column[high + 1:high + 1 + down] = saturation
    return np.moveaxis(out, 0, axis)
