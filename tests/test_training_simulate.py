"""The triplet simulator: each class is what it claims, and it is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from training.profiles import PROFILES, RUBIN, ZTF, get_profile
from training.simulate import (BLOB_SNR_RANGE, BOGUS_KINDS, KINDS, MARGIN, NOISE_SNR_RANGE, SimulatorConfig,
                               filtered_snr, gaussian_blur, psf_match, simulate, simulate_triplet)

N_DRAWS = 25


def draws(kind, profile=ZTF, n=N_DRAWS, seed=11):
    return [simulate_triplet(profile, np.random.default_rng([seed, i]), kind) for i in range(n)]


def crop(canvas, size):
    return canvas[MARGIN:MARGIN + size, MARGIN:MARGIN + size]


def minor_axis_sigma(layer):
    """Square root of the smaller eigenvalue of the second-moment matrix of |layer|."""
    w = np.abs(layer)
    y, x = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    total = w.sum()
    cy, cx = (w * y).sum() / total, (w * x).sum() / total
    cov = np.array([[(w * (y - cy) ** 2).sum(), (w * (y - cy) * (x - cx)).sum()],
                    [(w * (y - cy) * (x - cx)).sum(), (w * (x - cx) ** 2).sum()]]) / total
    return float(np.sqrt(max(np.linalg.eigvalsh(cov)[0], 0.0)))


def test_profiles():
    assert set(PROFILES) == {"hits", "ztf", "rubin"}
    assert get_profile("hits").stamp_size == 21 and get_profile("hits").pixel_scale == 0.27
    assert ZTF.pixel_scale == 1.01 and RUBIN.pixel_scale == 0.2
    with pytest.raises(ValueError, match="accepted: hits, ztf, rubin"):
        get_profile("gaia")


def test_deterministic_by_seed():
    a, b, c = simulate(ZTF, 12, seed=3), simulate(ZTF, 12, seed=3), simulate(ZTF, 12, seed=4)
    np.testing.assert_array_equal(a["stamps"], b["stamps"])  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert not np.array_equal(np.nan_to_num(a["stamps"]), np.nan_to_num(c["stamps"]))
    assert a["stamps"].shape == (12, 3, ZTF.stamp_size, ZTF.stamp_size) and a["stamps"].dtype == np.float32
    assert list(a["channels"]) == ["science", "template", "difference"]


def test_labels_and_kind_mix():
    d = simulate(ZTF, 400, seed=5, config=SimulatorConfig(real_fraction=0.5))
    assert set(d["kinds"]) == set(KINDS)
    assert np.all(d["labels"][d["kinds"] == "point_source"] == 1)
    assert np.all(d["labels"][np.isin(d["kinds"], BOGUS_KINDS)] == 0)
    assert 0.4 < d["labels"].mean() < 0.6


@pytest.mark.parametrize("kind", KINDS)
def test_difference_is_science_minus_psf_matched_template(kind):
    """Never drawn on its own: recompute it from the science and template images."""
    for t in draws(kind, n=6):
        truth, gain = t.truth, ZTF.gain
        science = truth["science_canvas"] - truth["sky_science"] / gain
        template = (truth["template_canvas"] / truth["zero_point_ratio"] - truth["sky_template"] / gain) \
            * truth["scale_error"]
        expected, match = psf_match(science, template, truth["sigma_science"], truth["sigma_template"],
                                    truth["kernel_offset"])
        assert match == truth["match"]
        expected = crop(expected, ZTF.stamp_size)
        finite = np.isfinite(t.images["difference"])
        np.testing.assert_allclose(t.images["difference"][finite], expected[finite], rtol=1e-5, atol=1e-3)
        # the image that was convolved is the sharper one
        sharper = "template" if truth["sigma_template"] <= truth["sigma_science"] else "science"
        assert match["convolved"] == sharper


def test_psf_matching_cancels_a_static_star():
    canvas = 61
    from training.simulate import gaussian_source
    science = gaussian_source(canvas, 30.2, 29.7, 1e5, 2.0)
    template = gaussian_source(canvas, 30.2, 29.7, 1e5, 1.2)
    difference, match = psf_match(science, template, 2.0, 1.2)
    assert match["convolved"] == "template"
    assert np.abs(difference).max() < 1e-3 * science.max()
    # a wrong kernel leaves a residual
    bad, _ = psf_match(science, template, 2.0, 1.2, kernel_offset=0.8)
    assert np.abs(bad).max() > 0.05 * science.max()
    assert np.isclose(gaussian_blur(science, 1.0).sum(), science.sum())


def test_template_and_science_differ_in_psf_and_noise():
    blank = [t for t in draws("point_source", n=40) if not t.truth["on_host"]]
    assert all(t.truth["sigma_science"] != t.truth["sigma_template"] for t in blank)
    ratios = []
    for t in blank:
        sci = t.images["science"] / 1.0
        tmp = t.images["template"] / t.truth["zero_point_ratio"]
        edge = np.zeros_like(sci, dtype=bool)
        edge[:4], edge[-4:] = True, True
        edge &= np.isfinite(sci)
        ratios.append(np.std(tmp[edge]) / np.std(sci[edge]))
    # the template is a coadd: less noisy than a single exposure
    assert np.median(ratios) < 0.5


def test_cosmic_rays_are_sharper_than_the_psf_and_absent_from_the_template():
    for t in draws("cosmic_ray", n=40):
        cr = t.truth["artifact_science"]
        assert cr.max() > 0
        assert not np.any(t.truth["artifact_template"])  # nothing added to the template
        # where the ray is, the noiseless template has (almost) nothing of it
        where = cr > 0.05 * cr.max()
        assert np.all(t.truth["model_template"][where] < 0.01 * cr.max() * ZTF.gain + 1e-9) or t.truth["on_host"]
        # sharper than the science PSF along its narrow axis (a PSF has minor sigma == sigma)
        assert minor_axis_sigma(cr) < t.truth["sigma_science"]
        # and it shows in the difference at the centre
        c = ZTF.stamp_size // 2
        assert np.nanmax(np.abs(t.images["difference"][c - 3:c + 4, c - 3:c + 4])) > 3 * t.truth["pixel_noise_adu"]


def test_real_point_sources_have_the_science_psf_and_the_right_sign():
    for t in draws("point_source", n=60):
        truth = t.truth
        if truth["snr"] < 30 or truth["saturated"]:
            continue
        c = ZTF.stamp_size // 2
        core = np.nansum(t.images["difference"][c - 2:c + 3, c - 2:c + 3])
        assert np.sign(core) == (-1 if truth["negative"] else 1)
        # noiseless science layer is a PSF of the science width (minor == major == sigma_s)
        transient = truth["model_science"] - (truth["model_template"] if False else 0)
        if not truth["on_host"] and not truth["negative"]:
            assert minor_axis_sigma(crop(transient, ZTF.stamp_size)) == pytest.approx(truth["sigma_science"],
                                                                                      rel=0.15)


def test_dipoles_have_a_positive_and_a_negative_lobe():
    for t in draws("dipole", n=20):
        diff = t.images["difference"]
        noise = t.truth["pixel_noise_adu"]
        if t.truth["flux"] / ZTF.gain < 200 * noise:  # faint ones drown in noise
            continue
        assert np.nanmax(diff) > 5 * noise and np.nanmin(diff) < -5 * noise
        assert t.truth["misregistration"] >= 0.4


def test_bright_star_residuals_have_a_template_counterpart():
    for t in draws("bright_star", n=15):
        c = (ZTF.stamp_size + 2 * MARGIN) // 2
        assert t.truth["model_template"][c - 2:c + 3, c - 2:c + 3].max() > 0
        assert t.truth["kernel_offset"] != 0.0


def test_edge_stamps_have_nan_regions_in_all_images_but_not_at_the_centre():
    for t in draws("edge", profile=RUBIN, n=20):
        masks = [np.isnan(t.images[n]) for n in ("science", "template", "difference")]
        assert masks[0].any()
        assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[0], masks[2])
        c = RUBIN.stamp_size // 2
        assert not masks[0][c, c]
        assert np.array_equal(masks[0], t.truth["nan_mask"])
    # edges are not only bogus: some real stamps are cut at the CCD edge too
    d = simulate(ZTF, 300, seed=9)
    has_nan = np.isnan(d["stamps"]).any(axis=(1, 2, 3))
    assert has_nan[d["labels"] == 1].any()


def test_bad_pixels_columns_and_saturation():
    for t in draws("bad_column", n=10):
        layer = t.truth["artifact_science"] if t.truth["bad_column"] == "science" else t.truth["artifact_template"]
        cols = np.flatnonzero(np.abs(layer).sum(axis=0))
        assert 1 <= len(cols) <= 2 and (np.abs(layer[:, cols[0]]) > 0).sum() >= layer.shape[0] // 2
    for t in draws("bad_pixel", n=10):
        assert t.truth["bad_pixel"] in ("hot_science", "hot_template", "dead")
    for t in draws("bright_star", n=10) + draws("point_source", n=10):
        assert np.nanmax(t.images["science"]) <= ZTF.saturation


def difference_canvas(t, profile):
    """The difference on the whole canvas, recomputed from the science and template images."""
    truth, gain = t.truth, profile.gain
    science = truth["science_canvas"] - truth["sky_science"] / gain
    template = (truth["template_canvas"] / truth["zero_point_ratio"] - truth["sky_template"] / gain) \
        * truth["scale_error"]
    return psf_match(science, template, truth["sigma_science"], truth["sigma_template"], truth["kernel_offset"])[0]


def centre_snr(t, profile):
    """PSF-filtered SNR of the difference at the stamp centre, noise from the filtered map's MAD."""
    truth = t.truth
    c = int(truth["centre"])
    return float(filtered_snr(difference_canvas(t, profile), max(truth["sigma_science"],
                                                                 truth["sigma_template"]))["snr"][c, c])


