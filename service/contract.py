"""The stamp contract: what a real-bogus model takes as input.

This module is the single definition shared by training and serving of

* which images a model sees (its *channels*) and in which order,
* the square stamp size the cutouts are cropped or padded to,
* the name of the per-stamp normalisation the exported graph applies, and
* how cutouts of any size become a model-ready array (`fit_stamp`, `assemble`).

The service feeds **raw pixel values** to the ONNX graph: masking of non-finite
pixels and per-stamp normalisation happen inside the graph (see
``training.model.StampNormaliser``, which implements `NORMALISATION`). Padding
uses NaN so that a stamp cut at the CCD edge and a stamp padded to the model
size are masked by the same rule.

Only numpy is imported here, so the service can use it without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

#: Images an alert carries, in the order surveys list them.
RAW_IMAGES: tuple[str, ...] = ("science", "template", "difference")

#: Channels computed inside the graph from raw images: each is its raw image in units of
#: that image's own noise (signal-to-noise). Deep-HiTS's fourth channel is the difference's.
#: Standardising keeps each image's shape but loses how bright it is; in units of noise,
#: the three images keep their brightness, so a model can tell a 1% residual of a bright
#: template star from a source that doubled.
DERIVED_CHANNELS: Mapping[str, str] = {"snr_difference": "difference", "snr_template": "template",
                                       "snr_science": "science"}

#: Derived channels measured from their image's median (its sky level) rather than from 0:
#: science and template cutouts carry the sky, a difference image does not.
SKY_SUBTRACTED: tuple[str, ...] = ("snr_template", "snr_science")

#: Every channel name a model may declare.
CHANNELS: tuple[str, ...] = RAW_IMAGES + tuple(DERIVED_CHANNELS)

#: The one normalisation the exported graph implements, by name (recorded in model cards):
#: non-finite pixels are masked; each channel of each stamp is standardised with the mean
#: and standard deviation of its unmasked pixels and compressed with asinh; masked
#: pixels are then set to `MASK_FILL` (0, the channel mean after standardisation).
#: ``snr_difference`` is divided by the difference's noise only (its zero stays zero);
#: ``snr_template`` and ``snr_science`` are their image minus its median, over its noise.
NORMALISATION = "masked-standardise-asinh/v1"

#: Value masked (non-finite or padded) pixels take after normalisation.
MASK_FILL = 0.0

#: Pixels at or beyond this magnitude are blank markers, not flux: ZTF cutouts mark pixels
#: with no data as -FLT_MAX (-3.4028235e38), which is finite and would otherwise dominate the
#: stamp's statistics. `fit_stamp` turns them into NaN so the graph masks them like NaN.
BLANK_LIMIT = 1e30

#: Smallest side, in pixels, of a cutout that is scored by default (`assemble`'s ``min_side``;
#: setting ``min_stamp_side``). Real cutouts are 30 (Rubin) to 63 (ZTF) pixels, and at least 32
#: when cut at a CCD edge; a stamp of a handful of pixels gives the normalisation nothing to
#: measure the noise on, and the model a confident score for nothing.
MIN_STAMP_SIDE = 8

#: Name of the ONNX graph's input and output.
ONNX_INPUT = "stamps"
ONNX_OUTPUT = "score"


class StampError(ValueError):
    """A stamp that cannot be turned into model input (wrong shape, nothing finite...).

    ``cutouts`` names the cutouts at fault (empty when unknown), so that a caller can tell
    an unusable difference image, which a model without one can still score, from the rest.
    """

    def __init__(self, message: str, cutouts: Sequence[str] = ()):
        super().__init__(message)
        self.cutouts = tuple(cutouts)


@dataclass(frozen=True)
class StampContract:
    """What one model expects.

    Parameters
    ----------
    channels : tuple of str
        Model channels in order, each one of `CHANNELS`.
    size : int
        Side of the square stamp, in pixels.
    normalisation : str
        Name of the in-graph normalisation; only `NORMALISATION` exists today.
    """

    channels: tuple[str, ...] = ("template", "science", "difference")
    size: int = 31
    normalisation: str = NORMALISATION
    mask_fill: float = field(default=MASK_FILL)

    def __post_init__(self) -> None:
        channels = tuple(self.channels)
        object.__setattr__(self, "channels", channels)
        if not channels:
            raise ValueError("channels: at least one channel is required; accepted: " + ", ".join(CHANNELS))
        unknown = [c for c in channels if c not in CHANNELS]
        if unknown:
            raise ValueError(f"channels: unknown {unknown}; accepted: {', '.join(CHANNELS)}")
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels: duplicates in {list(channels)}")
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size: must be an integer >= 8, got {self.size!r}")
        if self.normalisation != NORMALISATION:
            raise ValueError(f"normalisation: unknown {self.normalisation!r}; accepted: {NORMALISATION}")

    @property
    def raw_inputs(self) -> tuple[str, ...]:
        """Raw images the graph's input holds, in order: the declared raw channels,
        then any raw image a derived channel needs that was not declared."""
        raw = [c for c in self.channels if c in RAW_IMAGES]
        for derived in self.channels:
            source = DERIVED_CHANNELS.get(derived)
            if source is not None and source not in raw:
                raw.append(source)
        return tuple(raw)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one stamp as the graph takes it: (raw inputs, size, size)."""
        return (len(self.raw_inputs), self.size, self.size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["raw_inputs"] = list(self.raw_inputs)
        d["onnx_input"] = ONNX_INPUT
        d["onnx_output"] = ONNX_OUTPUT
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "StampContract":
        return cls(
            channels=tuple(d["channels"]),
            size=int(d["size"]),
            normalisation=d.get("normalisation", NORMALISATION),
            mask_fill=float(d.get("mask_fill", MASK_FILL)),
        )


def fit_stamp(image: np.ndarray, size: int, centre: Sequence[float] | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Centre-crop or NaN-pad one cutout to ``size x size`` around the source.

    Parameters
    ----------
    image : ndarray
        2-D cutout of any shape (rows, columns).
    size : int
        Side of the output stamp.
    centre : (row, col), optional
        Position of the source in ``image`` (0-based pixels). Defaults to the
        geometric centre, ``((rows - 1) / 2, (cols - 1) / 2)``, rounded down; a
        decoder that knows the cutout was truncated at a CCD edge passes the
        true position so that the source still lands on the stamp centre.
    out : ndarray, optional
        float32 ``(size, size)`` array to fill in place (e.g. a row of a batch buffer).

    Returns
    -------
    ndarray
        float32 array of shape (size, size); pixels outside ``image`` and blank
        markers (``|value| >= BLANK_LIMIT``) are NaN.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise StampError(f"a stamp must be a non-empty 2-D image, got shape {image.shape}")
    rows, cols = image.shape
    if centre is None:
        centre = ((rows - 1) // 2, (cols - 1) // 2)
    r0 = int(np.floor(centre[0] + 0.5)) - (size - 1) // 2
    c0 = int(np.floor(centre[1] + 0.5)) - (size - 1) // 2
    if out is None:
        out = np.empty((size, size), dtype=np.float32)
    src_r = slice(max(r0, 0), min(r0 + size, rows))
    src_c = slice(max(c0, 0), min(c0 + size, cols))
    if src_r.stop - src_r.start < size or src_c.stop - src_c.start < size:
        out.fill(np.nan)  # only stamps that need padding pay for the fill
    if src_r.start < src_r.stop and src_c.start < src_c.stop:
        out[src_r.start - r0 : src_r.stop - r0, src_c.start - c0 : src_c.stop - c0] = image[src_r, src_c]
    # Comparison with NaN is False, so NaN stays NaN; inf becomes NaN too (the graph masks both).
    out[np.abs(out) >= BLANK_LIMIT] = np.nan
    return out


def crop_around_source(images: Mapping[str, np.ndarray], centre: Sequence[float] | None,
                       side: int) -> tuple[dict[str, np.ndarray], tuple[float, float] | None]:
    """Cut cutouts larger than ``side`` down to ``side`` pixels around the source; returns (images, centre).

    `fit_stamp` of any size up to ``side`` gives the same stamp from the cropped images (with
    the returned centre) as from the originals: the crop keeps the window `fit_stamp` would
    take for ``side``, which holds every smaller window. Without a ``centre`` each image keeps
    its own geometric centre (the crop is symmetric around it); with one, every image is cut
    at the same offset and the centre shifted by it. Images no larger than ``side`` are kept
    as they are (no copy); cropped ones are copies, so the full image can be freed.
    """
    def large(image) -> bool:
        return image is not None and getattr(image, "ndim", 0) == 2 and max(image.shape) > side

    if not any(large(image) for image in images.values()):
        return dict(images), (None if centre is None else tuple(centre))
    cropped: dict[str, np.ndarray] = {}
    if centre is None:
        for name, image in images.items():
            if not large(image):
                cropped[name] = image
                continue
            rows, cols = image.shape
            start_r = (rows - 1) // 2 - (side - 1) // 2 if rows > side else 0
            start_c = (cols - 1) // 2 - (side - 1) // 2 if cols > side else 0
            cropped[name] = image[start_r : start_r + side, start_c : start_c + side].copy()
        return cropped, None
    # One offset for all: the low edge clips at 0 for every image alike, so one centre serves them all.
    r0 = max(int(np.floor(centre[0] + 0.5)) - (side - 1) // 2, 0)
    c0 = max(int(np.floor(centre[1] + 0.5)) - (side - 1) // 2, 0)
    for name, image in images.items():
        if image is None or getattr(image, "ndim", 0) != 2:
            cropped[name] = image
            continue
        part = image[r0 : r0 + side, c0 : c0 + side]
        if part.size == 0:
            # The model's window misses this image altogether (its stamp would be all NaN): keep
            # that outcome, and a shape no smaller than the image's for the size check.
            part = np.full((min(image.shape[0], side), min(image.shape[1], side)), np.nan, dtype=np.float32)
        cropped[name] = part.copy()
    return cropped, (centre[0] - r0, centre[1] - c0)


def assemble(
    images: Mapping[str, np.ndarray],
    contract: StampContract,
    centre: Sequence[float] | None = None,
    out: np.ndarray | None = None,
    min_side: int = MIN_STAMP_SIDE,
) -> np.ndarray:
    """Build one model input ``(len(raw_inputs), size, size)`` from named cutouts.

    Parameters
    ----------
    images : mapping of str to ndarray
        Cutouts by name (``science``, ``template``, ``difference``); extra ones are ignored.
    contract : StampContract
    centre : (row, col), optional
        Source position, as in `fit_stamp`; cutouts of one alert share it.
    out : ndarray, optional
        Preallocated float32 array to fill in place (a row of a batch buffer).
    min_side : int
        Smallest side of a cutout accepted (`MIN_STAMP_SIDE`).

    Raises
    ------
    StampError
        When a cutout the model needs is missing or degenerate: smaller than ``min_side``
        on a side, no finite pixel near the source (all masked), or constant there (every
        finite pixel the same value). A degenerate stamp holds nothing to tell real from
        bogus; scoring it would only give a confident number for nothing.
    """
    raw_inputs = contract.raw_inputs
    missing = [name for name in raw_inputs if name not in images or images[name] is None]
    if missing:
        raise StampError(f"missing cutout(s) {missing}; this model needs {list(raw_inputs)}", missing)
    for name in raw_inputs:
        shape = np.shape(images[name])
        if len(shape) == 2 and min(shape) < min_side:
            raise StampError(f"cutout {name!r} is {shape[0]}x{shape[1]} pixels; at least {min_side}x{min_side} "
                             "are needed to score it (min_stamp_side)", (name,))
    if out is None:
        out = np.empty(contract.input_shape, dtype=np.float32)
    finite = []
    for i, name in enumerate(raw_inputs):
        fit_stamp(images[name], contract.size, centre, out=out[i])
        finite.append(out[i][np.isfinite(out[i])])
        if not finite[i].size:
            raise StampError(f"cutout {name!r} has no finite pixel near the source (all masked)", (name,))
    for name, values in zip(raw_inputs, finite):
        if values.min() == values.max():
            raise StampError(f"cutout {name!r} is constant near the source (every pixel {float(values[0]):g}): "
                             "nothing to score", (name,))
    return out
