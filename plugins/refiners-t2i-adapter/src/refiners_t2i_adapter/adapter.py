"""`T2IAdapter`: run a T2I-Adapter inside a UNet and add its features to the UNet's down path.

Injecting puts layers into the UNet, and ejecting takes them out again:

    SD1UNet (or SDXLUNet)
      T2IFeatures              <- first: the features of the condition image at the generated size, in its context
      TimestepEncoder
      DownBlocks
        Chain_k                one per feature (see `refiners_t2i_adapter.placement`)
          ...
          T2IResidual          <- adds scale * feature, before the chain's SaveSkip
          SaveSkip
      MiddleBlock
      T2IResidual              <- SDXL: the fourth feature
      UpBlocks
      OutputBlock

Several adapters can be injected into one UNet: their features add up, each times its own scale, as with diffusers'
`MultiAdapter` and its `adapter_conditioning_scale` weights. ControlNets (refiners-controlnet) go along.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Self

import torch
from PIL import Image
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.checks import check_finite, check_finite_tensor
from refiners_core.fluxion.utils import image_to_tensor
from refiners_sd15.loading import PathOrRepoId, read_component_config
from refiners_sd15.unet import DownBlocks, MiddleBlock, UNetConfig
from refiners_sd15.unet.blocks import SaveSkip
from refiners_t2i_adapter.condition import condition_image
from refiners_t2i_adapter.mapping import T2I_ADAPTER_FORMAT
from refiners_t2i_adapter.model import T2IAdapterModel
from refiners_t2i_adapter.placement import LATENT_DOWNSCALE, FeaturePlace, check_fits

_CONTEXT_NAMES = itertools.count(1)
Condition = Image.Image | torch.Tensor


class T2IFeatures(fl.Chain):
    """Compute the features of the condition image into the `<context>.features` context, and return the input (the
    latents) unchanged.

    The condition is resized to the generated size (8 times the latents'): a PIL image with Lanczos as diffusers'
    adapter pipelines do, a tensor bilinearly (antialiased). Without gradients, the features are computed once per
    size, device and dtype, and kept until the condition changes.
    """

    def __init__(self, context: str, model: T2IAdapterModel) -> None:
        self.context = context
        self.condition: Condition | None = None
        self._cached: tuple[tuple[Any, ...], tuple[torch.Tensor, ...]] | None = None
        super().__init__(model)

    def init_context(self) -> fl.Contexts:
        return {self.context: {}}

    def set_condition(self, condition: Condition) -> None:
        self.condition = condition
        self._cached = None

    def forward(self, *args: Any) -> Any:
        x = args[0]
        height, width = x.shape[-2] * LATENT_DOWNSCALE, x.shape[-1] * LATENT_DOWNSCALE
        self.use_context(self.context)["features"] = self.features(height, width, x.device, x.dtype)
        return args[0] if len(args) == 1 else args

    def features(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The unscaled features of the condition resized to `height` x `width`; raises ContextError if no condition
        was set."""
        if self.condition is None:
            raise fl.ContextError(
                f"the T2I-Adapter at `{self.get_path()}` has no condition image: call set_condition(image) on it first"
            )
        key = (height, width, device, dtype)
        cache = not torch.is_grad_enabled()  # with gradients (training), the features are recomputed at every call
        if cache and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        if isinstance(self.condition, Image.Image):
            image = self.condition
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            condition = image_to_tensor(image).to(device=device, dtype=dtype)
        else:
            condition = self.condition.to(device=device, dtype=dtype)
            if condition.shape[-2:] != (height, width):
                condition = F.interpolate(condition, size=(height, width), mode="bilinear", antialias=True)
        model = self[0]
        features: tuple[torch.Tensor, ...] = model(condition)
        if cache:
            self._cached = (key, features)
        return features


class T2IResidual(fl.Module):
    """Add feature `index` of the `<context>.features` context, times `scale`, to the input."""

    def __init__(self, context: str, index: int, scale: float = 1.0) -> None:
        super().__init__()
        self.context = context
        self.index = index
        self.scale = check_finite("T2I-Adapter scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature: torch.Tensor = self.use_context(self.context, key="features")["features"][self.index]
        if feature.shape[-3:] != x.shape[-3:]:
            raise ValueError(
                f"T2I-Adapter feature {self.index} is {tuple(feature.shape[-3:])} but the UNet's features at "
                f"`{self.get_path()}` are {tuple(x.shape[-3:])}"
            )
        return x + self.scale * feature

    def extra_repr(self) -> str:
        return f"context={self.context!r}, index={self.index}, scale={self.scale}"


def _unet_parts(unet: fl.Chain) -> tuple[UNetConfig, DownBlocks, MiddleBlock]:
    config = getattr(unet, "config", None)
    down = next((layer for layer in unet if isinstance(layer, DownBlocks)), None)
    middle = next((layer for layer in unet if isinstance(layer, MiddleBlock)), None)
    if not isinstance(config, UNetConfig) or down is None or middle is None:
        raise TypeError(
            f"a T2I-Adapter adapts a UNet (refiners_sd15.SD1UNet, refiners_sdxl.SDXLUNet), got {type(unet).__name__}"
        )
    return config, down, middle


class T2IAdapter(fl.Module, fl.Adapter[fl.Chain]):
    """Steer a UNet (SD1.5's `SD1UNet`, SDXL's `SDXLUNet`) with a T2I-Adapter and a condition image.

        t2i = T2IAdapter.from_pretrained(sd.unet, "TencentARC/t2iadapter_canny_sd15v2", scale=0.8)
        t2i.inject()
        t2i.set_condition(Image.open("edges.png"))

    The adapter patches the UNet in place (see the module docstring) and holds the `T2IAdapterModel` as a submodule
    (`adapter.parameters()` are its own, `adapter.to(...)` moves it). `scale` can be set at any time; `eject`
    restores the UNet exactly. Raises TypeError if `target` is not a UNet, ValueError naming the fields at fault if
    the adapter's features do not fit the UNet (an SD1.5 adapter on an SDXL UNet, or the reverse), or if `scale` is
    NaN or infinite.
    """

    def __init__(self, target: fl.Chain, model: T2IAdapterModel, scale: float = 1.0) -> None:
        if not isinstance(model, T2IAdapterModel):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"T2IAdapter needs a T2IAdapterModel, got {type(model).__name__}")
        unet_config, _, _ = _unet_parts(target)
        places = check_fits(model.config, unet_config, "this T2I-Adapter", target.get_path())
        check_finite("T2I-Adapter scale", scale)
        with self.setup_adapter(target):
            super().__init__()
        context = f"t2i_adapter_{next(_CONTEXT_NAMES)}"
        self.model = model
        self._places: list[FeaturePlace] = places
        self._layers = (T2IFeatures(context, model),)  # a tuple: not registered twice as a submodule
        self._residuals = tuple(T2IResidual(context, index, scale) for index in range(len(places)))

    @classmethod
    def from_pretrained(
        cls,
        unet: fl.Chain,
        path_or_repo_id: PathOrRepoId,
        *,
        scale: float = 1.0,
        revision: str | None = None,
        variant: str | None = None,
    ) -> T2IAdapter:
        """A T2I-Adapter for `unet` from a diffusers `T2IAdapter` folder or hub id (`config.json` and
        `diffusion_pytorch_model.safetensors` or `.bin`), or a file written by `T2IAdapterModel.save`, on the UNet's
        device with its dtype. A hub id is read from the hub cache when offline (`HF_HUB_OFFLINE`).

        The config is read and checked against the UNet before any weight is. Raises FileNotFoundError naming what is
        missing, WeightsError naming the file and the field or key at fault (a folder of another model, e.g. a
        ControlNet), ValueError if the adapter does not fit the UNet; the UNet is untouched.
        """
        unet_config, _, _ = _unet_parts(unet)
        if not os.path.isfile(path_or_repo_id):
            config = read_component_config(T2I_ADAPTER_FORMAT, path_or_repo_id, subfolder="", revision=revision)
            check_fits(config, unet_config, f"the T2I-Adapter {os.fspath(path_or_repo_id)}", unet.get_path())
        model = T2IAdapterModel.from_pretrained(
            path_or_repo_id, subfolder="", device=unet.device, dtype=unet.dtype, revision=revision, variant=variant
        )
        try:
            return cls(unet, model, scale=scale)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path_or_repo_id)}: {error}") from None

    @property
    def scale(self) -> float:
        """How much of the features is added to the UNet's (diffusers' `adapter_conditioning_scale`)."""
        return self._residuals[0].scale

    @scale.setter
    def scale(self, value: float) -> None:
        scale = check_finite("T2I-Adapter scale", value)
        for residual in self._residuals:
            residual.scale = scale

    def set_condition(self, image: Condition) -> Self:
        """Set the condition image: a PIL image (converted to RGB or grayscale as the adapter reads it, see
        `condition_image`) or a `(B, in_channels, H, W)` tensor in [0, 1]. It is resized to the generated size
        when the UNet runs. Raises TypeError, or ValueError naming the mode, shape or value at fault; the previous
        condition is then kept."""
        channels = self.model.config.in_channels
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or image.shape[1] != channels:
                raise ValueError(
                    f"the T2I-Adapter condition must be a (B, {channels}, H, W) tensor (in_channels={channels}), "
                    f"got shape {tuple(image.shape)}"
                )
            check_finite_tensor("the T2I-Adapter condition", image)
            condition: Condition = image
        else:
            condition = condition_image(image, channels)
        self._layers[0].set_condition(condition)
        return self

    def features(self, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """The unscaled features of the condition image at a generated size of `height` x `width`."""
        return self._layers[0].features(height, width, self.model.device, self.model.dtype)

    @property
    def is_injected(self) -> bool:
        return any(layer is self._layers[0] for layer in self.target)

    def inject(self, parent: fl.Chain | None = None) -> Self:
        """Put `T2IFeatures` first in the UNet and one `T2IResidual` per feature at its place.

        `parent`, if given, must be the UNet itself. Raises AdapterError if the adapter is already injected; the UNet
        is then left unchanged.
        """
        unet = self.target
        self.check_in_place_injection(parent, "UNet")
        for chain, position, residual in self._slots():
            chain.insert(position, residual)
        unet.insert(0, self._layers[0])
        return self

    def eject(self) -> None:
        """Take the adapter's layers out of the UNet, which is then exactly as before `inject`. The condition image
        is kept for a later `inject`. Raises AdapterError if the adapter is not injected, or the UNet was edited so
        that its layers are no longer there (the UNet is then left unchanged)."""
        unet = self.target
        if not self.is_injected:
            raise fl.AdapterError(f"cannot eject this T2IAdapter from `{unet.get_path()}`: it is not injected")
        holders = [residual.parent for residual in self._residuals]
        if any(holder is None or holder.root is not unet.root for holder in holders):
            raise fl.AdapterError(
                f"cannot eject this T2IAdapter: one of its T2IResidual layers is no longer in `{unet.get_path()}` "
                "(was the UNet edited after inject?)"
            )
        for holder, residual in zip(holders, self._residuals):
            assert holder is not None
            holder.remove(residual)
        features = self._layers[0]
        unet.remove(features)
        root = unet.root
        if isinstance(root, fl.Chain):
            root.provider.contexts.pop(features.context, None)

    def _slots(self) -> list[tuple[fl.Chain, int, T2IResidual]]:
        """Where each residual goes: `(chain, position, residual)`."""
        _, down, middle = _unet_parts(self.target)
        slots: list[tuple[fl.Chain, int, T2IResidual]] = []
        for place, residual in zip(self._places, self._residuals):
            if place.stage is None:
                unet = self.target
                slots.append((unet, next(i for i, layer in enumerate(unet) if layer is middle) + 1, residual))
                continue
            chain = down[place.stage]
            assert isinstance(chain, fl.Chain)
            position = next(i for i, layer in enumerate(chain) if isinstance(layer, SaveSkip))
            slots.append((chain, position, residual))
        return slots
