"""FreeU (Si et al., 2023, arXiv:2309.11497): reweigh the decoder of a diffusion UNet, with no new weights.

In the first two levels of the UNet's decoder (the two lowest resolutions), before each block concatenates its
skip connection, FreeU multiplies the first half of the backbone's channels by `b` and the lowest frequencies of
the skip connection by `s` (`b1, s1` for the first level, `b2, s2` for the second). This is the rule of diffusers'
`UNet2DConditionModel.enable_freeu` (`apply_freeu` and `fourier_filter` in `diffusers.utils.torch_utils`): a
constant backbone factor, not modulated by the features' mean as in the paper's later revision, and a low-pass
window of 2x2 frequencies.

    freeu = FreeU(sd.unet, s1=0.9, s2=0.2, b1=1.2, b2=1.4).inject()  # or FreeU(sdxl.unet): SDXL's factors
    ...
    freeu.eject()

It applies to refiners-sd15's `SD1UNet` and to any UNet built of its blocks with a `UNetConfig` (refiners-sdxl's
`SDXLUNet`), without importing refiners-sdxl: an SDXL UNet is told by its config's `text_time` added embedding.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch

import refiners_core.fluxion as fl
from refiners_core.checks import check_finite
from refiners_freeu.scales import SD15_SCALES, SDXL_SCALES
from refiners_sd15.unet import ConcatenateSkip, SD1UNet, UNetConfig, UpBlocks


class _FFT(Protocol):
    """The functions of `torch.fft` used here, as they are called."""

    def fftn(self, input: torch.Tensor, *, dim: tuple[int, ...]) -> torch.Tensor: ...
    def ifftn(self, input: torch.Tensor, *, dim: tuple[int, ...]) -> torch.Tensor: ...
    def fftshift(self, input: torch.Tensor, *, dim: tuple[int, ...]) -> torch.Tensor: ...
    def ifftshift(self, input: torch.Tensor, *, dim: tuple[int, ...]) -> torch.Tensor: ...


_fft = cast(_FFT, torch.fft)  # torch.fft has no type annotations


def unet_config(unet: object) -> UNetConfig:
    """The config of a UNet FreeU applies to: a `SD1UNet`, or a chain of refiners-sd15's UNet blocks with a
    `UNetConfig` as `config` and an `UpBlocks` child (refiners-sdxl's `SDXLUNet`). Raises TypeError naming the type
    of anything else."""
    config = getattr(unet, "config", None)
    if isinstance(unet, SD1UNet) or (
        isinstance(unet, fl.Chain) and isinstance(config, UNetConfig) and any(isinstance(c, UpBlocks) for c in unet)
    ):
        assert isinstance(config, UNetConfig)
        return config
    raise TypeError(f"FreeU applies to a Stable Diffusion UNet (SD1UNet, SDXLUNet), not a {type(unet).__name__}")


def default_scales(unet: object) -> dict[str, float]:
    """The recommended factors for `unet`: `SDXL_SCALES` for an SDXL UNet (`text_time` added embedding),
    `SD15_SCALES` otherwise. Raises TypeError as `unet_config`."""
    return dict(SDXL_SCALES if unet_config(unet).addition_embed_type == "text_time" else SD15_SCALES)


class BackboneScale(fl.Module):
    """Multiply the first half of the channels of `(B, C, H, W)` features by `scale`."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        return torch.cat((x[:, :half] * self.scale, x[:, half:]), dim=1)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class FourierFilter(fl.Module):
    """Multiply the lowest frequencies of each channel of `(B, C, H, W)` features by `scale`.

    The window is the central `2 threshold x 2 threshold` block of the centred 2D spectrum (fewer where the
    features are smaller). The transform runs in float32 (float64 for float64 features), as diffusers does.
    """

    def __init__(self, scale: float, threshold: int = 1) -> None:
        super().__init__()
        self.scale = scale
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        dims = (-2, -1)
        spectrum = _fft.fftshift(_fft.fftn(x.to(compute_dtype), dim=dims), dim=dims)
        height, width = spectrum.shape[-2:]
        mask = torch.ones(height, width, device=x.device, dtype=compute_dtype)
        row, column, t = height // 2, width // 2, self.threshold
        mask[row - t : row + t, column - t : column + t] = self.scale
        filtered = _fft.ifftn(_fft.ifftshift(spectrum * mask, dim=dims), dim=dims).real
        return filtered.to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, threshold={self.threshold}"


class SkipFilter(fl.Chain, fl.Adapter[fl.UseContext]):
    """Pass the skip connection a `ConcatenateSkip` reads from the context through a `FourierFilter`."""

    def __init__(self, target: fl.UseContext, scale: float) -> None:
        with self.setup_adapter(target):
            super().__init__(target, FourierFilter(scale))


class FreeUAdapter(fl.Chain, fl.Adapter[ConcatenateSkip]):
    """FreeU on one skip connection of the decoder, in the place of its `ConcatenateSkip`.

    The backbone features coming in go through `BackboneScale(backbone_scale)` and, while injected, the skip
    connection through `FourierFilter(skip_scale)` (a `SkipFilter` put inside the target). Holds no weights:
    the model's `state_dict` is the same with or without it. Both factors can be changed at any time.
    """

    def __init__(self, target: ConcatenateSkip, backbone_scale: float, skip_scale: float) -> None:
        if not isinstance(target, ConcatenateSkip):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"FreeUAdapter adapts a ConcatenateSkip of a UNet, not a {type(target).__name__}")
        with self.setup_adapter(target):
            super().__init__(BackboneScale(backbone_scale), target)
        self._skip_filter = [SkipFilter(target.ensure_find(fl.UseContext), skip_scale)]

    @property
    def backbone_scale(self) -> float:
        """Factor of the first half of the backbone's channels (FreeU's `b`)."""
        return self.ensure_find(BackboneScale).scale

    @backbone_scale.setter
    def backbone_scale(self, value: float) -> None:
        self.ensure_find(BackboneScale).scale = value

    @property
    def skip_scale(self) -> float:
        """Factor of the low frequencies of the skip connection (FreeU's `s`)."""
        return self._skip_filter[0].ensure_find(FourierFilter).scale

    @skip_scale.setter
    def skip_scale(self, value: float) -> None:
        self._skip_filter[0].ensure_find(FourierFilter).scale = value

    def inject(self, parent: fl.Chain | None = None) -> FreeUAdapter:
        super().inject(parent)
        self._skip_filter[0].inject()
        return self

    def eject(self) -> None:
        super().eject()
        self._skip_filter[0].eject()


