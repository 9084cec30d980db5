"""A simulator of realistic (science, template, difference) triplets, real and bogus.

Every stamp is drawn the way a difference-imaging pipeline produces it:

1. a static scene (blank sky, a host galaxy, field stars) is observed twice, as a
   deep *template* (a coadd: lower noise) and a single *science* exposure, each with
   its own seeing (Gaussian PSF), sky level, photometric zero point, Poisson and read
   noise, and saturation;
2. the sharper of the two images is convolved to the PSF of the broader one
   (`psf_match`), the template is scaled to the science zero point, skies are removed,
   and the *difference* is science minus matched template. It is never drawn on its own.

Real (label 1): a point source with the science PSF at the stamp centre, SNR from ~3 to
saturation, on blank sky or on a host galaxy, brightening (positive difference) or
fading (negative difference).

Bogus (label 0), each at the stamp centre, where a pipeline would have detected it:

* ``cosmic_ray`` — charge deposited in the science exposure only: single pixels, small
  clusters or tracks, sharper than the PSF, with no counterpart in the template;
* ``bad_pixel`` — hot pixels (science or template) and dead pixels;
* ``bad_column`` — a column (or part of one) offset in the science or template;
* ``dipole`` — a static star or galaxy nucleus subtracted with a misregistration
  of 0.4-2 pixels: a positive and a negative lobe;
* ``bright_star`` — a bright, often saturated, star subtracted with a wrong PSF-matching
  kernel and zero point: rings and a saturated core;
* ``edge`` — a stamp cut at the CCD edge (NaN beyond it) whose detection is the
  amplifier glow along that edge, with no source;
* ``noise`` — the commonest bogus of real streams: a detection on a noise peak, with no
  source at all. The science noise is drawn *conditioned* on the difference's
  PSF-filtered signal-to-noise at the centre being a threshold-level peak (3 to 5,
  distributed like a Gaussian tail, mostly near 3; a fifth of them negative). Conditioning
  white noise on its matched-filter value adds the conditional mean, a PSF-shaped bump,
  to an otherwise independent noise field (`_noise_peak`): a noise peak at SNR 4
  and a real source seen at SNR 4 look alike, which is the truth, so a model can only be
  *calibrated* there (the share of each sets its score), not certain. What separates them
  on average is the amplitude (real sources reach far above 5), and, for negative peaks,
  the template: a real fading source must be in the template, a noise dip is not;
* ``blob`` — a cosmetic / correlated-noise feature of the science exposure that is not
  PSF-shaped: broader than the PSF (ghosts, scattered light, background residuals) or
  elongated (faint trails, correlated-noise ridges), at a filtered SNR of 5 to 30 (fainter
  than that, no shape can be told from noise: those are the ``noise`` kind's business),
  with no template counterpart.

The artifact families that dominate real streams (seen on the stamps of real ZTF and
Rubin alerts; shapes in `training.artifacts`), each at the stamp centre:

* ``star_ring`` — a bright star whose PSF has wings (a core plus a halo, as a Moffat
  profile has) that differ between science and template: no Gaussian matching kernel
  can match both, so the difference keeps a core and a ring of the opposite sign (a
  positive core in a negative ring, or a "doughnut": a negative core in a positive ring);
* ``star_dipole`` — a very bright star misregistered by a fraction of a pixel
  (0.1-0.5), with a slightly elliptical science PSF: a strong, asymmetric dipole;
* ``saturated_star`` — a star far above the full well, with diffraction spikes: a
  clipped core, charge bled along the readout axis in science and template, and, in
  half of them, the saturated pixels masked (NaN, the stamp centre included) as ZTF does;
* ``ghost`` — a pupil ghost: a large (0.8 to 3 stamps across), soft, low-surface-
  brightness annulus whose band crosses the centre, in the science (or, for a quarter,
  the template) only;
* ``trail`` — a satellite or aircraft trail: a straight streak across the whole stamp
  through the centre, PSF-wide or up to three times wider, continuous or glinting, in
  the science only;
* ``banding`` — a readout pattern in the science (or, for a quarter, the template):
  offsets constant along rows or columns in bands of 1-4 lines, on one or both sides of
  an amplifier boundary with a step across it, often beside a bright star;
* ``scattered_light`` — a smooth glow in the science exposure (a bright star's far
  halo, a diffuse patch, a gradient), positive or, where the background was
  over-subtracted, negative.

Stamps cut at the CCD edge are not only bogus: a fraction of every class has a NaN
region (like truncated ZTF cutouts), so that "has NaN" alone never means bogus.
Everything is deterministic: sample ``i`` of a data set with seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, independent of the other samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from service.contract import RAW_IMAGES
from training import artifacts
from training.profiles import SurveyProfile

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

REAL_KINDS = ("point_source",)
BOGUS_KINDS = ("cosmic_ray", "bad_pixel", "bad_column", "dipole", "bright_star", "edge", "noise", "blob",
               "star_ring", "star_dipole", "saturated_star", "ghost", "trail", "banding", "scattered_light")
KINDS = REAL_KINDS + BOGUS_KINDS

#: Default share of each bogus kind among bogus stamps: the detector classics, the
#: threshold-level noise peaks that are the commonest bogus of any stream, and the
#: bright-star residuals, ghosts, trails, banding and scattered light of real alerts.
DEFAULT_BOGUS_WEIGHTS: dict[str, float] = {
    "cosmic_ray": 0.12, "bad_pixel": 0.07, "bad_column": 0.06, "dipole": 0.08, "bright_star": 0.06,
    "edge": 0.06, "noise": 0.12, "blob": 0.04, "star_ring": 0.07, "star_dipole": 0.07,
    "saturated_star": 0.05, "ghost": 0.05, "trail": 0.05, "banding": 0.05, "scattered_light": 0.05,
}
# A noise peak at SNR 3-5 and a real source seen at SNR 3-5 are the same image (see
# `_noise_peak`): every noise peak in the mix costs accuracy on faint simulated reals, and
# the reverse (measured for the 1.0.0 models: Rubin pilots, 48k stamps, noise 0.05 + blob
# 0.05 gave test accuracy 0.966, 0.01 + 0.03 gave 0.979). Real streams are full of them,
# so the default mix has them anyway: accuracy on real alerts comes before the synthetic one.

#: PSF-filtered difference SNR of a ``noise`` peak: a Gaussian tail truncated to this range.
NOISE_SNR_RANGE = (3.0, 5.0)
#: PSF-filtered difference SNR of a ``blob``, drawn log-uniformly.
BLOB_SNR_RANGE = (5.0, 30.0)
#: Peak surface brightness of a ``ghost``, in units of the science's pixel noise, log-uniform:
#: ghosts are faint per pixel and seen by their size.
GHOST_BRIGHTNESS_RANGE = (0.5, 4.0)
#: PSF-filtered difference SNR at the centre of a ``trail``, log-uniform.
TRAIL_SNR_RANGE = (4.0, 150.0)
#: Kinds whose amplitude is set by the difference's PSF-filtered SNR at the centre.
TARGETED_KINDS = ("noise", "blob", "trail")

#: Margin, in pixels, of the canvas around the stamp, so that the periodic FFT
#: convolution of `psf_match` never wraps signal into the stamp.
MARGIN = 10


@dataclass(frozen=True)
class SimulatorConfig:
    """Knobs of the simulator (the ``[simulator]`` table of a training config).

    Parameters
    ----------
    real_fraction : float
        Share of real stamps.
    snr_range : (float, float)
        SNR of real point sources in the difference, drawn log-uniformly.
    host_fraction : float
        Share of real sources on a host galaxy.
    negative_fraction : float
        Share of real sources that fade (negative difference).
    edge_fraction : float
        Share of non-``edge`` stamps (real or bogus) that are cut at the CCD edge anyway.
    glint_fraction : float
        Share of ``trail`` stamps whose trail is broken into glints (a tumbling satellite).
    bogus_weights : mapping
        Relative frequency of each bogus kind.
    """

    real_fraction: float = 0.5
    snr_range: tuple[float, float] = (3.0, 5000.0)
    host_fraction: float = 0.4
    negative_fraction: float = 0.25
    edge_fraction: float = 0.06
    glint_fraction: float = 0.25
    bogus_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_BOGUS_WEIGHTS))

    def __post_init__(self) -> None:
        unknown = set(self.bogus_weights) - set(BOGUS_KINDS)
        if unknown:
            raise ValueError(f"simulator.bogus_weights: unknown kind(s) {sorted(unknown)}; "
                             f"accepted: {', '.join(BOGUS_KINDS)}")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ValueError(f"simulator.real_fraction: must be in [0, 1], got {self.real_fraction}")
        if not 0.0 <= self.glint_fraction <= 1.0:
            raise ValueError(f"simulator.glint_fraction: must be in [0, 1], got {self.glint_fraction}")
        if not 0 < self.snr_range[0] < self.snr_range[1]:
            raise ValueError(f"simulator.snr_range: must be [low, high] with 0 < low < high, got {self.snr_range}")


@dataclass
class Triplet:
    """One simulated detection.

    Attributes
    ----------
    images : dict of str to ndarray
        ``science``, ``template``, ``difference`` (ADU, float32, size x size; NaN off the CCD).
    label : int
        1 real, 0 bogus.
    kind : str
        One of `KINDS`.
    truth : dict
        What was drawn (PSF sigmas, fluxes, match parameters, noiseless layers on
        the canvas...) for tests and plots.
    """

    images: dict[str, np.ndarray]
    label: int
    kind: str
    truth: dict


# --------------------------------------------------------------------------- rendering
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:canvas, 0:canvas]
    return y.astype(np.float64), x.astype(np.float64)


def gaussian_source(canvas: int, row: float, col: float, flux: float, sigma: float,
                    q: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """A (possibly elliptical) Gaussian of total ``flux`` centred at (row, col).

    ``q`` is the axis ratio, ``angle`` the position angle of the major axis (radians).
    Normalised on the pixel grid, so that the pixels sum to ``flux`` even when the PSF
    is barely sampled (ZTF's ~2-pixel FWHM).
    """
    y, x = _grid(canvas)
    dy, dx = y - row, x - col
    c, s = np.cos(angle), np.sin(angle)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    profile = np.exp(-0.5 * ((u / sigma) ** 2 + (v / (sigma * q)) ** 2))
    total = profile.sum()
    return profile * (flux / total) if total > 0 else profile


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Convolve ``image`` with a unit-sum Gaussian of width ``sigma`` pixels (FFT, periodic)."""
    if sigma <= 0:
        return image.copy()
    rows, cols = image.shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape)


