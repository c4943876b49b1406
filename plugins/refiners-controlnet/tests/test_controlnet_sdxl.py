"""SDXL ControlNets (refiners-sdxl's SDXLUNet and StableDiffusion_XL) against diffusers.

The UNet is refiners-sdxl's small SDXL-like one (`SMALL_UNET`: two levels, attention on the second, the `text_time`
added embedding); its ControlNets are diffusers `ControlNetModel`s with random weights: the full copy of its encoder,
and two smaller ones shaped like diffusers/controlnet-canny-sdxl-1.0-mid and -small (fewer transformer blocks, a
depth of 0 at levels without attention). Ours load the folders diffusers' `save_pretrained` writes. Residuals and one
UNet call must match diffusers within 1e-4 of max |reference|; 3 guided DDIM steps with two ControlNets at once must
match `StableDiffusionXLControlNetPipeline` within 1e-3.
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from refiners_controlnet import (
    SDXL_CONTROLNET,
    ControlNet,
    ControlNetAdapter,
    controlnet_config_from_diffusers,
    diffusers_controlnet_mapping,
    image_to_condition,
)
from refiners_controlnet.testing import (
    SDXL_CONTROLNET_CONFIG,
    SDXL_CONTROLNET_MID_CONFIG,
    SDXL_CONTROLNET_SMALL_CONFIG,
    SMALL_CONTROLNET_CONFIG,
    SMALL_SDXL_CONTROLNET,
    SMALL_SDXL_CONTROLNET_MID,
    SMALL_SDXL_CONTROLNET_SMALL,
    reference_controlnet,
)
from refiners_core.cli import main
from refiners_core.testing import assert_relative_close
from refiners_sd15 import DDIM
from refiners_sdxl import SDXLUNet, StableDiffusion_XL
from refiners_sdxl.testing import (
    POOLED_DIM,
    SMALL_UNET,
    assert_adapted_steps_match_pipeline,
    ddim_pipeline_components,
    small_sdxl_pipeline,
)

SIZE = 64  # pixels: 8x8 latents
STEPS = 3
GUIDANCE = 5.0
VARIANTS = {"full": SMALL_SDXL_CONTROLNET, "mid": SMALL_SDXL_CONTROLNET_MID, "small": SMALL_SDXL_CONTROLNET_SMALL}


@dataclass
class References:
    pipeline: StableDiffusionXLPipeline
    folder: Path

    def controlnet(self, name: str) -> Any:
        return ControlNetModel.from_pretrained(self.folder / name)

    def unet(self) -> Any:
        return UNet2DConditionModel.from_pretrained(self.folder / "model", subfolder="unet")


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> References:
    folder = tmp_path_factory.mktemp("sdxl_controlnet")
    pipeline = small_sdxl_pipeline()
    pipeline.save_pretrained(folder / "model")
    for seed, (name, config) in enumerate(VARIANTS.items(), start=30):
        reference_controlnet(config, seed=seed).save_pretrained(folder / name)  # pyright: ignore[reportUnknownMemberType]
    reference_controlnet(SMALL_CONTROLNET_CONFIG, seed=40).save_pretrained(folder / "sd15")  # pyright: ignore[reportUnknownMemberType]
    return References(pipeline, folder)


def diffusers_keys(config: dict[str, Any]) -> set[str]:
    with torch.device("meta"):
        model: Any = ControlNetModel.from_config(config)  # pyright: ignore[reportUnknownMemberType]
    return set(model.state_dict())


@pytest.mark.parametrize(
    "config",
    [
        SDXL_CONTROLNET_CONFIG,
        SDXL_CONTROLNET_MID_CONFIG,
        SDXL_CONTROLNET_SMALL_CONFIG,
        *VARIANTS.values(),
    ],
    ids=["published", "published-mid", "published-small", *VARIANTS],
)
def test_mapping_takes_every_diffusers_key_of_an_sdxl_controlnet_to_every_key_of_ours(config: dict[str, Any]) -> None:
    controlnet_config = controlnet_config_from_diffusers(config)
    mapping = diffusers_controlnet_mapping(controlnet_config)
    assert set(mapping) == diffusers_keys(config)
    ours = ControlNet(controlnet_config, device="meta")
    assert sorted(mapping.values()) == sorted(ours.state_dict())


def test_published_sdxl_config_reads_as_sdxl_controlnet() -> None:
    assert controlnet_config_from_diffusers(SDXL_CONTROLNET_CONFIG) == SDXL_CONTROLNET
    small = controlnet_config_from_diffusers(SDXL_CONTROLNET_SMALL_CONFIG).unet
    assert small.cross_attention_levels == (False, False, False)
    assert small.transformer_depth(-1) == 1  # the middle block's


def conditioning(batch: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=generator),
        "text": torch.randn(batch, 77, SMALL_UNET["cross_attention_dim"], generator=generator),
        "pooled": torch.randn(batch, POOLED_DIM, generator=generator),
        "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * batch, dtype=torch.float32),
        "condition": torch.rand(batch, 3, SIZE, SIZE, generator=generator),
    }


def set_conditioning(unet: SDXLUNet, inputs: dict[str, torch.Tensor], timestep: torch.Tensor) -> None:
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(inputs["text"])
    unet.set_pooled_text_embedding(inputs["pooled"])
    unet.set_time_ids(inputs["time_ids"])


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_sdxl_controlnet_residuals_match_diffusers(references: References, variant: str) -> None:
    inputs, timestep = conditioning(2, seed=1), torch.tensor([600.0])
    down, middle = references.controlnet(variant)(
        inputs["x"],
        timestep,
        encoder_hidden_states=inputs["text"],
        controlnet_cond=inputs["condition"],
        added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]},
        return_dict=False,
    )
    controlnet = ControlNet.from_pretrained(references.folder / variant).eval()
    controlnet.set_context(
        "diffusion",
        {
            "timestep": timestep,
            "clip_text_embedding": inputs["text"],
            "pooled_text_embedding": inputs["pooled"],
            "time_ids": inputs["time_ids"],
        },
    )
    controlnet.set_condition(inputs["condition"])
    controlnet(inputs["x"])
    assert len(controlnet.residuals) == len(down) + 1
    for ours, theirs in zip(controlnet.residuals, [*down, middle]):
        assert theirs.abs().max() > 0
        assert_relative_close(ours, theirs, 1e-4)


@torch.no_grad()
def test_sdxl_unet_with_two_controlnets_matches_diffusers(references: References) -> None:
    inputs, timestep = conditioning(2, seed=2), torch.tensor([300.0])
    added = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    scales = {"full": 0.8, "small": 0.6}
    down_sum: list[torch.Tensor] | None = None
    middle_sum = torch.zeros(())
    for name, scale in scales.items():
        down, middle = references.controlnet(name)(
            inputs["x"],
            timestep,
            encoder_hidden_states=inputs["text"],
            controlnet_cond=inputs["condition"],
            conditioning_scale=scale,
            added_cond_kwargs=added,
            return_dict=False,
        )
        down_sum = list(down) if down_sum is None else [a + b for a, b in zip(down_sum, down)]
        middle_sum = middle_sum + middle
    theirs = references.unet()
    expected = theirs(
        inputs["x"],
        timestep,
        inputs["text"],
        added_cond_kwargs=added,
        down_block_additional_residuals=down_sum,
        mid_block_additional_residual=middle_sum,
    ).sample
    without = theirs(inputs["x"], timestep, inputs["text"], added_cond_kwargs=added).sample
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()  # the ControlNets do steer the UNet

    unet = SDXLUNet.from_pretrained(references.folder / "model").eval()
    for name, scale in scales.items():
        controlnet = ControlNet.from_pretrained(references.folder / name)
        ControlNetAdapter(unet, controlnet, scale=scale).inject().set_condition(inputs["condition"])
    set_conditioning(unet, inputs, timestep)
    assert_relative_close(unet(inputs["x"]), expected, 1e-4)


def edges(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(SIZE, SIZE, 3, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


@torch.no_grad()
def test_three_guided_steps_with_two_controlnets_match_stable_diffusion_xl_controlnet_pipeline(
    references: References,
) -> None:
    sdxl = StableDiffusion_XL.from_pretrained(references.folder / "model")
    sdxl.show_progress = False
    sdxl.solver = DDIM(num_inference_steps=STEPS, **sdxl.solver_defaults)
    images, scales = [edges(1), edges(2)], [0.9, 0.7]
    for name, image, scale in zip(("full", "mid"), images, scales):
        controlnet = ControlNet.from_pretrained(references.folder / name)
        ControlNetAdapter(sdxl.unet, controlnet, scale=scale).inject().set_condition(image_to_condition(image))
    pipeline = StableDiffusionXLControlNetPipeline(
        **ddim_pipeline_components(references.pipeline),
        controlnet=[references.controlnet("full"), references.controlnet("mid")],
    )
    assert_adapted_steps_match_pipeline(
        sdxl,
        pipeline,
        image=images,
        scale_argument="controlnet_conditioning_scale",
        scale=scales,
        off=[0.0, 0.0],
        steps=STEPS,
        guidance=GUIDANCE,
        size=SIZE,
    )


def test_an_sd15_controlnet_on_sdxl_and_an_sdxl_controlnet_on_sd15_are_refused(references: References) -> None:
    from refiners_sd15.unet import SD1UNet

    sdxl_unet = SDXLUNet.from_pretrained(references.folder / "model")
    tree = repr(sdxl_unet)
    with pytest.raises(ValueError, match=r"this ControlNet \(SD1\.5: .*\) does not fit the UNet at .*\(SDXL: "):
        ControlNetAdapter(sdxl_unet, ControlNet.from_pretrained(references.folder / "sd15"))
    assert repr(sdxl_unet) == tree
    sd15_unet = SD1UNet(ControlNet.from_pretrained(references.folder / "sd15").config.unet, device="meta")
    with pytest.raises(ValueError, match=r"this ControlNet \(SDXL: .*\) does not fit the UNet at .*\(SD1\.5: "):
        ControlNetAdapter(sd15_unet, ControlNet(controlnet_config_from_diffusers(SMALL_SDXL_CONTROLNET)))


def test_from_unet_copies_an_sdxl_unet_encoder_with_its_added_embedding(references: References) -> None:
    unet = SDXLUNet.from_pretrained(references.folder / "model")
    controlnet = ControlNet.from_unet(unet)
    assert controlnet.config.unet == unet.config
    ours, theirs = controlnet.state_dict(), unet.state_dict()
    added = [key for key in ours if key.startswith("TextTimeEmbedding.")]
    assert added and all(torch.equal(ours[key], theirs[key]) for key in added)


def test_refiners_generate_runs_sdxl_with_two_controlnets(
    references: References, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edges(3).save(tmp_path / "edges.png")
    out = tmp_path / "out.png"
    arguments = ["generate", "a cat", "--model", str(references.folder / "model"), "--steps", "2", "--size", "64x64"]
    options = [
        *("--controlnet", f"{references.folder / 'full'}:{tmp_path / 'edges.png'}:0.5"),
        *("--controlnet", f"{references.folder / 'small'}:{tmp_path / 'edges.png'}"),
    ]
    assert main([*arguments, *options, "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size == (SIZE, SIZE)


def test_refiners_generate_refuses_an_sd15_controlnet_on_sdxl(
    references: References, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edges(3).save(tmp_path / "edges.png")
    arguments = ["generate", "a cat", "--model", str(references.folder / "model"), "--steps", "2", "--size", "64x64"]
    option = ["--controlnet", f"{references.folder / 'sd15'}:{tmp_path / 'edges.png'}"]
    assert main([*arguments, *option, "--out", str(tmp_path / "out.png")]) != 0
    error = capsys.readouterr().err
    assert "does not fit the UNet" in error and "SD1.5" in error, error
    assert not (tmp_path / "out.png").exists()
