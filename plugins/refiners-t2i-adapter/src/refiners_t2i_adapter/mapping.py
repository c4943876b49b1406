"""The key mapping of a diffusers `T2IAdapter` state dict, and how a T2I-Adapter is stored (`T2I_ADAPTER_FORMAT`)."""

from __future__ import annotations

from typing import Any

from refiners_core.weights import WeightsError
from refiners_sd15.loading import ComponentFormat
from refiners_t2i_adapter.config import SD15_FULL_ADAPTER, T2IAdapterConfig, t2i_adapter_config_from_diffusers


def _numbered(name: str, index: int, count: int) -> str:
    """The name a chain gives the `index`-th (0-based) of `count` children of the same class."""
    return name if count == 1 else f"{name}_{index + 1}"


def diffusers_t2i_adapter_mapping(config: T2IAdapterConfig = SD15_FULL_ADAPTER) -> dict[str, str]:
    """Diffusers `T2IAdapter` state dict key -> `T2IAdapterModel` state dict key, for the adapter `config` describes
    (its `adapter_type`, `channels` and `num_res_blocks` shape the mapping)."""
    mapping: dict[str, str] = {}

    def add(reference: str, ours: str) -> None:
        for suffix in ("weight", "bias"):
            mapping[f"adapter.{reference}.{suffix}"] = f"{ours}.{suffix}"

    light = config.adapter_type == "light_adapter"
    stages = len(config.stages)
    blocks = config.num_res_blocks
    block_name, resnet_name = (
        ("LightAdapterBlock", "LightResnetBlock") if light else ("AdapterBlock", "AdapterResnetBlock")
    )
    if not light:
        add("conv_in", "Conv2d")
    for index, (c_in, c_out, _) in enumerate(config.stages):
        stage = f"FeatureStages.{_numbered(block_name, index, stages)}"
        if light:
            add(f"body.{index}.in_conv", f"{stage}.Conv2d_1")
            add(f"body.{index}.out_conv", f"{stage}.Conv2d_2")
        elif c_in != c_out:
            add(f"body.{index}.in_conv", f"{stage}.Conv2d")
        for block in range(blocks):
            resnet = f"{stage}.{_numbered(resnet_name, block, blocks)}"
            add(f"body.{index}.resnets.{block}.block1", f"{resnet}.Conv2d_1")
            add(f"body.{index}.resnets.{block}.block2", f"{resnet}.Conv2d_2")
    return mapping


def _no_single_file(config: object) -> Any:
    raise WeightsError(
        "original T2I-Adapter checkpoints (TencentARC's .pth files) are not supported: use the diffusers version of "
        "the adapter (a folder or hub id with config.json and diffusion_pytorch_model.safetensors)"
    )


T2I_ADAPTER_FORMAT = ComponentFormat(
    name="t2i_adapter",
    subfolder="",
    weight_stems=("diffusion_pytorch_model",),
    config_class=T2IAdapterConfig,
    config_from_diffusers=t2i_adapter_config_from_diffusers,
    diffusers_mapping=lambda config, file_keys: diffusers_t2i_adapter_mapping(config),
    single_file_prefix="adapter.",
    single_file_mapping=_no_single_file,
    single_file_config=_no_single_file,
)
"""How a T2I-Adapter is stored: a diffusers `T2IAdapter` folder (config.json and its weights at the top), or our own
file (`T2IAdapterModel.save`)."""
