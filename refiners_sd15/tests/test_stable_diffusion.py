"""`StableDiffusion_1` loading: diffusers folders, hub ids (offline cache), variants, .bin files, single-file
checkpoints and our own format, with the errors a user gets for missing, truncated or mismatched weights; with
`mmap=True`, the same model whose parameters are views of the files.

References are diffusers `UNet2DConditionModel`, `AutoencoderKL` and transformers `CLIPTextModel` built from small
configs with every parameter perturbed, written with `save_pretrained` in the diffusers layout. Outputs are compared
in fp32 within 1e-4 of max |reference| (the full architectures are covered by the per-component parity tests); a
model loaded with `mmap=True` has bitwise the default load's weights and its outputs within 1e-5.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel  # type: ignore[import-untyped]
from transformers import CLIPTextConfig, CLIPTextModel  # type: ignore[import-untyped]

from refiners_core.plugins import registry, resolve
from refiners_core.state_dicts import invert
from refiners_core.testing import CAN_READ_MAPPINGS, assert_relative_close, is_mapped, parameters_viewing
from refiners_core.weights import WeightsError, save_tensors
from refiners_sd15 import SD1Autoencoder, SD1UNet, StableDiffusion_1
from refiners_sd15.solvers import DDIM
from refiners_sd15.testing import SMALL_CLIP_TRANSFORMERS_CONFIG

TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,  # the tiny text encoder's width
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
# Single-file checkpoints do not record heads or normalisation groups: the tiny configs (and the text encoder's,
# SMALL_CLIP_TRANSFORMERS_CONFIG) keep SD1.5's conventions (8 UNet heads, groups of 32, CLIP heads of 64 dimensions)
# so that they can be read back from one.
PROMPT = "a photograph of an astronaut riding a horse"
MMAP_TOLERANCE = 1e-5
"""How far a model loaded with `mmap=True` may be from the default load (relative to max |output|): float32 rounding."""


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


class References:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(**TINY_UNET).eval()
        self.vae = AutoencoderKL(**TINY_VAE).eval()
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**SMALL_CLIP_TRANSFORMERS_CONFIG)).eval()
        for seed, model in enumerate((self.unet, self.vae, self.text_encoder)):
            _perturb(model, seed)

    def save(self, folder: Path, **options: Any) -> Path:
        self.unet.save_pretrained(folder / "unet", **options)
        self.vae.save_pretrained(folder / "vae", **options)
        self.text_encoder.save_pretrained(folder / "text_encoder", **options)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        return folder


@pytest.fixture(scope="module")
def references() -> References:
    return References()


@pytest.fixture(scope="module")
def diffusers_folder(references: References, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return references.save(tmp_path_factory.mktemp("sd15"))


def _assert_matches(sd: StableDiffusion_1, references: References) -> None:
    with torch.no_grad():
        tokens = sd.clip_text_encoder.tokenizer(PROMPT)
        reference_text = references.text_encoder(tokens).last_hidden_state
        assert_relative_close(sd.clip_text_encoder(PROMPT), reference_text, 1e-4)

        latents = torch.randn(2, 4, 8, 8)
        text = torch.randn(2, 77, 64)  # the tiny UNet's cross-attention width
        timestep = torch.tensor([500])
        sd.unet.set_timestep(timestep)
        sd.unet.set_clip_text_embedding(text)
        reference_noise = references.unet(latents, timestep, encoder_hidden_states=text).sample
        assert_relative_close(sd.unet(latents), reference_noise, 1e-4)

        reference_image = references.vae.decode(latents[:1] / 0.18215).sample  # type: ignore[arg-type, union-attr]
        assert_relative_close(sd.lda.decode(latents[:1]), reference_image, 1e-4)


def test_from_pretrained_reads_a_diffusers_folder(diffusers_folder: Path, references: References) -> None:
    _assert_matches(StableDiffusion_1.from_pretrained(diffusers_folder), references)


def test_tokenizer_and_scheduler_folders_are_not_needed(diffusers_folder: Path) -> None:
    assert not (diffusers_folder / "tokenizer").exists() and not (diffusers_folder / "scheduler").exists()
    StableDiffusion_1.from_pretrained(diffusers_folder)


def test_a_v_prediction_scheduler_config_is_a_solver_default_kept_by_save_pretrained(
    diffusers_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "v_prediction"
    shutil.copytree(diffusers_folder, folder)
    (folder / "scheduler").mkdir()
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
    config_path.write_text(json.dumps(config))

    sd = StableDiffusion_1.from_pretrained(folder)
    sd.solver = DDIM(num_inference_steps=3)
    sd.save_pretrained(tmp_path / "own")

    assert sd.solver.prediction_type == "v_prediction" and sd.solver_defaults == {"prediction_type": "v_prediction"}
    assert DDIM(num_inference_steps=3).prediction_type == "epsilon"  # off a model
    assert StableDiffusion_1.from_pretrained(tmp_path / "own").solver.prediction_type == "v_prediction"
    assert StableDiffusion_1.from_pretrained(diffusers_folder).solver_defaults == {}  # no scheduler/: the solvers' own
    config_path.write_text(json.dumps({**config, "prediction_type": "flow_prediction"}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type is 'flow_prediction', our solvers"):
        StableDiffusion_1.from_pretrained(folder)


def test_compute_clip_text_embedding_puts_the_negative_prompt_first(diffusers_folder: Path) -> None:
    sd = StableDiffusion_1.from_pretrained(diffusers_folder)
    embedding = sd.compute_clip_text_embedding(PROMPT, negative_text="blurry")
    assert embedding.shape == (2, 77, 64)
    with torch.no_grad():
        assert torch.allclose(embedding[0], sd.clip_text_encoder("blurry")[0], atol=1e-6)
        assert torch.allclose(embedding[1], sd.clip_text_encoder(PROMPT)[0], atol=1e-6)


def test_from_pretrained_reads_bin_files(references: References, tmp_path: Path) -> None:
    folder = references.save(tmp_path, safe_serialization=False)
    assert list((folder / "unet").glob("*.bin")) and not list((folder / "unet").glob("*.safetensors"))
    _assert_matches(StableDiffusion_1.from_pretrained(folder), references)


def test_from_pretrained_reads_the_fp16_variant(references: References, tmp_path: Path) -> None:
    folder = references.save(tmp_path, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    sd = StableDiffusion_1.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    assert sd.unet.dtype == torch.float32
    expected = references.unet.conv_in.weight
    assert torch.equal(sd.unet.state_dict()[_our_key(sd.unet, "conv_in.weight")], expected)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        StableDiffusion_1.from_pretrained(folder)


def _our_key(unet: SD1UNet, diffusers_key: str) -> str:
    mapping = SD1UNet.component_format.diffusers_mapping(unet.config, [])
    return mapping[diffusers_key]


def test_a_missing_component_is_named(diffusers_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no_vae"
    shutil.copytree(diffusers_folder, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=r"^no .*no_vae/vae folder, so no autoencoder: "):
        StableDiffusion_1.from_pretrained(folder)


def test_a_truncated_weights_file_is_named(diffusers_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "truncated"
    shutil.copytree(diffusers_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"truncated/unet/diffusion_pytorch_model\.safetensors"):
        StableDiffusion_1.from_pretrained(folder)


def test_weights_of_another_architecture_are_refused_with_key_path_and_shapes(
    references: References, tmp_path: Path
) -> None:
    folder = references.save(tmp_path)
    other = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 48})
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", folder / "unet")
    with pytest.raises(WeightsError) as error:
        StableDiffusion_1.from_pretrained(folder)
    message = str(error.value)
    assert "diffusion_pytorch_model.safetensors" in message
    assert "attn2.to_k.weight' has shape (32, 48)" in message
    assert "SD1UNet." in message and "expects (32, 64)" in message


def test_a_unet_wider_than_its_text_encoder_is_refused_naming_both_widths(
    diffusers_folder: Path, tmp_path: Path
) -> None:
    """An SD2-width UNet (its weights are never read) next to the 64-wide text encoder: refused at load time."""
    folder = tmp_path / "sd2_unet"
    shutil.copytree(diffusers_folder, folder)
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "cross_attention_dim": 1024}))
    with pytest.raises(ValueError, match=r"unet attends to 1024-wide text .* text_encoder gives 64-wide"):
        StableDiffusion_1.from_pretrained(folder)


def test_an_unsupported_config_names_the_file_and_field(diffusers_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "class_embedding"
    shutil.copytree(diffusers_folder, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(ValueError, match=r"unet/config\.json.*class_embed_type"):
        StableDiffusion_1.from_pretrained(folder)


def test_from_pretrained_resolves_a_hub_id_from_the_offline_cache(diffusers_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-sd15" / "snapshots" / ("0" * 40)
    shutil.copytree(diffusers_folder, snapshot)
    (cache / "models--acme--tiny-sd15" / "refs").mkdir()
    (cache / "models--acme--tiny-sd15" / "refs" / "main").write_text("0" * 40)
    script = textwrap.dedent(
        """
        from refiners_sd15 import StableDiffusion_1
        sd = StableDiffusion_1.from_pretrained("acme/tiny-sd15")
        print(sum(p.numel() for p in sd.parameters()))
        """
    )
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    expected = sum(p.numel() for p in StableDiffusion_1.from_pretrained(diffusers_folder).parameters())
    assert int(result.stdout.split()[-1]) == expected


def _single_file_checkpoint(references: References, sd: StableDiffusion_1) -> dict[str, torch.Tensor]:
    """An original-layout checkpoint made from the references through our ldm mappings (which the component
    tests check against diffusers' own single-file converters), plus entries a real one has beside the models."""
    checkpoint: dict[str, torch.Tensor] = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)}
    parts = (
        (sd.unet, references.unet),
        (sd.lda, references.vae),
        (sd.clip_text_encoder, references.text_encoder),
    )
    for model, reference in parts:
        component = model.component_format
        state = reference.state_dict()
        to_ours = component.diffusers_mapping(model.config, state.keys())
        to_ldm = invert(component.single_file_mapping(model.config))
        for key, tensor in state.items():
            if key in component.ignored_keys:
                continue
            checkpoint[component.single_file_prefix + to_ldm[to_ours[key]]] = tensor
    return checkpoint


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_from_pretrained_reads_an_original_single_file_checkpoint(
    references: References, diffusers_folder: Path, tmp_path: Path, suffix: str
) -> None:
    checkpoint = _single_file_checkpoint(references, StableDiffusion_1.from_pretrained(diffusers_folder))
    path = tmp_path / f"v1-5-pruned{suffix}"
    if suffix == ".safetensors":
        save_tensors(path, checkpoint)
    else:
        torch.save({"state_dict": checkpoint}, path)
    _assert_matches(StableDiffusion_1.from_pretrained(path), references)


