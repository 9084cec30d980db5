"""The network and its exported graph: in-graph normalisation, NaN safety, rotation
invariance (PyTorch and ONNX, random and real ZTF stamps), ONNX/PyTorch parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import ztf_fits_files  # noqa: E402
from service.decode.alerts import decode_message  # noqa: E402
from service.contract import DERIVED_CHANNELS, MASK_FILL, StampContract, assemble  # noqa: E402
from training.export import STACK_TRACE, ExportError, export_onnx, onnx_scores, verify  # noqa: E402
from training.model import ARCHITECTURES, ArchConfig, RealBogusNet, ScoringGraph, StampNormaliser  # noqa: E402

FOUR = ("template", "science", "difference", "snr_difference")


def make_net(channels=FOUR, size=21, dihedral=False, activation="leaky_relu", seed=0):
    torch.manual_seed(seed)
    arch = ArchConfig(**{**ARCHITECTURES["tiny"], "fc_units": [8], "dihedral": dihedral,
                         "activation_function": activation, "dropout": 0.3})
    return RealBogusNet(StampContract(channels=channels, size=size), arch).eval()


def random_stamps(n, contract, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(500.0, 20.0, (n, *contract.input_shape)).astype(np.float32)
    c = contract.size // 2
    x[:, :, c - 1:c + 2, c - 1:c + 2] += rng.uniform(0, 500, (n, 1, 1, 1)).astype(np.float32)
    x[: n // 2, :, :, : contract.size // 4] += 300.0  # asymmetric content, so rotations matter
    return x


def real_ztf_stamps(contract):
    """The real ZTF sample cutouts, decoded by the service's own decoder."""
    stamps = []
    for path in ztf_fits_files():
        for alert in decode_message(path.read_bytes(), "ztf"):
            stamps.append(assemble(alert.images, contract, alert.centre))
    assert len(stamps) >= 10
    return np.stack(stamps)