def faint(t):
    """A twentieth of the science's background noise per pixel, in electrons."""
    return 0.05 * np.sqrt(t.truth["sky_science"])


def centre_box(layer, t, half=2):
    c = int(t.truth["centre"])
    return layer[c - half:c + half + 1, c - half:c + half + 1]


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_noise_fluctuations_are_threshold_level_peaks_with_no_source(profile):
    low, high = NOISE_SNR_RANGE
    snrs = []
    for t in draws("noise", profile=profile, n=30):
        assert t.label == 0 and t.truth["injected_flux"] == 0.0
        if not t.truth["on_host"]:
            # nothing in the sky at the detection, in either image (field stars' far wings are
            # far below the noise): no source was injected
            assert np.abs(centre_box(t.truth["model_science"], t)).max() < faint(t)
            assert np.abs(centre_box(t.truth["model_template"], t)).max() < faint(t)
        assert np.abs(centre_box(t.truth["artifact_template"], t)).max() == 0.0
        snr = centre_snr(t, profile)
        # the MAD noise of the final map differs a hair from that of the map before the peak was drawn
        assert low - 0.1 <= abs(snr) <= high + 0.1, snr
        assert np.sign(snr) == (-1 if t.truth["negative"] else 1)
        snrs.append(abs(snr))
    # threshold-level: a Gaussian tail, most peaks just above the low end
    assert np.median(snrs) < 0.5 * (low + high)