def test_save_pretrained_round_trips_our_own_format(diffusers_folder: Path, tmp_path: Path) -> None:
    sd = StableDiffusion_1.from_pretrained(diffusers_folder)
    sd.save_pretrained(tmp_path / "ours")
    loaded = StableDiffusion_1.from_pretrained(tmp_path / "ours")
    original, reloaded = sd.state_dict(), loaded.state_dict()
    assert list(original) == list(reloaded)
    assert all(torch.equal(original[key], reloaded[key]) for key in original)


def test_a_component_saved_alone_loads_back(diffusers_folder: Path, tmp_path: Path) -> None:
    lda = SD1Autoencoder.from_pretrained(diffusers_folder)
    lda.save(tmp_path / "lda.safetensors")
    loaded = SD1Autoencoder.from_pretrained(tmp_path / "lda.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(lda.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(WeightsError, match="holds a 'autoencoder', not a 'unet'"):
        SD1UNet.from_pretrained(tmp_path / "lda.safetensors")


def test_from_pretrained_puts_every_tensor_on_the_requested_dtype(diffusers_folder: Path) -> None:
    sd = StableDiffusion_1.from_pretrained(diffusers_folder, dtype=torch.float64)
    tensors = [*sd.parameters(), *sd.buffers()]
    assert tensors and all(tensor.dtype == torch.float64 for tensor in tensors)


def _written(layout: str, references: References, diffusers_folder: Path, folder: Path) -> tuple[Path, list[Path]]:
    """The references written in `layout` under `folder` (a fresh one: no other test maps its files): what
    `from_pretrained` takes, and the weight files."""
    if layout == "diffusers":
        source = references.save(folder)
    elif layout == "sharded":
        source = references.save(folder, max_shard_size="1MB")
        assert list((source / "unet").glob("*.index.json")), "the UNet was not sharded"
    elif layout == "own":
        source = folder / "own"
        StableDiffusion_1.from_pretrained(diffusers_folder).save_pretrained(source)
    else:
        source = folder / f"v1-5-pruned{layout.removeprefix('single ')}"
        checkpoint = _single_file_checkpoint(references, StableDiffusion_1.from_pretrained(diffusers_folder))
        if source.suffix == ".safetensors":
            save_tensors(source, checkpoint)
        else:
            torch.save({"state_dict": checkpoint}, source)
        return source, [source]
    return source, [path for path in source.rglob("*") if path.suffix in (".safetensors", ".bin")]


def _unet_output(sd: StableDiffusion_1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 64, generator=generator)
    with torch.no_grad():
        sd.unet.set_timestep(torch.tensor([500]))
        sd.unet.set_clip_text_embedding(text)
        return sd.unet(latents)


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
@pytest.mark.parametrize("layout", ["diffusers", "sharded", "own", "single .safetensors", "single .ckpt"])
def test_from_pretrained_with_mmap_loads_the_default_model_as_views_of_its_files(
    layout: str, references: References, diffusers_folder: Path, tmp_path: Path
) -> None:
    source, files = _written(layout, references, diffusers_folder, tmp_path)
    copied = StableDiffusion_1.from_pretrained(source)
    mapped = StableDiffusion_1.from_pretrained(source, mmap=True)

    views, copies = parameters_viewing(mapped, files)
    assert views and not copies, f"{len(copies)} parameters copied out of the mapped files, e.g. {copies[:1]}"
    assert not parameters_viewing(copied, files)[0]
    expected = copied.state_dict()
    assert list(mapped.state_dict()) == list(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in mapped.state_dict().items())
    # Equal weights, not always bitwise-equal outputs: the copy aligns each tensor to 64 bytes, a file may align
    # them to 8 only (diffusers' shards do), and BLAS kernels then sum in another order (a few float32 ulps).
    assert_relative_close(_unet_output(mapped), _unet_output(copied), MMAP_TOLERANCE, what="mapped UNet")
    _assert_matches(mapped, references)


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
def test_from_pretrained_with_mmap_and_another_dtype_converts_and_keeps_no_mapping(
    references: References, tmp_path: Path
) -> None:
    folder = references.save(tmp_path)
    sd = StableDiffusion_1.from_pretrained(folder, dtype=torch.float64, mmap=True)

    tensors = [*sd.parameters(), *sd.buffers()]
    assert tensors and all(tensor.dtype == torch.float64 for tensor in tensors)
    gc.collect()  # the mapped tensors the conversion read from are garbage once loaded
    assert not [path for path in folder.rglob("*.safetensors") if is_mapped(path)]
    expected = StableDiffusion_1.from_pretrained(folder, dtype=torch.float64).state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in sd.state_dict().items())