def psf_match(science: np.ndarray, template: np.ndarray, sigma_science: float, sigma_template: float,
              kernel_offset: float = 0.0) -> tuple[np.ndarray, dict]:
    """Difference = science - template after matching the sharper one to the broader PSF.

    Both inputs are sky-subtracted and on the science zero point. The kernel is the
    Gaussian of width ``sqrt(broad^2 - sharp^2)`` (plus ``kernel_offset``, 0 for a good
    subtraction; a badly fitted kernel otherwise) applied to the sharper image.

    Returns
    -------
    difference : ndarray
    match : dict
        ``convolved`` (``template`` or ``science``) and ``kernel_sigma``.
    """
    kernel = max(float(np.sqrt(abs(sigma_science**2 - sigma_template**2))) + kernel_offset, 0.0)
    if sigma_template <= sigma_science:
        return science - gaussian_blur(template, kernel), {"convolved": "template", "kernel_sigma": kernel}
    return gaussian_blur(science, kernel) - template, {"convolved": "science", "kernel_sigma": kernel}


def flux_for_snr(snr: float, sigma: float, background_variance: float) -> float:
    """Total flux (electrons) of a PSF source detected at ``snr`` over a background of
    ``background_variance`` electrons^2 per pixel (noise-equivalent area 4 pi sigma^2)."""
    v = 4.0 * np.pi * sigma**2 * background_variance
    return 0.5 * (snr**2 + np.sqrt(snr**4 + 4.0 * snr**2 * v))