_NAMES = ("s1", "s2", "b1", "b2")


class FreeU:
    """FreeU on an `SD1UNet` or `SDXLUNet`: a `FreeUAdapter` on each skip connection of the first two decoder levels.

    `b1, s1` apply to the first level (lowest resolution), `b2, s2` to the second; a factor not given takes the
    value recommended for the UNet (`default_scales`: `SD15_SCALES`, or `SDXL_SCALES` for SDXL). `inject()` and
    `eject()` act on every adapter, all or nothing; the factors can be changed while injected with `set_scales`.
    Raises TypeError if `unet` is not a Stable Diffusion UNet, ValueError naming the factor if one is NaN or
    infinite.
    """

    def __init__(
        self,
        unet: SD1UNet | fl.Chain,
        s1: float | None = None,
        s2: float | None = None,
        b1: float | None = None,
        b2: float | None = None,
    ) -> None:
        config = unet_config(unet)
        given = {name: value for name, value in zip(_NAMES, (s1, s2, b1, b2)) if value is not None}
        scales = default_scales(unet) | given
        s1, s2, b1, b2 = (check_finite(f"FreeU {name}", scales[name]) for name in _NAMES)
        stages = list(unet.ensure_find(UpBlocks))
        blocks_per_level = config.layers_per_block + 1
        levels = [stages[:blocks_per_level], stages[blocks_per_level : 2 * blocks_per_level]]
        self.levels = tuple(
            tuple(
                FreeUAdapter(stage.ensure_find(ConcatenateSkip), b, s) for stage in level if isinstance(stage, fl.Chain)
            )
            for level, (b, s) in zip(levels, [(b1, s1), (b2, s2)])
            if level
        )
        """The adapters of each decoder level FreeU applies to (one per skip connection)."""
        self.adapters = tuple(adapter for level in self.levels for adapter in level)
        """Every adapter, lowest resolution first."""

    @property
    def is_injected(self) -> bool:
        """Whether the adapters are in the UNet."""
        return all(adapter.is_injected for adapter in self.adapters)

    def set_scales(
        self, *, s1: float | None = None, s2: float | None = None, b1: float | None = None, b2: float | None = None
    ) -> None:
        """Change some of the factors; the others keep their value. Raises ValueError, changing nothing, if one is
        NaN or infinite."""
        for name, value in zip(_NAMES, (s1, s2, b1, b2)):
            if value is not None:
                check_finite(f"FreeU {name}", value)
        for level, (backbone_scale, skip_scale) in zip(self.levels, [(b1, s1), (b2, s2)]):
            for adapter in level:
                if backbone_scale is not None:
                    adapter.backbone_scale = backbone_scale
                if skip_scale is not None:
                    adapter.skip_scale = skip_scale

    @property
    def scales(self) -> dict[str, float]:
        """The current factors, `{"s1": ..., "s2": ..., "b1": ..., "b2": ...}` (level 2's only if the UNet has it)."""
        scales: dict[str, float] = {}
        for number, level in enumerate(self.levels, start=1):
            scales |= {f"s{number}": level[0].skip_scale, f"b{number}": level[0].backbone_scale}
        return scales

    def inject(self) -> FreeU:
        """Put the adapters in the UNet; if one cannot be injected, none is. Raises `fl.AdapterError`."""
        injected: list[FreeUAdapter] = []
        try:
            for adapter in self.adapters:
                injected.append(adapter.inject())
        except BaseException:
            for adapter in reversed(injected):
                adapter.eject()
            raise
        return self

    def eject(self) -> None:
        """Take the adapters out: the UNet computes exactly what it did before `inject`. Raises `fl.AdapterError`."""
        for adapter in reversed(self.adapters):
            adapter.eject()