def test_the_model_is_registered_with_the_plugin_manager() -> None:
    spec = registry(reload=True).models["sd15"]
    assert resolve(spec.loader) == StableDiffusion_1.from_pretrained


def test_architecture_builds_what_from_pretrained_would_on_meta_from_configs_only(
    references: References, diffusers_folder: Path, tmp_path: Path
) -> None:
    sd = StableDiffusion_1.from_pretrained(diffusers_folder)
    assert sd.unet.config != StableDiffusion_1(device="meta").unet.config  # the small test model is not the published
    sd.save_pretrained(tmp_path / "ours")
    single, checkpoint = tmp_path / "v1-5.safetensors", tmp_path / "v1-5.ckpt"
    save_tensors(single, _single_file_checkpoint(references, sd))
    torch.save({"state_dict": _single_file_checkpoint(references, sd)}, checkpoint)

    for source in (diffusers_folder, tmp_path / "ours", single):
        built = StableDiffusion_1.architecture(source)
        assert built.unet.config == sd.unet.config, source
        assert built.clip_text_encoder.config == sd.clip_text_encoder.config, source
        assert all(parameter.is_meta for parameter in built.parameters()), source
    published = StableDiffusion_1.architecture()
    assert published.unet.config == StableDiffusion_1(device="meta").unet.config
    assert all(parameter.is_meta for parameter in published.parameters())
    assert registry().models["sd15"].architecture is not None
    with pytest.raises(ValueError, match=r"v1-5.ckpt: the architecture of a single file is read from a safetensors"):
        StableDiffusion_1.architecture(checkpoint)
