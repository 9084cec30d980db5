"""The rotation-invariant real-bogus network and the in-graph stamp normalisation.

`StampNormaliser` is the one implementation of `service.contract.NORMALISATION`: it is
the first module of every network, so training sees exactly what the exported ONNX
graph computes, and the service feeds raw pixels (NaN allowed).

`RealBogusNet` follows Deep-HiTS (Cabrera-Vives et al. 2017): one convolutional trunk
sees the stamp rotated by 0, 90, 180 and 270 degrees (optionally also flipped: the
dihedral group of 8); the features of all versions are averaged before the classifier
head, so the score is invariant to those transforms by construction, not by training.
The exported graph (`ScoringGraph`) computes the same function with less work, turning
the first convolution's filters instead of the stamp (`RealBogusNet.forward_filter_views`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from service.contract import DERIVED_CHANNELS, SKY_SUBTRACTED, StampContract

#: Accepted activation names (case-insensitive; Deep-HiTS spells them tanh, ReLU, PReLU).
ACTIVATIONS = ("tanh", "relu", "leaky_relu", "prelu")
_ACTIVATION_ALIASES = {"leakyrelu": "leaky_relu", "leaky relu": "leaky_relu", "leaky-relu": "leaky_relu"}

#: 1.4826 * MAD estimates the standard deviation of Gaussian noise.
MAD_TO_SIGMA = 1.4826


def canonical_activation(name: str) -> str:
    """Normalise an activation name; raises ValueError naming the accepted ones."""
    key = str(name).strip().lower()
    key = _ACTIVATION_ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(f"activation_function: unknown {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    return key


def make_activation(name: str, channels: int) -> nn.Module:
    name = canonical_activation(name)
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    return nn.PReLU(channels)


def _asinh(z: torch.Tensor) -> torch.Tensor:
    """asinh from abs, log and sqrt: portable across ONNX Runtime kernels and precisions."""
    a = torch.abs(z)
    return torch.sign(z) * torch.log(a + torch.sqrt(a * a + 1.0))


class StampNormaliser(nn.Module):
    """Raw stamps ``[batch, len(contract.raw_inputs), size, size]`` -> model channels.

    For each declared channel of each stamp: non-finite pixels are masked; a raw image is
    standardised with the mean and standard deviation of its unmasked pixels; a derived
    channel (``snr_*``) is its image divided by that image's noise (1.4826 x the median
    absolute deviation of its unmasked pixels; the standard deviation when that is 0; the
    channel is 0 when both are 0), after subtracting the image's median for the images that
    carry a sky (`SKY_SUBTRACTED`), so ``snr_difference``'s zero stays zero; all are
    compressed with asinh and masked pixels are set to `MASK_FILL`. A channel with no
    finite pixel becomes all `MASK_FILL` (no division by zero).

    Sums are accumulated in float64: a float32 sum of ~1000 sky-level pixels rounds
    differently when the stamp is rotated, and that would show in the score. Everything
    per pixel is float32 (it does not depend on pixel order, and halves the memory traffic).
    """

    def __init__(self, contract: StampContract):
        super().__init__()
        self.contract = contract
        raw = list(contract.raw_inputs)
        standardised, noise_scaled, sky_subtracted = [], [], []
        for channel in contract.channels:
            if channel in DERIVED_CHANNELS:
                noise_scaled.append(raw.index(DERIVED_CHANNELS[channel]))
                sky_subtracted.append(channel in SKY_SUBTRACTED)
            else:
                standardised.append(raw.index(channel))
        # Output order: `contract.channels`. Build a permutation from [standardised..., snr...].
        order, s_i, n_i = [], 0, len(standardised)
        for channel in contract.channels:
            if channel in DERIVED_CHANNELS:
                order.append(n_i)
                n_i += 1
            else:
                order.append(s_i)
                s_i += 1
        self.standardised = standardised
        self.noise_scaled = noise_scaled
        self.sky_subtracted = sky_subtracted
        self.order = order
        self.mask_fill = float(contract.mask_fill)

    @staticmethod
    def _median_padding(mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Values for the masked pixels that put the lower median of the unmasked ones at the
        middle rank of all ``P`` pixels: ``below`` of them -inf, the rest +inf.

        `_masked_median` takes a partial sort (`TopK` of the smaller half, unsorted, then its
        maximum), much cheaper than a full sort per image, so the median's rank must not
        depend on how many pixels are masked. The padding depends on the mask only: the
        median and the MAD of one image share it.
        """
        middle = (mask.shape[-1] - 1) // 2
        below = (middle - torch.div(count - 1, 2, rounding_mode="floor")).unsqueeze(-1)
        masked_rank = torch.cumsum((~mask).to(torch.int64), dim=-1)       # 1 for the first masked pixel
        return torch.where(masked_rank <= below, torch.full_like(mask, float("-inf"), dtype=torch.float32),
                           torch.full_like(mask, float("inf"), dtype=torch.float32))

    @staticmethod
    def _masked_median(values: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor,
                       count: torch.Tensor) -> torch.Tensor:
        """Median of the unmasked entries along the last axis (lower median; 0 when none), with
        the masked ones set to `_median_padding`."""
        middle = (values.shape[-1] - 1) // 2
        smaller_half, _ = torch.topk(torch.where(mask, values, padding), middle + 1, dim=-1, largest=False,
                                     sorted=False)
        median = smaller_half.amax(-1)
        return torch.where(count > 0, median, torch.zeros_like(median))

    @staticmethod
    def _deviations(x: torch.Tensor, maskf: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Deviations from the masked mean, in float64 (masked entries of ``x`` are already 0)."""
        x64 = x.to(torch.float64)
        mean = x64.sum(-1) / n
        return (x64 - mean.unsqueeze(-1)) * maskf.to(torch.float64)

    @staticmethod
    def _inverse(scale: torch.Tensor) -> torch.Tensor:
        """1 / scale, and 0 where the scale is 0 (a constant image has no contrast to keep)."""
        return torch.where(scale > 0, 1.0 / torch.clamp(scale, min=1e-300), torch.zeros_like(scale))

    def forward(self, stamps: torch.Tensor) -> torch.Tensor:
        batch, size = stamps.shape[0], stamps.shape[-1]
        x = stamps.to(torch.float32).flatten(2)           # [B, R, P]
        mask = torch.isfinite(x)
        # torch.where first: NaN * 0 is NaN, so masked pixels must never enter arithmetic.
        x = torch.where(mask, x, torch.zeros_like(x))
        maskf = mask.to(x.dtype)
        count = mask.sum(-1)                               # [B, R] int64
        n = torch.clamp(count.to(torch.float64), min=1.0)
        # One pass of moments over every raw image serves both branches: the standardised
        # channels divide by std, and the noise-scaled ones fall back to it.
        dev = self._deviations(x, maskf, n)
        std = torch.sqrt((dev * dev).sum(-1) / n)
        outputs = []
        if self.standardised:
            idx = self.standardised
            outputs.append((dev[:, idx] * self._inverse(std[:, idx]).unsqueeze(-1)).to(torch.float32))
        if self.noise_scaled:
            idx = self.noise_scaled
            d, m, c = x[:, idx], mask[:, idx], count[:, idx]
            padding = self._median_padding(m, c)
            median = self._masked_median(d, m, padding, c)
            mad = self._masked_median(torch.abs(d - median.unsqueeze(-1)), m, padding, c)
            noise = torch.where(mad > 0, MAD_TO_SIGMA * mad.to(torch.float64), std[:, idx])
            if any(self.sky_subtracted):
                sky = median * torch.tensor(self.sky_subtracted, dtype=median.dtype)
                d = d - sky.unsqueeze(-1)
            outputs.append(d * self._inverse(noise).to(torch.float32).unsqueeze(-1))
        z = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        z = z[:, self.order] if self.order != list(range(len(self.order))) else z
        out_mask = torch.cat([mask[:, self.standardised], mask[:, self.noise_scaled]], dim=1)[:, self.order]
        z = torch.where(out_mask, _asinh(z), torch.full_like(z, self.mask_fill))
        return z.reshape(batch, len(self.order), size, size)


@dataclass
class ArchConfig:
    """Architecture of `RealBogusNet` (the ``[model]`` table of a training config).

    Parameters
    ----------
    conv_channels : list of int
        Output channels of each convolution of the trunk.
    kernel_sizes : list of int
        Kernel size of each convolution (same length as ``conv_channels``).
    pool_after : list of int
        2x2 max-pooling after these convolutions (1-based).
    fc_units : list of int
        Hidden fully connected layers of the head, before the output unit.
    activation_function : str
        One of `ACTIVATIONS`.
    dropout : float
        Dropout probability before each fully connected layer (0 disables it).
    dihedral : bool
        Also pool over the four flipped versions (the dihedral group of 8).
    """

    conv_channels: list[int] = field(default_factory=lambda: [8, 16, 16, 32])
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    pool_after: list[int] = field(default_factory=lambda: [1, 3])
    fc_units: list[int] = field(default_factory=lambda: [32])
    activation_function: str = "leaky_relu"
    dropout: float = 0.1
    dihedral: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


#: Named architectures (``arch`` key): Deep-HiTS's arch7 and a narrower default.
ARCHITECTURES: dict[str, dict] = {
    "deephits": dict(conv_channels=[32, 32, 64, 64, 64], kernel_sizes=[4, 3, 3, 3, 3], pool_after=[2, 5],
                     fc_units=[64, 64], dropout=0.5),
    "small": dict(conv_channels=[8, 16, 16, 32], kernel_sizes=[3, 3, 3, 3], pool_after=[1, 3],
                  fc_units=[32], dropout=0.1),
    "tiny": dict(conv_channels=[4, 8], kernel_sizes=[3, 3], pool_after=[1, 2], fc_units=[8], dropout=0.0),
}


class RealBogusNet(nn.Module):
    """Normaliser -> rotation-pooled conv trunk -> classifier head. ``forward`` returns logits ``[batch]``."""

    def __init__(self, contract: StampContract, arch: ArchConfig):
        super().__init__()
        if len(arch.kernel_sizes) != len(arch.conv_channels):
            raise ValueError("model.kernel_sizes: needs one entry per conv_channels entry")
        bad_pools = [p for p in arch.pool_after if not 1 <= p <= len(arch.conv_channels)]
        if bad_pools:
            raise ValueError(f"model.pool_after: {bad_pools} out of range 1..{len(arch.conv_channels)}")
        self.contract = contract
        self.arch = arch
        self.normaliser = StampNormaliser(contract)
        self.n_views = 8 if arch.dihedral else 4

        layers: list[nn.Module] = []
        self.freezable: list[nn.Module] = []  # first-to-last trainable layers, for fine-tuning
        channels, side = len(contract.channels), contract.size
        for i, (width, kernel) in enumerate(zip(arch.conv_channels, arch.kernel_sizes), start=1):
            # odd kernels: symmetric padding; even ones (Deep-HiTS's 4x4) need torch's "same"
            padding = kernel // 2 if kernel % 2 else "same"
            block = nn.Sequential(nn.Conv2d(channels, width, kernel, padding=padding),
                                  make_activation(arch.activation_function, width))
            if i in arch.pool_after:
                block.append(nn.MaxPool2d(2))
                side //= 2
            layers.append(block)
            self.freezable.append(block)
            channels = width
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        features = channels * side * side
        head: list[nn.Module] = []
        for units in arch.fc_units:
            block = nn.Sequential(nn.Dropout(arch.dropout), nn.Linear(features, units),
                                  make_activation(arch.activation_function, units))
            head.append(block)
            self.freezable.append(block)
            features = units
        self.hidden = nn.Sequential(*head)
        self.output = nn.Sequential(nn.Dropout(arch.dropout), nn.Linear(features, 1))

    @staticmethod
    def view(image: torch.Tensor, index: int) -> torch.Tensor:
        """View ``index`` of images ``[..., H, W]``: rotated by ``index % 4`` quarter turns,
        then, for ``index >= 4``, flipped left-right."""
        rotated = torch.rot90(image, index % 4, (-2, -1))
        return torch.flip(rotated, (-1,)) if index >= 4 else rotated

    @staticmethod
    def inverse_view(image: torch.Tensor, index: int) -> torch.Tensor:
        """Undo `view` ``index``."""
        unflipped = torch.flip(image, (-1,)) if index >= 4 else image
        return torch.rot90(unflipped, -(index % 4), (-2, -1))

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The stamp under every rotation (and flip), stacked along the batch axis."""
        return torch.cat([self.view(x, i) for i in range(self.n_views)], dim=0)

    def forward(self, stamps: torch.Tensor) -> torch.Tensor:
        """Raw stamps -> logits."""
        return self.forward_normalised(self.normaliser(stamps))

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised stamps (the output of `normaliser`) -> logits. Training uses it to
        normalise a data set once when no augmentation changes the pixel statistics."""
        return self._pooled_head(self.trunk(self.views(x)))

    def forward_filter_views(self, stamps: torch.Tensor) -> torch.Tensor:
        """`forward`'s function, with less work: what the exported graph computes.

        A convolution commutes with a rotation or flip of its input if its filters turn the
        other way: ``conv(view(x), w) == view(conv(x, inverse_view(w)))`` for square images
        and odd kernels with symmetric padding (Dieleman et al. 2016). So the first
        convolution runs once per stamp, with the filters of every view side by side, instead
        of once per view of the stamp: the same arithmetic in one wide convolution, which ONNX
        Runtime runs faster than the narrow one on a four (or eight) times larger batch. Its
        outputs are turned back into the views before the pooling, which does not commute with
        rotations of odd-sized maps. Sums run in another order, so scores agree with `forward`
        to float rounding, not to the bit.
        """
        first = self.trunk[0]
        conv, activation = first[0], first[1]
        if conv.kernel_size[0] % 2 == 0:  # "same" padding of even kernels is not symmetric
            return self.forward(stamps)
        n, width = self.n_views, conv.out_channels
        weight = torch.cat([self.inverse_view(conv.weight, i) for i in range(n)], dim=0)
        y = F.conv2d(self.normaliser(stamps), weight, conv.bias.repeat(n), padding=conv.padding)
        # elementwise, so it may run before the views are turned back; PReLU's slopes are per channel
        y = F.prelu(y, activation.weight.repeat(n)) if isinstance(activation, nn.PReLU) else activation(y)
        views = torch.cat([self.view(y[:, i * width:(i + 1) * width], i) for i in range(n)], dim=0)
        return self._pooled_head(self.trunk[1:](first[2:](views)))

    def _pooled_head(self, features: torch.Tensor) -> torch.Tensor:
        """Trunk features ``[views * B, F]`` -> logits ``[B]``: the mean over the views (the
        same set of views for any rotation), then the classifier head."""
        features = features.reshape(self.n_views, -1, features.shape[-1]).mean(0)
        return self.output(self.hidden(features)).squeeze(-1)

    def freeze(self, layers: int | str) -> int:
        """Freeze the first ``layers`` layers (int) or ``"all_but_head"``; returns how many were frozen."""
        n = len(self.freezable) if layers == "all_but_head" else int(layers)
        if not 0 <= n <= len(self.freezable):
            raise ValueError(f"finetune.freeze: {layers!r} out of range; accepted: 0..{len(self.freezable)} "
                             "or \"all_but_head\"")
        for block in self.freezable[:n]:
            for p in block.parameters():
                p.requires_grad_(False)
        return n


class ScoringGraph(nn.Module):
    """What is exported: raw stamps -> probability of "real" ``[batch]``, through
    `RealBogusNet.forward_filter_views`.

    ``temperature`` is the calibration (Guo et al. 2017): logits are divided by it before
    the sigmoid, so the published score is the calibrated probability and the ranking,
    hence the ROC curve, is unchanged.
    """

    def __init__(self, net: RealBogusNet, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, stamps: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net.forward_filter_views(stamps) * self.inverse_temperature)

    def as_trained(self, stamps: torch.Tensor) -> torch.Tensor:
        """The same score through `RealBogusNet.forward`, the form training ran: what an
        export is checked against."""
        return torch.sigmoid(self.net(stamps) * self.inverse_temperature)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: The torch weights shipped beside ``model.onnx``: what gradient-based explanations need.
WEIGHTS_FILE = "weights.pt"


def save_weights(graph: ScoringGraph, path) -> None:
    """The exported graph's weights, architecture, contract and temperature, for `load_weights`."""
    torch.save({"state_dict": graph.net.state_dict(), "arch": graph.net.arch.to_dict(),
                "contract": graph.net.contract.to_dict(),
                # in float64, so that load_weights rebuilds the very same float32 inverse
                "temperature": 1.0 / float(graph.inverse_temperature)}, path)


def load_weights(path) -> ScoringGraph:
    """The `ScoringGraph` saved by `save_weights`: raw stamps -> the same score as the ONNX file."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = RealBogusNet(StampContract.from_dict(saved["contract"]), ArchConfig(**saved["arch"]))
    net.load_state_dict(saved["state_dict"])
    return ScoringGraph(net, saved["temperature"]).eval()
