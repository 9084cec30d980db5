"""The stamp contract: channel declarations, crop/pad around the source, assembly."""

import numpy as np
import pytest

from service.contract import (CHANNELS, NORMALISATION, StampContract, StampError, assemble, fit_stamp)


def test_raw_inputs_follow_declared_order_and_add_sources_of_derived_channels():
    assert StampContract(("template", "science", "difference")).raw_inputs == ("template", "science", "difference")
    assert StampContract(("difference", "science")).raw_inputs == ("difference", "science")
    assert StampContract(("template", "science", "snr_difference")).raw_inputs == ("template", "science", "difference")
    assert StampContract(("template", "science")).input_shape == (2, 31, 31)
    assert StampContract(("snr_science", "difference", "snr_template")).raw_inputs == ("difference", "science", "template")


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": ()}, "at least one"),
    ({"channels": ("science", "bogus")}, "unknown"),
    ({"channels": ("science", "science")}, "duplicates"),
    ({"size": 4}, "size"),
    ({"normalisation": "minmax"}, "normalisation"),
])
def test_bad_contracts_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StampContract(**kwargs)


def test_contract_round_trips_through_its_dict():
    contract = StampContract(("template", "science", "snr_difference"), size=21)
    d = contract.to_dict()
    assert d["normalisation"] == NORMALISATION and d["raw_inputs"] == ["template", "science", "difference"]
    assert StampContract.from_dict(d) == contract
    assert set(contract.channels) <= set(CHANNELS)


def test_fit_stamp_centre_crops_odd_cutouts_onto_the_centre_pixel():
    image = np.arange(63 * 63, dtype=np.float32).reshape(63, 63)
    out = fit_stamp(image, 31)
    assert out.shape == (31, 31) and out.dtype == np.float32
    assert out[15, 15] == image[31, 31]
    np.testing.assert_array_equal(out, image[16:47, 16:47])


def test_fit_stamp_pads_small_cutouts_with_nan_on_both_sides():
    image = np.ones((29, 29), dtype=np.float32)
    out = fit_stamp(image, 31)
    assert np.isnan(out[0]).all() and np.isnan(out[-1]).all() and np.isnan(out[:, 0]).all()
    assert np.isfinite(out[1:30, 1:30]).all()


def test_fit_stamp_puts_an_off_centre_source_on_the_centre():
    # A cutout truncated at the CCD's low edge: the source sits at row 9, not the middle.
    image = np.zeros((41, 63), dtype=np.float32)
    image[9, 31] = 100.0
    out = fit_stamp(image, 31, centre=(9.4, 31.0))
    assert out[15, 15] == 100.0
    assert np.isnan(out[:6]).all() and np.isfinite(out[6:]).all()


def test_assemble_orders_channels_and_rejects_missing_or_empty_cutouts():
    contract = StampContract(("template", "science"), size=21)
    ramp = np.add.outer(np.arange(63.0), np.arange(63.0))
    images = {"science": ramp + 1000.0, "template": ramp}
    stamps = assemble(images, contract)
    assert stamps.shape == (2, 21, 21)
    assert (stamps[0] == fit_stamp(ramp, 21)).all() and (stamps[1] == fit_stamp(ramp + 1000.0, 21)).all()
    with pytest.raises(StampError, match="missing"):
        assemble({"science": images["science"]}, contract)
    with pytest.raises(StampError, match="no finite pixel"):
        assemble({**images, "template": np.full((63, 63), np.nan)}, contract)
    with pytest.raises(StampError, match="2-D"):
        assemble({**images, "template": np.ones(5)}, contract)


def test_fit_stamp_turns_blank_markers_into_nan():
    # ZTF marks pixels without data as -FLT_MAX: finite, but not flux.
    image = np.ones((31, 31), dtype=np.float32)
    image[3, 4] = np.finfo(np.float32).min
    image[5, 6] = np.inf
    out = fit_stamp(image, 31)
    assert np.isnan(out[3, 4]) and np.isnan(out[5, 6])
    assert np.isfinite(np.delete(out.ravel(), [3 * 31 + 4, 5 * 31 + 6])).all()


def test_real_ztf_blank_template_pixels_are_masked(sample_data):
    from service.decode.alerts import decode_message

    alert = decode_message((sample_data / "ztf" / "472263571115090000.avro").read_bytes())[0]
    template = alert.images["template"]
    assert (template <= -1e30).any(), "this sample's template carries -FLT_MAX blank markers"
    stamps = assemble(alert.images, StampContract(size=63), alert.centre)
    assert not (np.abs(stamps[np.isfinite(stamps)]) >= 1e30).any()
    assert np.isnan(stamps[0]).sum() == ((template <= -1e30) | np.isnan(template)).sum()