def test_noise_peaks_on_deep_smooth_templates():
    """Deep coadd templates (as Rubin's): the difference's noise is nearly all the science's,
    and a noise peak is still a threshold-level peak with nothing in the template."""
    import dataclasses

    deep = dataclasses.replace(RUBIN, template_depth=(50.0, 100.0))
    for t in draws("noise", profile=deep, n=10):
        assert t.truth["template_depth"] >= 50
        assert NOISE_SNR_RANGE[0] - 0.1 <= abs(centre_snr(t, deep)) <= NOISE_SNR_RANGE[1] + 0.1
        if not t.truth["on_host"]:
            assert np.abs(centre_box(t.truth["model_template"], t)).max() < faint(t)


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_blobs_are_not_psf_shaped_and_absent_from_the_template(profile):
    low, high = BLOB_SNR_RANGE
    for t in draws("blob", profile=profile, n=20):
        truth = t.truth
        assert t.label == 0 and truth["injected_flux"] == 0.0
        sigma = truth["sigma_science"]
        major, minor = truth["blob_major"], truth["blob_minor"]
        if truth["blob"] == "broad":
            assert minor >= 1.2 * sigma and major >= 2.0 * sigma
        else:
            assert major / minor >= 2.0
        if not truth["on_host"]:
            assert np.abs(centre_box(truth["model_template"], t)).max() < faint(t)
        assert low - 0.1 <= centre_snr(t, profile) <= high + 0.1


def test_faint_real_sources_are_psf_shaped_and_brighter_than_noise_peaks_on_average():
    config = SimulatorConfig(snr_range=(3.0, 8.0), host_fraction=0.0, negative_fraction=0.0)
    reals = [simulate_triplet(ZTF, np.random.default_rng([21, i]), "point_source", config) for i in range(40)]
    for t in reals:
        # the noiseless transient in the science image is the science PSF, whatever the SNR
        assert minor_axis_sigma(crop(t.truth["transient_science"], ZTF.stamp_size)) == \
            pytest.approx(t.truth["sigma_science"], rel=0.15)
    real_snr = np.mean([centre_snr(t, ZTF) for t in reals])
    noise_snr = np.mean([abs(centre_snr(t, ZTF)) for t in draws("noise", n=40)])
    assert real_snr > noise_snr + 1.0, (real_snr, noise_snr)


def test_fading_reals_have_a_template_star_and_noise_dips_do_not():
    """A negative PSF-shaped difference is real only when the template holds the star that faded."""
    config = SimulatorConfig(negative_fraction=1.0, host_fraction=0.0)
    for i in range(15):
        t = simulate_triplet(ZTF, np.random.default_rng([31, i]), "point_source", config)
        assert t.label == 1 and t.truth["negative"]
        assert centre_box(t.truth["model_template"], t).max() > faint(t)
    dips = [t for t in draws("noise", n=60) if t.truth["negative"] and not t.truth["on_host"]]
    assert dips, "some noise peaks are negative"
    for t in dips:
        assert centre_box(t.truth["model_template"], t).max() < faint(t)
