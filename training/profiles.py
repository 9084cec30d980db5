"""Survey profiles: the instrument and site numbers the triplet simulator needs.

A profile says how a survey's cutouts look in raw units: pixel scale, the range of
seeing, sky level, read noise, gain, saturation, how deep the template (reference
coadd) is compared with a single science exposure, and the stamp size its model
uses. The numbers are typical values from the surveys' public descriptions, not
calibrations: they only have to put the simulated stamps in the right regime
(how many pixels a PSF spans, how noisy a template is, when a star saturates).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SurveyProfile:
    """How one survey's triplets look.

    Parameters
    ----------
    name : str
        Profile name (``hits``, ``ztf``, ``rubin``).
    pixel_scale : float
        Arcseconds per pixel.
    seeing : (float, float)
        Range of the PSF FWHM in arcseconds (science and template are drawn from it).
    sky : (float, float)
        Range of the sky level per pixel, in electrons, of a science exposure.
    read_noise : float
        Read noise per pixel, electrons.
    gain : float
        Electrons per ADU (stamps are written in ADU).
    saturation : float
        Level, in ADU, above which a pixel is clipped (non-linear / full well).
    template_depth : (float, float)
        Range of the number of exposures stacked into the template; its noise is
        lower by the square root of it.
    stamp_size : int
        Side of the model stamp (the contract size).
    """

    name: str
    pixel_scale: float
    seeing: tuple[float, float]
    sky: tuple[float, float]
    read_noise: float
    gain: float
    saturation: float
    template_depth: tuple[float, float]
    stamp_size: int

    def fwhm_pixels(self, seeing_arcsec: float) -> float:
        """PSF FWHM in pixels for a seeing in arcseconds."""
        return seeing_arcsec / self.pixel_scale

    def to_dict(self) -> dict:
        return asdict(self)


#: HiTS / DECam as in Deep-HiTS (Cabrera-Vives et al. 2017): 0.27"/px, 21x21 stamps.
HITS = SurveyProfile(name="hits", pixel_scale=0.27, seeing=(0.8, 1.6), sky=(300.0, 3000.0),
                     read_noise=7.0, gain=4.0, saturation=30000.0, template_depth=(1.0, 3.0),
                     stamp_size=21)

#: ZTF: 1.01"/px, ~2" seeing (1.5-3"), 63x63 cutouts centre-cropped to 31x31.
ZTF = SurveyProfile(name="ztf", pixel_scale=1.01, seeing=(1.5, 3.0), sky=(100.0, 1500.0),
                    read_noise=8.0, gain=6.2, saturation=30000.0, template_depth=(15.0, 40.0),
                    stamp_size=31)

#: Rubin LSST: 0.2"/px, ~0.7" seeing (0.5-1.1"), 30x30 to 54x54 cutouts -> 29x29 so that
#: the smallest real cutout (30x30) needs no NaN padding.
RUBIN = SurveyProfile(name="rubin", pixel_scale=0.2, seeing=(0.5, 1.1), sky=(200.0, 2500.0),
                      read_noise=6.0, gain=1.6, saturation=60000.0, template_depth=(5.0, 20.0),
                      stamp_size=29)

PROFILES: dict[str, SurveyProfile] = {p.name: p for p in (HITS, ZTF, RUBIN)}


def get_profile(name: str) -> SurveyProfile:
    """The built-in profile ``name``; raises ValueError naming the accepted ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"survey: unknown profile {name!r}; accepted: {', '.join(PROFILES)}") from None
