"""The triplet simulator: each class is what it claims, and it is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from training.profiles import PROFILES, RUBIN, ZTF, get_profile
from training.simulate import (BLOB_SNR_RANGE, BOGUS_KINDS, KINDS, MARGIN, NOISE_SNR_RANGE, TRAIL_SNR_RANGE,
                               SimulatorConfig, filtered_snr, gaussian_blur, psf_match, simulate, simulate_triplet)

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


# ------------------------------------------------------------------ artifacts of real streams
def stamp_radius(t, profile, position):
    """Distance of every stamp pixel from ``position`` (canvas coordinates)."""
    y, x = np.mgrid[0:profile.stamp_size, 0:profile.stamp_size]
    return np.hypot(y - (position[0] - MARGIN), x - (position[1] - MARGIN))


def saturated_run(full, pixel, axis):
    """Length of the unbroken run of ``full`` pixels through ``pixel`` along ``axis``."""
    line = full[:, pixel[1]] if axis == 0 else full[pixel[0], :]
    start = end = pixel[axis]
    if not line[start]:
        return 0
    while start > 0 and line[start - 1]:
        start -= 1
    while end < len(line) - 1 and line[end + 1]:
        end += 1
    return end - start + 1


def sky_residual(t, profile, name):
    """What of the science or template canvas is not its sky and noiseless sky objects: its
    noise plus whatever artifact it holds (ADU, science zero point). NaN on sky objects, whose
    photon noise is not the sky's."""
    truth, gain = t.truth, profile.gain
    if name == "science":
        residual = truth["science_canvas"] - (truth["sky_science"] + truth["model_science"]) / gain
    else:
        residual = truth["template_canvas"] / truth["zero_point_ratio"] \
            - (truth["sky_template"] + truth["model_template"]) / gain
    on_objects = np.maximum(truth["model_science"], truth["model_template"]) > 0.5 * np.sqrt(truth["sky_science"])
    return np.where(on_objects, np.nan, residual)


def matched_snr(image, layer):
    """How strongly ``image`` holds ``layer``: its matched-filter SNR against the image's own noise."""
    finite = np.isfinite(image)
    values, weights = image[finite] - np.median(image[finite]), layer[finite]
    noise = 1.4826 * np.median(np.abs(values - np.median(values)))
    return float((values * weights).sum() / (noise * np.sqrt((weights**2).sum())))


@pytest.mark.parametrize("kind", ["star_ring", "star_dipole", "saturated_star", "ghost", "trail", "banding",
                                  "scattered_light"])