# --------------------------------------------------------------------------- normaliser
def test_normaliser_matches_the_contract_definition():
    contract = StampContract(channels=("difference", "snr_difference", "science", "snr_science", "snr_template"),
                             size=17)
    x = random_stamps(3, contract)
    x[:, 1:] += 400.0                  # science and template carry a sky level, the difference does not
    x[0, 0, :4] = np.nan
    x[1, 2, 3:5] = np.nan
    out = StampNormaliser(contract)(torch.from_numpy(x)).numpy()
    raw = list(contract.raw_inputs)
    for i in range(3):
        for j, channel in enumerate(contract.channels):
            img = x[i, raw.index(DERIVED_CHANNELS.get(channel, channel))].astype(np.float64)
            ok = np.isfinite(img)
            if channel in DERIVED_CHANNELS:
                med = np.sort(img[ok])[(ok.sum() - 1) // 2]                  # the lower median
                mad = np.sort(np.abs(img[ok] - med))[(ok.sum() - 1) // 2]
                sky = med if channel in ("snr_science", "snr_template") else 0.0
                expected = np.arcsinh((img - sky) / (1.4826 * mad))
            else:
                expected = np.arcsinh((img - img[ok].mean()) / img[ok].std())
            np.testing.assert_allclose(out[i, j][ok], expected[ok], rtol=1e-5, atol=1e-5)
            assert np.all(out[i, j][~ok] == MASK_FILL)


@pytest.mark.parametrize("pixels", [289, 256])
def test_masked_median_is_numpys_lower_median_of_the_unmasked_pixels(pixels):
    rng = np.random.default_rng(pixels)
    values = rng.normal(size=(64, pixels)).astype(np.float32)
    values[:8] = np.round(values[:8])                          # ties
    mask = rng.random((64, pixels)) > rng.random((64, 1))      # from none to nearly all masked
    mask[0], mask[1] = True, False
    mask[2] = False
    mask[2, 7] = True                                          # a single unmasked pixel
    mask, count = torch.from_numpy(mask), torch.from_numpy(mask.sum(-1))
    got = StampNormaliser._masked_median(torch.from_numpy(values), mask, StampNormaliser._median_padding(mask, count),
                                         count).numpy()
    mask = mask.numpy()
    for row, m, median in zip(values, mask, got):
        kept = np.sort(row[m])
        assert median == (kept[(len(kept) - 1) // 2] if len(kept) else 0.0)


def test_in_units_of_noise_a_bright_star_stays_brighter_than_a_faint_one():
    """Standardising makes a star of any brightness look alike; the snr channels keep the ratio."""
    contract = StampContract(channels=("template", "snr_template"), size=31)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:31, :31]
    star = np.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / (2 * 1.5 ** 2))
    stamps = np.stack([(300.0 + rng.normal(0, 5, (31, 31)) + flux * star)[None] for flux in (200.0, 20000.0)])
    z = StampNormaliser(contract)(torch.from_numpy(stamps.astype(np.float32))).numpy()
    standardised, snr = z[:, 0, 15, 15], z[:, 1, 15, 15]
    assert abs(standardised[1] - standardised[0]) < 1.0
    assert 50 < np.sinh(snr[1]) / np.sinh(snr[0]) < 150      # the stars' flux ratio is 100
    assert abs(np.median(z[:, 1])) < 0.2        # the sky is at zero


def test_nan_inf_and_all_masked_channels_never_give_nan():
    net = make_net()
    contract = net.contract
    x = random_stamps(6, contract)
    x[0] = np.nan                      # everything masked
    x[1, 2] = np.nan                   # no difference at all (snr channel too)
    x[2, :, :10] = np.nan              # cut at the CCD edge
    x[3, 0, 5, 5] = np.inf
    x[3, 1, 6, 6] = -np.inf
    x[4] = 7.0                         # constant stamp: std 0
    x[5, 1] = 0.0
    with torch.no_grad():
        z = net.normaliser(torch.from_numpy(x))
        scores = ScoringGraph(net)(torch.from_numpy(x))
    assert torch.isfinite(z).all() and torch.isfinite(scores).all()
    assert torch.all(z[0] == MASK_FILL) and torch.all(z[1, 2:4] == MASK_FILL)
    assert torch.all(z[4] == 0)


@pytest.mark.parametrize("dihedral", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "prelu"])
def test_torch_score_is_rotation_invariant(dihedral, activation):
    net = make_net(dihedral=dihedral, activation=activation)
    x = torch.from_numpy(random_stamps(8, net.contract))
    with torch.no_grad():
        base = net(x)
        for k in (1, 2, 3):
            assert torch.max(torch.abs(net(torch.rot90(x, k, (2, 3))) - base)) <= 1e-5
        flipped = net(torch.flip(x, (3,)))
    if dihedral:
        assert torch.max(torch.abs(flipped - base)) <= 1e-5
    # the trunk really sees rotated inputs differently (invariance is not triviality)
    with torch.no_grad():
        views = net.trunk(net.views(net.normaliser(x))).reshape(net.n_views, 8, -1)
    assert torch.max(torch.abs(views[0] - views[1])) > 1e-4


@pytest.mark.parametrize("dihedral", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "prelu"])
@pytest.mark.parametrize("kernel", [3, 4])
def test_exported_form_turns_the_filters_and_scores_as_trained(dihedral, activation, kernel):
    """The exported graph runs the first convolution once with the filters of every view
    (`forward_filter_views`); it must give `forward`'s scores, whose first convolution
    runs once per view of the stamp. Even kernels fall back to `forward` itself."""
    net = make_net(dihedral=dihedral, activation=activation)
    if kernel == 4:
        net = RealBogusNet(net.contract, ArchConfig(**{**net.arch.to_dict(), "kernel_sizes": [4, 3]})).eval()
    if activation == "prelu":  # slopes that differ by channel, so a mix-up of channels shows
        with torch.no_grad():
            net.trunk[0][1].weight.copy_(torch.linspace(-0.5, 0.5, net.trunk[0][1].weight.numel()))
    x = random_stamps(8, net.contract)
    x[2, :, :5] = np.nan
    with torch.no_grad():
        trained = net(torch.from_numpy(x))
        exported = net.forward_filter_views(torch.from_numpy(x))
        graph = ScoringGraph(net, temperature=1.3)
        assert torch.equal(graph(torch.from_numpy(x)), torch.sigmoid(exported * graph.inverse_temperature))
    assert torch.max(torch.abs(exported - trained)) <= 1e-5
    assert torch.max(torch.abs(trained)) > 1e-3  # not a model that scores everything alike
    assert torch.max(torch.abs(torch.sigmoid(trained / 1.3) - graph.as_trained(torch.from_numpy(x)))) <= 1e-6


