"""LoRA files in the kohya (with LoCon), diffusers / PEFT and older diffusers attention-processor layouts, built from
the module names of diffusers' `UNet2DConditionModel` and transformers' `CLIPTextModel`, loaded by `LoraManager`
onto a `StableDiffusion_1` read from a diffusers folder.

The reference is the diffusers / transformers model whose weights have every delta fused by hand
(`W + scale * alpha / rank * up @ down`); outputs agree within 1e-4 of max |reference| in fp32. The small
configurations cover every kind of layer; one test runs the published SD1.5 UNet and text encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_core.cli import main
from refiners_core.module_names import DIFFUSERS, KOHYA, ForeignModuleNames
from refiners_core.testing import assert_relative_close, state_snapshot
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.testing import (
    Delta,
    assert_lora_changes_only_its_generation,
    assert_lora_free,
    fuse_by_hand,
    fused,
    random_lora,
)
from refiners_lora.testing import kohya_lora as random_kohya_lora
from refiners_lora.testing import peft_lora as random_peft_lora
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, DiffusersReferences, paired_outputs

PROMPT = "a photograph of an astronaut riding a horse"

Lora = dict[str, torch.Tensor]


def published_name(component: str, name: str) -> str:
    """The module path as published files write it: transformers 4.x had a `text_model.` level."""
    return name if component == "unet" else f"text_model.{name}"


def kohya_name(component: str, name: str) -> str:
    """The kohya module name of a reference module (`lora_unet_...`, `lora_te_text_model_...`)."""
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + published_name(component, name).replace(".", "_")


def kohya_lora(references: DiffusersReferences, seed: int, rank: int = 4) -> tuple[Lora, list[Delta]]:
    """A kohya LoRA on every Linear and Conv2d (LoCon), with an alpha on every other module only."""
    return random_kohya_lora(references.targets(), kohya_name, seed, rank=rank, std=0.2)


def peft_lora(references: DiffusersReferences, seed: int, rank: int = 3) -> tuple[Lora, list[Delta]]:
    """A diffusers / PEFT LoRA (`unet.*`, `text_encoder.*`, lora_A / lora_B) on every attention and MLP layer."""
    return random_peft_lora(references.targets(), published_name, seed, rank=rank, std=0.2)


def processor_lora(references: DiffusersReferences, seed: int, rank: int = 2) -> tuple[Lora, list[Delta]]:
    """The older diffusers layout: UNet attention processors without a `unet.` prefix, `to_q_lora` in the text
    encoder's self-attentions."""
    generator = torch.Generator().manual_seed(seed)
    unet = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
    text = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
    tensors: Lora = {}
    deltas: list[Delta] = []
    for component, name, module in references.targets():
        attention, _, projection = name.rpartition(".")
        if component == "unet" and name.endswith(".to_out.0"):
            attention, projection = name.removesuffix(".to_out.0"), "to_out.0"
        projections = unet if component == "unet" else text
        old_name = next((old for old, new in projections.items() if new == projection), None)
        if old_name is None or not attention.endswith(("attn1", "attn2", "self_attn")):
            continue
        if component == "unet":
            key = f"{attention}.processor.{old_name}_lora"
        else:
            key = f"text_encoder.{published_name(component, attention)}.{old_name}_lora"
        down, up = random_lora(module, rank, generator, std=0.2)
        tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        deltas.append((component, name, down, up, 1.0))
    return tensors, deltas


class Fused:
    """A copy of the references with LoRA deltas added to their weights by hand."""

    def __init__(self, references: DiffusersReferences, *loras: tuple[list[Delta], float]) -> None:
        self.models = fused({"unet": references.unet, "text_encoder": references.text_encoder}, *loras)


def outputs(sd: StableDiffusion_1, unet: Any, text_encoder: Any, cross_attention_dim: int) -> tuple[torch.Tensor, ...]:
    """(ours, reference) for the UNet on random latents, then for the text encoder on `PROMPT`."""
    return paired_outputs(sd, unet, text_encoder, cross_attention_dim, PROMPT)


def assert_matches(sd: StableDiffusion_1, references: DiffusersReferences, reference: Fused | None = None) -> None:
    unet = reference.models["unet"] if reference else references.unet
    text_encoder = reference.models["text_encoder"] if reference else references.text_encoder
    ours_unet, their_unet, ours_text, their_text = outputs(sd, unet, text_encoder, references.cross_attention_dim)
    for what, ours, theirs in (("unet", ours_unet, their_unet), ("text", ours_text, their_text)):
        assert_relative_close(ours, theirs, 1e-4, what=what)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> DiffusersReferences:
    return DiffusersReferences(tmp_path_factory.mktemp("sd15_small"))


@pytest.fixture
def sd(references: DiffusersReferences) -> StableDiffusion_1:
    return StableDiffusion_1.from_pretrained(references.folder)