# --------------------------------------------------------------------------- one triplet
class _Scene:
    """Noiseless layers of one draw, in science electrons on the canvas."""

    def __init__(self, canvas: int):
        self.canvas = canvas
        self.static_science = np.zeros((canvas, canvas))   # static sky objects seen with the science PSF
        self.static_template = np.zeros((canvas, canvas))  # the same objects seen with the template PSF
        self.transient_science = np.zeros((canvas, canvas))
        self.transient_template = np.zeros((canvas, canvas))
        self.artifact_science = np.zeros((canvas, canvas))   # ADU, added after noise (detector effects)
        self.artifact_template = np.zeros((canvas, canvas))  # ADU, template zero point
        self.dead_science = np.zeros((canvas, canvas), dtype=bool)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def simulate_triplet(profile: SurveyProfile, rng: np.random.Generator, kind: str,
                     config: SimulatorConfig | None = None) -> Triplet:
    """Draw one triplet of ``kind`` (one of `KINDS`) for ``profile``."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown {kind!r}; accepted: {', '.join(KINDS)}")
    config = config or SimulatorConfig()
    size = profile.stamp_size
    canvas = size + 2 * MARGIN
    centre = (canvas - 1) / 2.0
    scene = _Scene(canvas)

    # --- observing conditions: template and science differ in PSF, sky, depth, zero point
    sigma_s = profile.fwhm_pixels(rng.uniform(*profile.seeing)) / FWHM_PER_SIGMA
    sigma_t = profile.fwhm_pixels(rng.uniform(*profile.seeing)) / FWHM_PER_SIGMA
    sky_s = rng.uniform(*profile.sky)
    sky_t = rng.uniform(*profile.sky)
    depth = rng.uniform(*profile.template_depth)
    zero_point_ratio = _log_uniform(rng, 0.5, 2.0)  # template ADU per science ADU
    background_var = sky_s + profile.read_noise**2
    pixel_noise_adu = np.sqrt(background_var) / profile.gain

    # Static field: a host galaxy (for some reals, and some bogus) and field stars away from the centre.
    on_host = kind == "point_source" and rng.random() < config.host_fraction or \
        kind in ("bad_pixel", "cosmic_ray", "dipole", "noise", "blob") and rng.random() < 0.2
    if on_host:
        _add_galaxy(scene, rng, centre, sigma_s, sigma_t, background_var, profile)
    for _ in range(rng.poisson(0.7)):
        r, c = rng.uniform(0, canvas - 1, size=2)
        if np.hypot(r - centre, c - centre) < 5 * max(sigma_s, sigma_t, 1.0):
            continue  # keep field stars off the detection
        flux = flux_for_snr(_log_uniform(rng, 5, 3000), sigma_s, background_var)
        scene.static_science += gaussian_source(canvas, r, c, flux, sigma_s)
        scene.static_template += gaussian_source(canvas, r, c, flux, sigma_t)

    truth: dict = {"sigma_science": sigma_s, "sigma_template": sigma_t, "sky_science": sky_s,
                   "sky_template": sky_t, "template_depth": depth, "zero_point_ratio": zero_point_ratio,
                   "pixel_noise_adu": pixel_noise_adu, "centre": centre, "on_host": on_host}
    kernel_offset, template_shift, scale_error = 0.0, (0.0, 0.0), 1.0

    if kind == "point_source":
        snr = _log_uniform(rng, *config.snr_range)
        flux = flux_for_snr(snr, sigma_s, background_var)
        dr, dc = rng.uniform(-0.5, 0.5, size=2)
        negative = rng.random() < config.negative_fraction
        # Variable sources: part of the flux is also in the template; a fading one is brighter there.
        quiescent = flux * (rng.uniform(0.0, 2.0) if rng.random() < 0.3 else 0.0)
        f_sci, f_tmp = (quiescent + flux, quiescent) if not negative else (quiescent, quiescent + flux)
        scene.transient_science += gaussian_source(canvas, centre + dr, centre + dc, f_sci, sigma_s)
        scene.transient_template += gaussian_source(canvas, centre + dr, centre + dc, f_tmp, sigma_t)
        template_shift = tuple(rng.normal(0.0, 0.03, size=2))  # a good astrometric registration
        scale_error = 1.0 + rng.normal(0.0, 0.005)
        truth.update(snr=snr, flux=flux, negative=negative, offset=(dr, dc))
    elif kind == "cosmic_ray":
        _add_cosmic_ray(scene, rng, centre, pixel_noise_adu)
    elif kind == "bad_pixel":
        _add_bad_pixel(scene, rng, centre, pixel_noise_adu, zero_point_ratio, truth)
    elif kind == "bad_column":
        _add_bad_column(scene, rng, centre, pixel_noise_adu, zero_point_ratio, truth)
    elif kind == "dipole":
        flux = flux_for_snr(_log_uniform(rng, 15, 3000), sigma_s, background_var)
        dr, dc = rng.uniform(-0.5, 0.5, size=2)
        _add_static_star(scene, canvas, centre + dr, centre + dc, flux, sigma_s, sigma_t)
        shift = rng.uniform(0.4, 2.0)
        angle = rng.uniform(0, 2 * np.pi)
        template_shift = (shift * np.sin(angle), shift * np.cos(angle))
        truth.update(flux=flux, misregistration=shift)
    elif kind == "bright_star":
        flux = flux_for_snr(_log_uniform(rng, 300, 20000), sigma_s, background_var)
        dr, dc = rng.uniform(-1.0, 1.0, size=2)
        _add_static_star(scene, canvas, centre + dr, centre + dc, flux, sigma_s, sigma_t)
        # A badly fitted matching kernel (too wide by 0.3-0.8 sigma, or too narrow when the
        # true kernel allows it): a ring around a core in the difference, never a clean PSF.
        true_kernel = np.sqrt(abs(sigma_s**2 - sigma_t**2))
        error = rng.uniform(0.3, 0.8) * min(sigma_s, sigma_t)
        kernel_offset = -error if (true_kernel > 1.5 * error and rng.random() < 0.5) else error
        scale_error = 1.0 + rng.uniform(-0.08, 0.08)
        template_shift = tuple(rng.normal(0.0, 0.15, size=2))
        truth.update(flux=flux)
    elif kind == "star_ring":
        flux = flux_for_snr(_log_uniform(rng, 300, 10000), sigma_s, background_var)
        dr, dc = rng.uniform(-0.5, 0.5, size=2)
        # A good registration (lobes, not a dipole), drawn into the template star itself: a Fourier
        # shift of a bright, barely sampled star rings, which real templates do not.
        misregistration = tuple(rng.normal(0.0, 0.03, size=2))
        _add_star_with_halo(scene, rng, centre + dr, centre + dc, flux, sigma_s, sigma_t, misregistration, truth)
        # Kernel and scaling are fitted on stars like this one and nearly right; the wings the
        # kernel cannot match make the ring.
        kernel_offset = rng.normal(0.0, 0.03) * min(sigma_s, sigma_t)
        scale_error = 1.0 + rng.normal(0.0, 0.005)
        truth.update(flux=flux, misregistration=float(np.hypot(*misregistration)),
                     star_position=(centre + dr, centre + dc))
    elif kind == "star_dipole":
        flux = flux_for_snr(_log_uniform(rng, 300, 10000), sigma_s, background_var)
        dr, dc = rng.uniform(-0.5, 0.5, size=2)
        # A slightly elliptical science PSF (guiding, optics) against a round template one: the
        # two lobes differ, as real bright-star dipoles' do.
        q, pa = rng.uniform(0.85, 0.97), rng.uniform(0, np.pi)
        scene.static_science += gaussian_source(canvas, centre + dr, centre + dc, flux, sigma_s, q, pa)
        shift = rng.uniform(0.1, 0.5)
        angle = rng.uniform(0, 2 * np.pi)
        # misregistered in the template star itself, not by a Fourier shift (see `star_ring`)
        scene.static_template += gaussian_source(canvas, centre + dr + shift * np.sin(angle),
                                                 centre + dc + shift * np.cos(angle), flux, sigma_t)
        scale_error = 1.0 + rng.normal(0.0, 0.01)
        truth.update(flux=flux, misregistration=shift, psf_axis_ratio=q, star_position=(centre + dr, centre + dc),
                     misregistration_vector=(shift * np.sin(angle), shift * np.cos(angle)))
    elif kind == "saturated_star":
        _add_saturated_star(scene, rng, centre, sigma_s, sigma_t, profile, truth)
        scale_error = 1.0 + rng.normal(0.0, 0.03)
    elif kind == "ghost":
        ghost = _ghost(rng, canvas, centre, sigma_s, pixel_noise_adu, truth)
        # Mostly the science exposure's; a template coadd keeps the ghosts of its exposures too
        # (real Rubin templates show their arcs), a negative ghost in the difference.
        if rng.random() < 0.75:
            scene.artifact_science += ghost
            truth["ghost_in"] = "science"
        else:
            scene.artifact_template += ghost * zero_point_ratio
            truth["ghost_in"] = "template"
    elif kind == "banding":
        _add_banding(scene, rng, centre, sigma_s, sigma_t, background_var, pixel_noise_adu, zero_point_ratio,
                     truth)
    elif kind == "scattered_light":
        layer, flavour = artifacts.scattered_light(canvas, rng)
        amplitude = _log_uniform(rng, 1.0, 30.0) * pixel_noise_adu * (1.0 if rng.random() < 0.75 else -1.0)
        scene.artifact_science += amplitude * layer
        truth.update(scattered_light=flavour, amplitude_adu=float(amplitude))
    elif kind == "edge":
        pass  # the glow is added once the edge is placed, below
    # `TARGETED_KINDS` are placed once the difference is known, below: their amplitude is
    # set by the difference's PSF-filtered SNR at the centre.

    # --- place a CCD edge (NaN beyond it): always for `edge`, sometimes for the others
    nan_mask = np.zeros((size, size), dtype=bool)
    if kind == "edge" or rng.random() < config.edge_fraction:
        side = int(rng.integers(4))
        depth_px = int(rng.integers(2, size // 2 - 2))  # never reaches the centre pixel
        nan_mask[:, :depth_px] = True
        nan_mask = np.rot90(nan_mask, side).copy()
        truth.update(edge_side=side, edge_depth=depth_px)
        if kind == "edge":
            _add_edge_glow(scene, rng, nan_mask, pixel_noise_adu)

    # --- observe: science exposure
    science_e = sky_s + scene.static_science + scene.transient_science
    science_e = rng.poisson(science_e).astype(np.float64) + rng.normal(0.0, profile.read_noise, science_e.shape)
    science = science_e / profile.gain + scene.artifact_science
    science[scene.dead_science] = rng.uniform(0.0, 0.05) * sky_s / profile.gain
    if kind == "saturated_star":
        science = artifacts.bleed(science, profile.saturation, truth["bleed_axis"])
    saturated = science >= profile.saturation
    science = np.minimum(science, profile.saturation)

    # --- template: a coadd of `depth` exposures, own PSF, own zero point, misregistered by `template_shift`
    static_t = scene.static_template + scene.transient_template
    if template_shift != (0.0, 0.0):
        static_t = _shift(static_t, template_shift)
    template_e = sky_t + static_t
    template_e = template_e + rng.normal(0.0, 1.0, template_e.shape) * np.sqrt(
        np.maximum(template_e + profile.read_noise**2, 0.0) / depth)
    template = template_e / profile.gain * zero_point_ratio + scene.artifact_template
    if kind == "saturated_star":
        template = artifacts.bleed(template, profile.saturation, truth["bleed_axis"])
        if truth["masked"]:  # the pipeline masks saturated pixels and their neighbours in all three
            masked = _dilate(saturated | (template >= profile.saturation), 1 + int(max(sigma_s, sigma_t)))
            nan_mask |= masked[MARGIN:MARGIN + size, MARGIN:MARGIN + size]
    template = np.minimum(template, profile.saturation)

    # --- difference: skies off, template to the science zero point, PSF-matched, subtracted
    science_sub = science - sky_s / profile.gain
    template_sub = (template / zero_point_ratio - sky_t / profile.gain) * scale_error
    difference, match = psf_match(science_sub, template_sub, sigma_s, sigma_t, kernel_offset)
    if kind in TARGETED_KINDS:
        if kind == "trail":
            bump = _trail(rng, canvas, centre, sigma_s, truth, config.glint_fraction)
        elif kind == "blob":
            bump = _blob(rng, canvas, centre, sigma_s, truth)
        else:
            bump = _noise_peak(rng, canvas, centre, sigma_s, truth)
        target = truth["target_snr"]
        # Everything is linear: find the amplitude that puts the centre's filtered SNR at `target`.
        unit_difference, _ = psf_match(bump, np.zeros_like(bump), sigma_s, sigma_t, kernel_offset)
        sigma_d = max(sigma_s, sigma_t)
        c = int(centre)
        before = filtered_snr(difference, sigma_d)
        unit_filtered = gaussian_blur(unit_difference, sigma_d)
        noise_f = before["noise"]
        # The robust noise of the map moves a little once a peak is in it: a few fixed-point
        # steps make the *final* stamp's filtered SNR the target. A bright trail covers enough
        # of the stamp to inflate that estimate: its SNR is in units of the noise without it
        # (a pipeline's variance plane).
        for _ in range(3 if kind in ("noise", "blob") else 1):
            amplitude = (target * noise_f - before["filtered"][c, c]) / unit_filtered[c, c]
            after = before["filtered"] + amplitude * unit_filtered
            noise_f = 1.4826 * float(np.median(np.abs(after - np.median(after))))
        science = science + amplitude * bump
        science_sub = science - sky_s / profile.gain
        difference, match = psf_match(science_sub, template_sub, sigma_s, sigma_t, kernel_offset)
        truth.update(amplitude_adu=float(amplitude), snr_before=float(before["snr"][c, c]),
                     noise_before=before["noise"], injected_science=amplitude * bump,
                     filtered_snr=float(filtered_snr(difference, sigma_d)["snr"][c, c]))
    truth.update(match=match, kernel_offset=kernel_offset, scale_error=scale_error,
                 template_shift=template_shift, saturated=bool(saturated[MARGIN:-MARGIN, MARGIN:-MARGIN].any()),
                 artifact_science=scene.artifact_science, artifact_template=scene.artifact_template,
                 model_template=scene.static_template + scene.transient_template,
                 model_science=scene.static_science + scene.transient_science,
                 transient_science=scene.transient_science,
                 science_canvas=science, template_canvas=template)

    crop = (slice(MARGIN, MARGIN + size),) * 2
    images = {"science": science[crop], "template": template[crop], "difference": difference[crop]}
    for name in images:
        stamp = images[name].astype(np.float32)
        stamp[nan_mask] = np.nan
        images[name] = stamp
    truth["nan_mask"] = nan_mask
    return Triplet(images=images, label=int(kind in REAL_KINDS), kind=kind, truth=truth)


def filtered_snr(difference: np.ndarray, sigma: float, noise: float | None = None) -> dict:
    """The difference filtered with a Gaussian PSF of width ``sigma`` (a detection pipeline's
    matched filter), and that map in units of its own noise.

    ``noise`` defaults to 1.4826 x the median absolute deviation of the filtered map over
    the canvas (robust to the few sources on it).

    Returns
    -------
    dict
        ``filtered`` (the map), ``noise`` (its noise) and ``snr`` (their ratio).
    """
    filtered = gaussian_blur(difference, sigma)
    if noise is None:
        noise = 1.4826 * float(np.median(np.abs(filtered - np.median(filtered))))
    return {"filtered": filtered, "noise": float(noise), "snr": filtered / noise}


def _noise_peak(rng, canvas, centre, sigma_s, truth) -> np.ndarray:
    """Shape of the conditional mean of science noise given a matched-filter peak at the centre.

    Conditioning white noise on its PSF-filtered value adds a multiple of the filter, the
    science PSF, to an independent noise field: that is the *noise* itself, not a source
    (``model_science`` holds nothing here). The target SNR follows the Gaussian tail that
    noise peaks above a detection threshold follow, truncated to `NOISE_SNR_RANGE`.
    """
    low, high = NOISE_SNR_RANGE
    while True:  # exp(-s^2 / 2) tail: rejection from an exponential of rate `low` (proposal >= target)
        s = low + rng.exponential(1.0 / low)
        if s <= high and rng.random() < np.exp(-0.5 * (s - low) ** 2):
            break
    negative = rng.random() < 0.2
    dr, dc = rng.uniform(-0.5, 0.5, size=2)
    truth.update(target_snr=-s if negative else s, injected_flux=0.0, negative=negative, offset=(dr, dc))
    return gaussian_source(canvas, centre + dr, centre + dc, 1.0, sigma_s)


def _blob(rng, canvas, centre, sigma_s, truth) -> np.ndarray:
    """A unit-flux feature of the science exposure that is not PSF-shaped (broad or elongated)."""
    shape = str(rng.choice(["broad", "elongated"]))
    if shape == "broad":
        major = rng.uniform(2.0, 4.0) * sigma_s
        q = rng.uniform(0.6, 1.0)
    else:
        major = rng.uniform(2.5, 6.0) * sigma_s
        q = rng.uniform(0.7, 1.0) * sigma_s / major  # about a PSF wide, several long
    dr, dc = rng.uniform(-1.0, 1.0, size=2)
    s = _log_uniform(rng, *BLOB_SNR_RANGE)
    truth.update(target_snr=s, injected_flux=0.0, blob=shape, blob_major=float(major), blob_minor=float(major * q))
    return gaussian_source(canvas, centre + dr, centre + dc, 1.0, major, q, rng.uniform(0, np.pi))


def _ghost(rng, canvas, centre, sigma_s, noise_adu, truth) -> np.ndarray:
    """A pupil ghost (ADU) whose band crosses the centre: 0.8-3 stamps across, soft-edged."""
    size = canvas - 2 * MARGIN
    outer = _log_uniform(rng, 0.4, 1.5) * size
    softness = max(sigma_s, 0.06 * outer)
    inner = max(min(rng.uniform(0.5, 0.8) * outer, outer - 4 * softness), 0.0)
    fill = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, 0.3)
    distance = rng.uniform(inner + softness, outer - softness)
    angle = rng.uniform(0, 2 * np.pi)
    row, col = centre + distance * np.sin(angle), centre + distance * np.cos(angle)
    brightness = _log_uniform(rng, *GHOST_BRIGHTNESS_RANGE) * noise_adu
    truth.update(ghost_centre=(row, col), ghost_outer=float(outer), ghost_inner=float(inner),
                 ghost_softness=float(softness), ghost_fill=float(fill), ghost_brightness_adu=float(brightness))
    return brightness * artifacts.annulus(canvas, row, col, outer, inner, softness, fill)


def _trail(rng, canvas, centre, sigma_s, truth, glint_fraction: float) -> np.ndarray:
    """A streak through (within a pixel of) the centre, PSF-wide or up to 3x wider, glinting for
    ``glint_fraction`` of them."""
    width = sigma_s * (1.0 if rng.random() < 0.5 else rng.uniform(1.0, 3.0))
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-1.0, 1.0)
    row, col = centre + offset * np.cos(angle), centre - offset * np.sin(angle)
    period = rng.uniform(4.0, 12.0) * width if rng.random() < glint_fraction else 0.0
    s = _log_uniform(rng, *TRAIL_SNR_RANGE)
    truth.update(target_snr=s, injected_flux=0.0, trail_angle=float(angle), trail_sigma=float(width),
                 trail_point=(row, col), glint_period=float(period))
    return artifacts.trail(canvas, row, col, angle, width, period)


def _add_star_with_halo(scene: _Scene, rng, row, col, flux, sigma_s, sigma_t, misregistration, truth) -> None:
    """A star whose PSF is a core plus a halo (a Moffat-like wing): the halo is a wing 2-3.5
    cores wide seen through each image's seeing, and holds a share of the flux that differs by
    5-15 points between science and template (the wings change with the seeing, the optics,
    the focus); the template's star is off by ``misregistration``.

    The Gaussian kernel that matches the cores matches the halos' widths too, not their
    shares: the residual is the share difference times (core - halo), a core of the sign of
    (template share - science share) in a ring of the other.
    """
    canvas = scene.canvas
    wing = rng.uniform(2.0, 3.5) * max(sigma_s, sigma_t)
    template_share = rng.uniform(0.03, 0.2)
    science_share = template_share + rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.15)
    if science_share < 0.0:
        science_share = template_share + (template_share - science_share)
    # a slightly elliptical science core: the lumpy, clover-leaf inside of real rings
    q, pa = rng.uniform(0.9, 1.0), rng.uniform(0, np.pi)
    for share, layer, sigma, (r, c), core_q in ((science_share, scene.static_science, sigma_s, (row, col), q),
                                                (template_share, scene.static_template, sigma_t,
                                                 (row + misregistration[0], col + misregistration[1]), 1.0)):
        # same peak as a round core (axes sigma / sqrt(q), sigma * sqrt(q)): a clover leaf, no excess
        layer += gaussian_source(canvas, r, c, flux * (1 - share), sigma / np.sqrt(core_q), core_q, pa)
        layer += gaussian_source(canvas, r, c, flux * share, np.hypot(wing, sigma))
    truth.update(halo_share_science=float(science_share), halo_share_template=float(template_share),
                 halo_wing=float(wing), psf_axis_ratio=q)


def _add_saturated_star(scene: _Scene, rng, centre, sigma_s, sigma_t, profile, truth) -> None:
    """A star 2-10x above the full well at its peak, within 2.5 pixels of the centre, with
    diffraction spikes along the rows and columns (in both images: they are the telescope's)."""
    canvas = scene.canvas
    peak_over_saturation = _log_uniform(rng, 2.0, 10.0)
    flux = peak_over_saturation * profile.saturation * profile.gain * 2 * np.pi * sigma_s**2
    row, col = centre + rng.uniform(-2.5, 2.5, size=2)
    dr, dc = rng.normal(0.0, 0.1, size=2)  # the template's misregistration, drawn into its star
    spike_flux = _log_uniform(rng, 0.003, 0.03) * flux
    spike_length = rng.uniform(4.0, 12.0)
    for layer, sigma, (r, c) in ((scene.static_science, sigma_s, (row, col)),
                                 (scene.static_template, sigma_t, (row + dr, col + dc))):
        layer += gaussian_source(canvas, r, c, flux, sigma)
        for angle in (0.0, np.pi / 2):
            layer += gaussian_source(canvas, r, c, spike_flux, spike_length * sigma, 1.0 / spike_length, angle)
    truth.update(flux=flux, peak_over_saturation=peak_over_saturation, star_position=(row, col),
                 bleed_axis=int(rng.integers(2)), masked=bool(rng.random() < 0.5))


def _add_banding(scene: _Scene, rng, centre, sigma_s, sigma_t, background_var, noise_adu, zero_point_ratio,
                 truth) -> None:
    """A readout pattern along rows or columns, in the science (3/4) or the template, half of
    the time beside a bright star (whose readout often triggers it) that subtracts cleanly."""
    canvas = scene.canvas
    amplitude = _log_uniform(rng, 0.5, 4.0) * noise_adu
    layer, pattern = artifacts.banding(canvas, rng, amplitude)
    axis = "rows" if rng.random() < 0.5 else "columns"
    if axis == "columns":
        layer = layer.T
    where = "science" if rng.random() < 0.75 else "template"
    if where == "science":
        scene.artifact_science += layer
    else:
        scene.artifact_template += layer * zero_point_ratio
    if rng.random() < 0.5:
        row, col = centre + rng.uniform(-6.0, 6.0, size=2)
        flux = flux_for_snr(_log_uniform(rng, 100, 5000), sigma_s, background_var)
        _add_static_star(scene, canvas, row, col, flux, sigma_s, sigma_t)
    truth.update(banding=where, banding_axis=axis, banding_rms=float(amplitude), **pattern)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by ``radius`` pixels (a square structuring element)."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def _shift(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Sub-pixel translation (Fourier shift theorem; the canvas margin absorbs the wrap)."""
    rows, cols = image.shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    phase = np.exp(-2j * np.pi * (fy * shift[0] + fx * shift[1]))
    return np.fft.irfft2(np.fft.rfft2(image) * phase, s=image.shape)


def _add_static_star(scene: _Scene, canvas: int, row: float, col: float, flux: float,
                     sigma_s: float, sigma_t: float) -> None:
    scene.static_science += gaussian_source(canvas, row, col, flux, sigma_s)
    scene.static_template += gaussian_source(canvas, row, col, flux, sigma_t)


def _add_galaxy(scene: _Scene, rng, centre, sigma_s, sigma_t, background_var, profile) -> None:
    """A bulge + disc galaxy (elliptical Gaussians, so PSF convolution is exact) near the centre."""
    canvas = scene.canvas
    size_px = profile.fwhm_pixels(rng.uniform(1.0, 4.0))  # half-light scale, arcsec -> pixels
    offset = rng.uniform(0, 1.5) * size_px
    angle = rng.uniform(0, 2 * np.pi)
    row, col = centre + offset * np.sin(angle), centre + offset * np.cos(angle)
    q, pa = rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
    flux = flux_for_snr(_log_uniform(rng, 30, 3000), size_px, background_var)
    bulge = rng.uniform(0.1, 0.5)
    for frac, scale in ((bulge, 0.4 * size_px), (1 - bulge, size_px)):
        for layer, sigma in ((scene.static_science, sigma_s), (scene.static_template, sigma_t)):
            # Convolving an elliptical Gaussian with a round one: add variances on both axes.
            major = np.sqrt(scale**2 + sigma**2)
            minor = np.sqrt((scale * q) ** 2 + sigma**2)
            layer += gaussian_source(canvas, row, col, flux * frac, major, minor / major, pa)


def _add_cosmic_ray(scene: _Scene, rng, centre, noise_adu) -> None:
    """Charge in the science exposure only, not convolved with any PSF."""
    canvas = scene.canvas
    amplitude = _log_uniform(rng, 8, 3000) * noise_adu
    shape = rng.choice(["pixel", "cluster", "track"], p=[0.35, 0.3, 0.35])
    r0, c0 = int(round(centre + rng.integers(-1, 2))), int(round(centre + rng.integers(-1, 2)))
    layer = np.zeros((canvas, canvas))
    if shape == "pixel":
        layer[r0, c0] = amplitude
    elif shape == "cluster":
        layer[r0, c0] = amplitude
        for _ in range(int(rng.integers(1, 4))):
            dr, dc = rng.integers(-1, 2, size=2)
            layer[r0 + dr, c0 + dc] += amplitude * rng.uniform(0.2, 0.8)
    else:
        length = rng.uniform(3, 10)
        angle = rng.uniform(0, np.pi)
        for t in np.linspace(-length / 2, length / 2, int(4 * length)):
            r, c = r0 + t * np.sin(angle), c0 + t * np.cos(angle)
            ri, ci = int(np.floor(r)), int(np.floor(c))
            fr, fc = r - ri, c - ci
            # bilinear deposit: a 1-pixel-wide track
            for rr, cc, w in ((ri, ci, (1 - fr) * (1 - fc)), (ri + 1, ci, fr * (1 - fc)),
                              (ri, ci + 1, (1 - fr) * fc), (ri + 1, ci + 1, fr * fc)):
                layer[rr, cc] += w * amplitude / 4.0 * rng.uniform(0.6, 1.4)
    scene.artifact_science += layer


def _add_bad_pixel(scene: _Scene, rng, centre, noise_adu, zero_point_ratio, truth) -> None:
    r0, c0 = int(centre + rng.integers(-1, 2)), int(centre + rng.integers(-1, 2))
    flavour = rng.choice(["hot_science", "hot_template", "dead"], p=[0.5, 0.25, 0.25])
    amplitude = _log_uniform(rng, 8, 3000) * noise_adu
    pixels = [(r0, c0)]
    if rng.random() < 0.3:  # a pair of neighbours, as hot pixels often come
        dr, dc = [(0, 1), (1, 0)][int(rng.integers(2))]
        pixels.append((r0 + dr, c0 + dc))
    for r, c in pixels:
        if flavour == "hot_science":
            scene.artifact_science[r, c] += amplitude
        elif flavour == "hot_template":
            scene.artifact_template[r, c] += amplitude * zero_point_ratio
        else:
            scene.dead_science[r, c] = True
    truth["bad_pixel"] = str(flavour)


def _add_bad_column(scene: _Scene, rng, centre, noise_adu, zero_point_ratio, truth) -> None:
    canvas = scene.canvas
    col = int(centre + rng.integers(-1, 2))
    length = int(rng.integers(canvas // 2, canvas + 1))
    start = int(rng.integers(0, canvas - length + 1))
    amplitude = _log_uniform(rng, 4, 500) * noise_adu * rng.choice([-1.0, 1.0])
    width = 1 if rng.random() < 0.8 else 2
    if rng.random() < 0.75:
        scene.artifact_science[start:start + length, col:col + width] += amplitude
        truth["bad_column"] = "science"
    else:
        scene.artifact_template[start:start + length, col:col + width] += amplitude * zero_point_ratio
        truth["bad_column"] = "template"


def _add_edge_glow(scene: _Scene, rng, nan_mask: np.ndarray, noise_adu) -> None:
    """Amplifier glow / bleed along the CCD edge, in the science exposure only."""
    size = nan_mask.shape[0]
    inside = ~nan_mask
    # distance (pixels) of each inside pixel from the NaN region, along the cut direction
    rows_nan = nan_mask.all(axis=1)
    cols_nan = nan_mask.all(axis=0)
    r, c = np.mgrid[0:size, 0:size]
    if cols_nan.any():
        edge_cols = np.flatnonzero(cols_nan)
        boundary = edge_cols.max() + 1 if edge_cols.min() == 0 else edge_cols.min() - 1
        distance = np.abs(c - boundary)
    else:
        edge_rows = np.flatnonzero(rows_nan)
        boundary = edge_rows.max() + 1 if edge_rows.min() == 0 else edge_rows.min() - 1
        distance = np.abs(r - boundary)
    amplitude = _log_uniform(rng, 5, 500) * noise_adu
    scale = rng.uniform(0.8, 4.0)
    glow = np.where(inside, amplitude * np.exp(-distance / scale), 0.0)
    scene.artifact_science[MARGIN:MARGIN + size, MARGIN:MARGIN + size] += glow


# --------------------------------------------------------------------------- data sets
def draw_kinds(n: int, seed: int, config: SimulatorConfig) -> np.ndarray:
    """The kind of each of ``n`` samples (deterministic by ``seed``)."""
    rng = np.random.default_rng([seed, 2**31 - 1])
    weights = np.array([config.bogus_weights.get(k, 0.0) for k in BOGUS_KINDS], dtype=float)
    if weights.sum() <= 0:
        raise ValueError("simulator.bogus_weights: at least one weight must be > 0")
    probabilities = np.concatenate([[config.real_fraction], (1 - config.real_fraction) * weights / weights.sum()])
    return rng.choice(np.array(KINDS), size=n, p=probabilities)


def _simulate_range(profile: SurveyProfile, seed: int, kinds: np.ndarray, start: int,
                    config: SimulatorConfig) -> np.ndarray:
    """Stamps ``start .. start + len(kinds)`` of a data set (a worker's share)."""
    size = profile.stamp_size
    stamps = np.empty((len(kinds), len(RAW_IMAGES), size, size), dtype=np.float32)
    for k, kind in enumerate(kinds):
        triplet = simulate_triplet(profile, np.random.default_rng([seed, start + k]), str(kind), config)
        for j, name in enumerate(RAW_IMAGES):
            stamps[k, j] = triplet.images[name]
    return stamps


def simulate(profile: SurveyProfile, n: int, seed: int, config: SimulatorConfig | None = None,
             progress: bool = False, workers: int = 1) -> dict[str, np.ndarray]:
    """Simulate ``n`` triplets, in ``workers`` processes (the result does not depend on it).

    Returns
    -------
    dict
        ``stamps`` float32 ``[n, 3, size, size]`` with images in `RAW_IMAGES` order
        (``channels`` says so), ``labels`` int64 ``[n]``, ``kinds`` str ``[n]``.
    """
    config = config or SimulatorConfig()
    kinds = draw_kinds(n, seed, config)
    labels = np.isin(kinds, REAL_KINDS).astype(np.int64)
    block = 2000
    starts = list(range(0, n, block))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"simulating {profile.name}", unit="stamp", leave=False)
    parts = []
    if workers > 1 and n > block:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_simulate_range, profile, seed, kinds[s:s + block], s, config) for s in starts]
            for future in futures:
                parts.append(future.result())
                if bar is not None:
                    bar.update(len(parts[-1]))
    else:
        for s in starts:
            parts.append(_simulate_range(profile, seed, kinds[s:s + block], s, config))
            if bar is not None:
                bar.update(len(parts[-1]))
    if bar is not None:
        bar.close()
    size = profile.stamp_size
    stamps = np.concatenate(parts) if parts else np.empty((0, len(RAW_IMAGES), size, size), np.float32)
    return {"stamps": stamps, "labels": labels, "kinds": kinds.astype(str), "channels": np.array(RAW_IMAGES)}