def test_template_science_only_model():
    net = make_net(channels=("template", "science"))
    assert net.contract.input_shape == (2, 21, 21)
    with torch.no_grad():
        assert net(torch.from_numpy(random_stamps(3, net.contract))).shape == (3,)


def test_freeze_layers_for_fine_tuning():
    net = make_net()
    assert net.freeze(1) == 1
    frozen = [p.requires_grad for p in net.freezable[0].parameters()]
    assert frozen and not any(frozen)
    assert all(p.requires_grad for p in net.output.parameters())
    net2 = make_net()
    assert net2.freeze("all_but_head") == len(net2.freezable)
    assert all(p.requires_grad for p in net2.output.parameters())
    with pytest.raises(ValueError, match="all_but_head"):
        make_net().freeze(99)


# --------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = make_net(size=31)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    summary = export_onnx(net, path, random_stamps(16, net.contract, seed=1))
    return net, path, summary


def test_export_parity_and_dynamic_batch(exported):
    net, path, summary = exported
    assert summary["parity_max_abs_diff"] <= 1e-5 and summary["opset"] >= 17
    import onnx

    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["stamps"] and [o.name for o in model.graph.output] == ["score"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 31, 31]
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    # the same weights give the same bytes from any checkout: no source paths or line numbers
    assert not [e for n in model.graph.node for e in n.metadata_props if e.key == STACK_TRACE]
    assert str(Path(__file__).resolve().parents[1]).encode() not in path.read_bytes()
    for n in (1, 5, 33):
        x = random_stamps(n, net.contract, seed=n)
        with torch.no_grad():
            expected = ScoringGraph(net)(torch.from_numpy(x)).numpy()
        got = onnx_scores(path, x)
        assert got.shape == (n,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_export_fails_when_onnx_and_torch_disagree(exported):
    net, path, _ = exported
    other = make_net(size=31, seed=1)  # same architecture, other weights: not what the file holds
    with pytest.raises(ExportError, match="disagree"):
        verify(ScoringGraph(other).eval(), path, random_stamps(8, net.contract))


def test_onnx_rotation_invariance_random_stamps(exported):
    net, path, _ = exported
    x = random_stamps(32, net.contract, seed=3)
    x[::5, :, :6] = np.nan
    base = onnx_scores(path, x)
    assert np.isfinite(base).all()
    for k in (1, 2, 3):
        assert np.max(np.abs(onnx_scores(path, np.rot90(x, k, (2, 3)).copy()) - base)) <= 1e-5


def test_the_snr_channels_of_every_image_export_with_parity_and_rotation_invariance(tmp_path):
    net = make_net(channels=FOUR + ("snr_template", "snr_science"), size=31)
    x = real_ztf_stamps(net.contract)
    x[::3, :, :5] = np.nan                  # cut at a CCD edge: the median and noise of what is left
    summary = export_onnx(net, tmp_path / "model.onnx", x)
    assert summary["parity_max_abs_diff"] <= 1e-5
    base = onnx_scores(tmp_path / "model.onnx", x)
    assert np.isfinite(base).all()
    for k in (1, 2, 3):
        rotated = np.rot90(x, k, (2, 3)).copy()
        assert np.max(np.abs(onnx_scores(tmp_path / "model.onnx", rotated) - base)) <= 1e-5


def test_onnx_rotation_invariance_real_ztf_stamps(exported):
    net, path, _ = exported
    x = real_ztf_stamps(net.contract)
    base = onnx_scores(path, x)
    assert np.isfinite(base).all()
    for k in (1, 2, 3):
        assert np.max(np.abs(onnx_scores(path, np.rot90(x, k, (2, 3)).copy()) - base)) <= 1e-5