def test_every_reference_module_is_named_and_maps_to_the_layer_with_its_weights(
    sd: StableDiffusion_1, references: DiffusersReferences
) -> None:
    assert isinstance(sd, ForeignModuleNames)
    diffusers, kohya = sd.foreign_module_names(DIFFUSERS), sd.foreign_module_names(KOHYA)
    layers = dict(sd.named_modules())
    for component, name, module in references.targets():
        ours = "unet" if component == "unet" else "clip_text_encoder"
        published = published_name(component, name)
        paths = {diffusers[f"{component}.{published}"], kohya[kohya_name(component, name)]}
        if component == "text_encoder":
            paths.add(diffusers[f"text_encoder.{name}"])  # as transformers >= 5.6 names it
        else:
            paths.add(diffusers[name])  # the older files' UNet keys have no `unet.` prefix
        (path,) = paths
        assert path.startswith(f"{ours}.")
        layer = layers[path]
        assert isinstance(layer, fl.Linear | fl.Conv2d), path
        assert torch.equal(layer.weight.reshape(module.weight.shape), module.weight), path


@pytest.mark.parametrize("make_lora", [kohya_lora, peft_lora, processor_lora], ids=["kohya", "peft", "processor"])
def test_a_lora_matches_the_reference_with_its_deltas_fused_by_hand(
    make_lora: Callable[[DiffusersReferences, int], tuple[Lora, list[Delta]]],
    sd: StableDiffusion_1,
    references: DiffusersReferences,
    tmp_path: Path,
) -> None:
    tensors, deltas = make_lora(references, 1)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    before = state_snapshot(sd)
    loras = LoraManager(sd)
    assert loras.add("style", path, scale=0.8) == []
    assert sum(isinstance(layer, LoraAdapter) for layer in sd.modules()) == len(deltas)
    assert_matches(sd, references, Fused(references, (deltas, 0.8)))
    with pytest.raises(AssertionError):  # the LoRA does change the outputs
        assert_matches(sd, references)
    loras.set_scale("style", -0.5)
    assert_matches(sd, references, Fused(references, (deltas, -0.5)))
    loras.remove("style")
    assert_lora_free(sd, before)
    assert_matches(sd, references)


def test_kohya_files_with_original_checkpoint_names_load_too(
    sd: StableDiffusion_1, references: DiffusersReferences
) -> None:
    down, up = torch.randn(2, 32, 1, 1), torch.randn(32, 2, 1, 1)
    LoraManager(sd).add("ldm", {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
                                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up})  # fmt: skip
    deltas: list[Delta] = [("unet", "down_blocks.0.attentions.0.proj_in", down, up, 1.0)]
    assert_matches(sd, references, Fused(references, (deltas, 1.0)))


def test_two_loras_at_once_add_both_deltas_and_fuse_and_unfuse_exactly(
    sd: StableDiffusion_1, references: DiffusersReferences
) -> None:
    kohya, kohya_deltas = kohya_lora(references, 1)
    peft, peft_deltas = peft_lora(references, 2)
    before = state_snapshot(sd)
    loras = LoraManager(sd)
    loras.add("kohya", kohya, scale=0.7)
    loras.add("peft", peft, scale=1.3)
    both = Fused(references, (kohya_deltas, 0.7), (peft_deltas, 1.3))
    assert_matches(sd, references, both)
    unfused = state_snapshot(sd)
    loras.fuse()
    assert not any(isinstance(layer, LoraAdapter) for layer in sd.modules())
    assert list(sd.state_dict()) == list(before)
    assert_matches(sd, references, both)
    loras.unfuse()
    assert all(torch.equal(sd.state_dict()[key], tensor) for key, tensor in unfused.items())
    loras.remove("kohya")
    assert_matches(sd, references, Fused(references, (peft_deltas, 1.3)))
    loras.remove("peft")
    assert_lora_free(sd, before)


def _shape_mismatch(references: DiffusersReferences, tmp_path: Path) -> tuple[Path, str]:
    tensors, _ = kohya_lora(references, 1)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    tensors[key] = torch.randn(4, 48)  # the text encoder width of another model
    path = tmp_path / "other_model.safetensors"
    save_file(tensors, path)
    return path, key


def test_a_shape_mismatch_names_key_layer_path_and_shapes_and_applies_nothing(
    sd: StableDiffusion_1, references: DiffusersReferences, tmp_path: Path
) -> None:
    path, key = _shape_mismatch(references, tmp_path)
    before = state_snapshot(sd)
    with pytest.raises(WeightsError) as error:
        LoraManager(sd).add("style", path)
    layer = "StableDiffusion_1.unet.DownBlocks.Chain_2.CrossAttentionBlock2d.Tokens.TransformerBlock.Residual_2"
    message = str(error.value)
    assert str(path) in message and f"'{key}' has shape (4, 48)" in message
    assert f"`{layer}.CrossAttention.Attention.Distribute.Linear_2`" in message and "expects (4, 64)" in message
    assert_lora_free(sd, before)