def test_artifact_kinds_are_bogus_and_deterministic_by_seed(kind):
    a = simulate_triplet(RUBIN, np.random.default_rng([5, 1]), kind)
    b = simulate_triplet(RUBIN, np.random.default_rng([5, 1]), kind)
    c = simulate_triplet(RUBIN, np.random.default_rng([5, 2]), kind)
    assert a.label == 0 and a.kind == kind
    for name in ("science", "template", "difference"):
        np.testing.assert_array_equal(a.images[name], b.images[name])
    assert not np.array_equal(np.nan_to_num(a.images["difference"]), np.nan_to_num(c.images["difference"]))


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_star_rings_are_a_core_in_a_ring_of_the_other_sign_on_a_bright_template_star(profile):
    checked = 0
    for t in draws("star_ring", profile=profile, n=40):
        truth = t.truth
        assert truth["halo_share_science"] != truth["halo_share_template"]
        # a bright star in the template, where the detection is
        star = centre_box(truth["model_template"], t).max()
        assert star > 50 * np.sqrt(truth["sky_template"])
        if truth["saturated"] or truth["template_canvas"].max() >= profile.saturation:
            continue  # a clipped core is `saturated_star`'s business
        r = stamp_radius(t, profile, truth["star_position"])
        # matched, core and halo have these widths; their difference changes sign at `zero`
        core_sigma = max(truth["sigma_science"], truth["sigma_template"])
        halo_sigma = np.hypot(truth["halo_wing"], core_sigma)
        a, b = core_sigma**2, halo_sigma**2
        zero = np.sqrt(2 * a * b * np.log(b / a) / (b - a))
        diff, noise = t.images["difference"], truth["pixel_noise_adu"]
        core, ring = diff[r < core_sigma], diff[(r > zero + 0.5 * core_sigma) & (r < zero + 1.5 * halo_sigma)]
        core, ring = core[np.isfinite(core)], ring[np.isfinite(ring)]  # some are cut at the CCD edge
        expected = np.sign(truth["halo_share_template"] - truth["halo_share_science"])
        core_snr = core.mean() / noise * np.sqrt(core.size)
        if abs(core_snr) < 50:
            continue  # too faint a star for its ring to stand out of the noise
        assert np.sign(core_snr) == expected
        assert np.sign(ring.mean()) == -expected and abs(ring.mean()) > 3 * noise / np.sqrt(ring.size)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_star_dipoles_are_sub_pixel_misregistrations_with_lobes_on_either_side(profile):
    for t in draws("star_dipole", profile=profile, n=20):
        truth = t.truth
        assert 0.1 <= truth["misregistration"] <= 0.5 and truth["psf_axis_ratio"] < 1.0
        assert centre_box(truth["model_template"], t).max() > 50 * np.sqrt(truth["sky_template"])
        if truth["saturated"] or truth["template_canvas"].max() >= profile.saturation:
            continue
        diff, noise = np.nan_to_num(t.images["difference"]), truth["pixel_noise_adu"]
        sigma = max(truth["sigma_science"], truth["sigma_template"])
        star_peak = truth["flux"] / profile.gain / (2 * np.pi * sigma**2)
        if star_peak * truth["misregistration"] / sigma < 20 * noise:
            continue  # too faint a star for its shift to stand out of the noise
        assert diff.max() > 5 * noise and diff.min() < -5 * noise
        # the science star is where the template's is not: the positive lobe lies opposite the shift
        near = stamp_radius(t, profile, truth["star_position"]) < 3 * sigma
        y, x = np.mgrid[0:profile.stamp_size, 0:profile.stamp_size]
        lobes = [np.where(near, np.clip(sign * diff, 0, None), 0.0) for sign in (1, -1)]
        positive, negative = (np.array([(w * y).sum(), (w * x).sum()]) / w.sum() for w in lobes)
        assert np.dot(negative - positive, truth["misregistration_vector"]) > 0


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_saturated_stars_have_clipped_cores_bleed_trails_and_masks(profile):
    masked = unmasked = 0
    for t in draws("saturated_star", profile=profile, n=20):
        truth = t.truth
        assert truth["saturated"] and truth["peak_over_saturation"] >= 2.0
        science = truth["science_canvas"]
        full = science >= profile.saturation
        assert np.nanmax(science) == profile.saturation  # clipped at the full well
        # the charge bled along the readout axis: the saturated region is longer along it (a star
        # just above the full well has little charge to spill)
        star = tuple(int(round(v)) for v in truth["star_position"])
        along, across = (saturated_run(full, star, axis) for axis in (truth["bleed_axis"], 1 - truth["bleed_axis"]))
        assert along >= 1 and across >= 1
        if truth["peak_over_saturation"] > 4:
            assert along > across
        star = tuple(v - MARGIN for v in star)
        if truth["masked"]:
            assert all(np.isnan(t.images[n][star]) for n in ("science", "template", "difference"))
            masked += 1
        else:
            assert t.images["science"][star] == np.float32(profile.saturation)
            unmasked += 1
    assert masked and unmasked


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_ghosts_are_large_faint_annuli_across_the_centre_in_one_image_only(profile):
    seen = set()
    for t in draws("ghost", profile=profile, n=20):
        truth = t.truth
        holder, other = ("science", "template") if truth["ghost_in"] == "science" else ("template", "science")
        seen.add(holder)
        layer = truth["artifact_science"] if holder == "science" else \
            truth["artifact_template"] / truth["zero_point_ratio"]
        assert not np.any(truth[f"artifact_{other}"])
        ghost = crop(layer, profile.stamp_size)
        # an annulus: bright in its band, dark in its hole and outside, larger than the PSF
        outer, inner, softness = truth["ghost_outer"], truth["ghost_inner"], truth["ghost_softness"]
        assert outer >= 0.4 * profile.stamp_size and inner < outer - 2 * softness
        assert softness >= truth["sigma_science"]
        peak = truth["ghost_brightness_adu"]
        r = stamp_radius(t, profile, truth["ghost_centre"])
        band = (r > inner + softness) & (r < outer - softness)
        assert band.any() and np.allclose(ghost[band], peak)
        assert np.all(ghost[r > outer + softness] == 0.0)
        assert np.all(ghost[r < inner - softness] <= truth["ghost_fill"] * peak + 1e-9)
        # the detection is on the band; faint per pixel
        assert centre_box(layer, t, half=0).item() == pytest.approx(peak)
        assert 0.5 <= peak / truth["pixel_noise_adu"] <= 4.0
        # in that image, not in the other
        assert abs(matched_snr(sky_residual(t, profile, other), layer)) < 4
        if peak > truth["pixel_noise_adu"]:
            assert matched_snr(sky_residual(t, profile, holder), layer) > 5
    assert seen == {"science", "template"}


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_trails_are_straight_streaks_across_the_stamp_in_the_science_only(profile):
    for t in draws("trail", profile=profile, n=15):
        truth = t.truth
        layer = truth["injected_science"]
        angle, (row, col) = truth["trail_angle"], truth["trail_point"]
        centre = truth["centre"]
        # through (within a pixel of) the detection
        assert abs(-(centre - col) * np.sin(angle) + (centre - row) * np.cos(angle)) <= 1.0 + 1e-9
        assert truth["trail_sigma"] >= truth["sigma_science"]
        # straight: every pixel above half its peak lies within its half width of the line
        size = profile.stamp_size
        stamp = crop(layer, size)
        y, x = np.mgrid[MARGIN:MARGIN + size, MARGIN:MARGIN + size]
        across = -(x - col) * np.sin(angle) + (y - row) * np.cos(angle)
        along = (x - col) * np.cos(angle) + (y - row) * np.sin(angle)
        bright = stamp > 0.5 * truth["amplitude_adu"]  # the profile peaks at the amplitude, on the line
        assert np.abs(across[bright]).max() <= np.sqrt(2 * np.log(2)) * truth["trail_sigma"] + 1e-6
        if truth["glint_period"] == 0:
            # and across the whole stamp: a chord through the centre is at least a side long
            assert np.ptp(along[bright]) >= size - 2
        # in the science, and not in the template
        assert not np.any(truth["artifact_template"])
        assert abs(matched_snr(sky_residual(t, profile, "template"), layer)) < 4
        assert matched_snr(sky_residual(t, profile, "science"), layer) > 4
        assert TRAIL_SNR_RANGE[0] - 0.1 <= truth["target_snr"] <= TRAIL_SNR_RANGE[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_glint_fraction_sets_how_many_trails_are_broken_into_glints(fraction):
    config = SimulatorConfig(glint_fraction=fraction)
    for i in range(12):
        truth = simulate_triplet(ZTF, np.random.default_rng([5, i]), "trail", config).truth
        assert (truth["glint_period"] > 0) == (fraction == 1.0)
        # along the line, a glinting trail falls to nothing between its glints; a continuous one never dips
        angle, (row, col) = truth["trail_angle"], truth["trail_point"]
        t = np.linspace(-12, 12, 97)
        on_line = truth["injected_science"][np.round(row + t * np.sin(angle)).astype(int),
                                            np.round(col + t * np.cos(angle)).astype(int)]
        dips = on_line.min() / on_line.max()
        assert dips < 0.05 if fraction == 1.0 else dips > 0.3


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_banding_is_constant_along_rows_or_columns_and_shows_in_the_difference(profile):
    seen = set()
    for t in draws("banding", profile=profile, n=20):
        truth = t.truth
        layer = truth["artifact_science"] if truth["banding"] == "science" else truth["artifact_template"]
        other = truth["artifact_template"] if truth["banding"] == "science" else truth["artifact_science"]
        assert not np.any(other)
        lines = layer if truth["banding_axis"] == "rows" else layer.T  # rows of `lines` are the bands
        b = truth["boundary"]
        for segment in (lines[:, :b], lines[:, b:]):  # constant along a line on each side of the boundary
            assert np.allclose(segment, segment[:, :1])
        banded = lines[:, :b] if truth["banded_side"] != "right" else lines[:, b:]
        assert np.std(banded[:, 0]) > 0  # and changing from line to line
        seen.add((truth["banding"], truth["banding_axis"]))
        if truth["banding"] == "science" and truth["banding_rms"] > 1.5 * truth["pixel_noise_adu"]:
            diff = difference_canvas(t, profile)
            diff = diff if truth["banding_axis"] == "rows" else diff.T
            part = diff[:, :b] if truth["banded_side"] != "right" else diff[:, b:]
            # line means vary far more along the bands' axis than across it
            assert np.var(np.median(part, axis=1)) > 2 * np.var(np.median(part, axis=0))
    assert {("science", "rows"), ("science", "columns")} <= seen and any(w == "template" for w, _ in seen)


@pytest.mark.parametrize("profile", [ZTF, RUBIN], ids=lambda p: p.name)
def test_scattered_light_is_smooth_large_scale_and_in_the_science_only(profile):
    for t in draws("scattered_light", profile=profile, n=15):
        truth = t.truth
        layer = truth["artifact_science"]
        assert not np.any(truth["artifact_template"])
        span = layer.max() - layer.min()
        assert span == pytest.approx(abs(truth["amplitude_adu"]))
        # smooth: its curvature from pixel to pixel is tiny against its range over the canvas
        laplacian = layer[2:, 1:-1] + layer[:-2, 1:-1] + layer[1:-1, 2:] + layer[1:-1, :-2] - 4 * layer[1:-1, 1:-1]
        assert np.abs(laplacian).max() < 0.02 * span
        # large-scale: it spans the stamp, not a PSF-sized spot
        stamp = crop(layer, profile.stamp_size)
        assert np.ptp(stamp) > 0.1 * span
        if np.ptp(stamp) > 10 * truth["pixel_noise_adu"]:
            # and it shows in the difference: medians over 7x7 blocks (robust to the residuals of
            # saturated field stars) follow it
            diff = t.images["difference"]
            blocks = [(slice(r, r + 7), slice(c, c + 7)) for r in range(0, 28, 7) for c in range(0, 28, 7)]
            blocks = [b for b in blocks if np.isfinite(diff[b]).any()]  # not beyond a CCD edge
            medians = [np.nanmedian(diff[b]) for b in blocks]
            assert np.corrcoef(medians, [stamp[b].mean() for b in blocks])[0, 1] > 0.8


def test_default_mixes_have_noise_peaks_and_the_artifacts_of_real_streams():
    from training.config import builtin_config, load_config
    from training.simulate import DEFAULT_BOGUS_WEIGHTS

    artifacts = ("noise", "star_ring", "star_dipole", "saturated_star", "ghost", "trail", "banding",
                 "scattered_light")
    for weights in [DEFAULT_BOGUS_WEIGHTS] + [load_config(builtin_config(s)).simulator.bogus_weights
                                              for s in ("ztf", "rubin")]:
        assert set(weights) == set(BOGUS_KINDS)
        assert all(weights[k] > 0 for k in artifacts)