@pytest.mark.parametrize("problem", ["unknown key", "not weights", "truncated"])
def test_bad_files_are_named_and_leave_the_model_byte_identical(
    problem: str, sd: StableDiffusion_1, references: DiffusersReferences, tmp_path: Path
) -> None:
    tensors, _ = kohya_lora(references, 1)
    path = tmp_path / "lora.safetensors"
    if problem == "unknown key":
        unknown = "lora_unet_down_blocks_7_attentions_0_proj_in"
        tensors |= {f"{unknown}.lora_down.weight": torch.randn(4, 32), f"{unknown}.lora_up.weight": torch.randn(32, 4)}
        save_file(tensors, path)
        match = rf"{path}: 2 key\(s\) match no layer of StableDiffusion_1.*'{unknown}.lora_down.weight'"
    elif problem == "not weights":
        path.write_text("<html>rate limited</html>")
        match = str(path)
    else:
        save_file(tensors, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = str(path)
    before = state_snapshot(sd)
    with pytest.raises(WeightsError, match=match):
        LoraManager(sd).add("style", path)
    assert_lora_free(sd, before)


def test_the_published_architecture_with_a_full_kohya_lora_matches_the_reference(tmp_path: Path) -> None:
    """One LoCon LoRA on every Linear and Conv2d of the published SD1.5 UNet and text encoder (~90 s on CPU)."""
    references = DiffusersReferences(tmp_path, SD15_UNET_CONFIG, SD15_TEXT_ENCODER_CONFIG)
    sd = StableDiffusion_1.from_pretrained(tmp_path)
    tensors, deltas = kohya_lora(references, 1)
    assert any(".proj_in" in delta[1] for delta in deltas) and len(deltas) > 300
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    del tensors
    versions = {key: (tensor.data_ptr(), tensor._version) for key, tensor in sd.state_dict().items()}
    with torch.no_grad():
        plain = outputs(sd, references.unet, references.text_encoder, 768)[::2]
    LoraManager(sd).add("style", path, scale=0.6)
    for component in ("unet", "text_encoder"):  # fused into the references themselves: no copy of 4 GB
        fuse_by_hand(references.component(component), [delta for delta in deltas if delta[0] == component], 0.6)
    assert_matches(sd, references)
    LoraManager(sd).remove("style")
    assert {key: (tensor.data_ptr(), tensor._version) for key, tensor in sd.state_dict().items()} == versions
    with torch.no_grad():
        assert all(
            torch.equal(a, b) for a, b in zip(outputs(sd, references.unet, references.text_encoder, 768)[::2], plain)
        )


def test_refiners_generate_loads_lora_files_given_with_their_scales(
    references: DiffusersReferences, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors, _ = kohya_lora(references, 1)
    lora = tmp_path / "style.safetensors"
    save_file(tensors, lora)

    def generate(out: Path, *options: str) -> int:
        arguments = ["--model", str(references.folder), "--steps", "1", "--size", "32x32", "--seed", "0"]
        return main(["generate", PROMPT, *arguments, "--no-progress", "--out", str(out), *options])

    assert_lora_changes_only_its_generation(generate, tmp_path, f"{lora}:0.8")
    capsys.readouterr()
    assert generate(tmp_path / "missing.png", "--lora", str(tmp_path / "missing.safetensors")) == 2
    error = capsys.readouterr().err
    assert "--lora" in error and "missing.safetensors" in error
    assert not (tmp_path / "missing.png").exists()


def test_refiners_generate_runs_an_lcm_lora_layout_file_with_the_lcm_solver(
    references: DiffusersReferences, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LCM-LoRA for SD1.5 (latent-consistency/lcm-lora-sdv1-5) is a kohya file on the UNet only: `lora_unet_*`
    LoCon on every Linear and Conv2d, with alphas; it runs with `--solver lcm` and a low guidance."""
    tensors, _ = kohya_lora(references, 2)
    lora = tmp_path / "lcm_lora.safetensors"
    save_file({key: tensor for key, tensor in tensors.items() if key.startswith("lora_unet_")}, lora)

    def generate(out: Path, *options: str) -> int:
        arguments = ["--model", str(references.folder), "--steps", "2", "--size", "32x32", "--seed", "0"]
        return main(
            ["generate", PROMPT, *arguments, "--solver", "LCM", "--guidance", "1.5", "--out", str(out), *options]
        )

    assert generate(tmp_path / "plain.png", "--no-progress") == 0
    assert generate(tmp_path / "lcm.png", "--no-progress", "--lora", str(lora)) == 0
    assert "2 lcm steps" in capsys.readouterr().out
    plain, with_lora = (Image.open(tmp_path / name).tobytes() for name in ("plain.png", "lcm.png"))
    assert with_lora != plain
