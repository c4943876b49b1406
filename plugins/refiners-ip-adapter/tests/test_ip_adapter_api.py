"""`IPAdapter`'s contract: inject / eject restore the UNet exactly, the scale changes without a rebuild, `.bin` and
`.safetensors` releases load the same, and bad input (weights of another kind, SD1.5 weights on an SDXL UNet and the
reverse, an image encoder of other widths, unusable images, bad embeddings) is refused naming it, the UNet untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import refiners_core.fluxion as fl
from refiners_clip_vision import CLIPImageEncoder
from refiners_clip_vision.testing import SMALL_VIT_BIGG, SMALL_VIT_H, write_reference_folder
from refiners_core.weights import WeightsError, load_tensors, save_tensors
from refiners_ip_adapter import KINDS, ImageCrossAttention, IPAdapter, text_cross_attentions
from refiners_ip_adapter.testing import SMALL_SD15_UNET, released_weights, write_release_folder
from refiners_sd15.unet import SD1UNet, unet_config_from_diffusers
from refiners_sdxl import SDXLUNet
from refiners_sdxl.testing import SMALL_UNET as SMALL_SDXL_UNET


def small_unet(seed: int = 0) -> SD1UNet:
    torch.manual_seed(seed)
    return SD1UNet(unet_config_from_diffusers(SMALL_SD15_UNET)).eval()


def small_sdxl_unet() -> SDXLUNet:
    torch.manual_seed(0)
    return SDXLUNet(unet_config_from_diffusers(SMALL_SDXL_UNET)).eval()


def release(folder: Path, unet: fl.Chain, projection: str = "linear", name: str = "ip.safetensors", **kw: int) -> Path:
    attentions = text_cross_attentions(unet)
    tensors = released_weights(
        projection,  # pyright: ignore[reportArgumentType]
        image_embedding_dim=kw.get("image_dim", SMALL_VIT_H.projection_dim if projection == "linear" else 32),
        cross_attention_dim=kw.get("cross_dim", attentions[0].key_embedding_dim),
        inner_dims=[attention.inner_dim for attention in attentions],
        seed=kw.get("seed", 0),
    )
    return write_release_folder(folder, name, tensors, SMALL_VIT_H)


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8))


def run(unet: SD1UNet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    unet.set_timestep(torch.tensor([500]))
    unet.set_clip_text_embedding(torch.randn(2, 7, 24, generator=generator))
    with torch.no_grad():
        return unet(torch.randn(2, 4, 16, 16, generator=generator))


def snapshot(unet: fl.Chain) -> tuple[str, dict[str, torch.Tensor], dict[str, list[str]]]:
    contexts = {name: sorted(values) for name, values in unet.provider.contexts.items()}
    return repr(unet), {key: value.clone() for key, value in unet.state_dict().items()}, contexts


def assert_same(
    before: tuple[str, dict[str, torch.Tensor], object], after: tuple[str, dict[str, torch.Tensor], object]
):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][key], after[1][key]) for key in before[1])
    assert before[2] == after[2]


@pytest.mark.parametrize("projection", ["linear", "perceiver"])
def test_inject_then_eject_restores_the_unet_exactly(tmp_path: Path, projection: str) -> None:
    unet = small_unet()
    weights = release(tmp_path, unet, projection)
    output = run(unet)
    before = snapshot(unet)
    ip = IPAdapter.from_pretrained(unet, weights, scale=0.8)
    assert_same(before, snapshot(unet))  # building touches nothing
    ip.inject().set_image_embedding(ip.compute_image_embedding([image(0), image(1)]))
    assert len(list(unet.layers(ImageCrossAttention))) == 7
    adapted = run(unet)
    assert (adapted - output).abs().max() > 1e-3  # the images steer the UNet
    ip.eject()
    assert_same(before, snapshot(unet))
    assert torch.equal(run(unet), output)
    ip.inject()  # the embedding stays with the adapter
    assert torch.equal(run(unet), adapted)


def test_scale_changes_without_rebuilding_and_zero_is_the_plain_unet(tmp_path: Path) -> None:
    unet = small_unet()
    weights = release(tmp_path, unet)
    plain = run(unet)
    ip = IPAdapter.from_pretrained(unet, weights, scale=0.5).inject()
    ip.set_image_embedding(ip.compute_image_embedding(image()))
    at_half = run(unet)
    ip.scale = 1.0
    assert ip.scale == 1.0 and not torch.equal(run(unet), at_half)
    ip.scale = 0.5
    assert torch.equal(run(unet), at_half)
    ip.scale = 0.0
    assert torch.allclose(run(unet), plain, atol=1e-5)
    with pytest.raises(ValueError, match="IP-Adapter scale must be a finite number, got nan"):
        ip.scale = float("nan")


def test_bin_and_safetensors_releases_give_the_same_adapter(tmp_path: Path) -> None:
    unet = small_unet()
    safetensors = release(tmp_path, unet, "perceiver", name="ip.safetensors")
    bin_file = release(tmp_path, unet, "perceiver", name="ip.bin")
    embeddings = [
        IPAdapter.from_pretrained(unet, path).compute_image_embedding(image()) for path in (safetensors, bin_file)
    ]
    assert torch.equal(*embeddings)


def test_weights_of_another_kind_are_refused_naming_the_file(tmp_path: Path) -> None:
    unet = small_unet()
    path = tmp_path / "lora.safetensors"
    save_tensors(path, {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 32)})
    write_reference_folder(tmp_path / "image_encoder", SMALL_VIT_H)
    before = snapshot(unet)
    with pytest.raises(WeightsError, match=f"{path}: not IP-Adapter weights: expected 'image_proj.*'"):
        IPAdapter.from_pretrained(unet, path)
    assert_same(before, snapshot(unet))


def test_an_unsupported_ip_adapter_variant_is_refused_naming_the_key(tmp_path: Path) -> None:
    unet = small_unet()
    tensors = {"image_proj.proj.0.weight": torch.zeros(8, 8), "image_proj.proj.3.weight": torch.zeros(8)}
    path = write_release_folder(
        tmp_path, "full-face.safetensors", tensors | {"ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, SMALL_VIT_H
    )
    with pytest.raises(WeightsError, match="'image_proj.proj.3.weight': IP-Adapter Full Face .* is not supported"):
        IPAdapter.from_pretrained(unet, path)


def test_sd15_weights_on_an_sdxl_unet_are_refused(tmp_path: Path) -> None:
    unet = small_sdxl_unet()
    sd15 = next(kind for kind in KINDS if kind.names[0] == "ip-adapter_sd15")
    path = release(tmp_path, unet, cross_dim=sd15.cross_attention_dim, image_dim=sd15.image_embedding_dim)
    before = snapshot(unet)
    with pytest.raises(
        WeightsError,
        match="ip-adapter_sd15 / ip-adapter_sd15_light weights .* are for SD15, they do not fit the SDXLUNet",
    ):
        IPAdapter.from_pretrained(unet, path)
    assert_same(before, snapshot(unet))


def test_sdxl_weights_on_an_sd15_unet_are_refused(tmp_path: Path) -> None:
    unet = small_unet()
    sdxl = next(kind for kind in KINDS if kind.names[0] == "ip-adapter_sdxl")
    path = release(tmp_path, unet, cross_dim=sdxl.cross_attention_dim, image_dim=sdxl.image_embedding_dim)
    before = snapshot(unet)
    with pytest.raises(
        WeightsError, match=r"ip-adapter_sdxl weights \(sdxl, ViT-bigG/14\) are for SDXL, they do not fit the SD1UNet"
    ):
        IPAdapter.from_pretrained(unet, path)
    assert_same(before, snapshot(unet))


def test_weights_for_other_cross_attention_layers_are_refused_naming_the_key(tmp_path: Path) -> None:
    unet = small_unet()
    path = release(tmp_path, small_sdxl_unet(), cross_dim=24)  # other layers: SDXL's small UNet has 8
    with pytest.raises(WeightsError, match="weights for 8 cross-attention layers, the SD1UNet at `SD1UNet` has 7"):
        IPAdapter.from_pretrained(unet, path)


def test_an_image_encoder_of_other_widths_is_refused_naming_the_key(tmp_path: Path) -> None:
    unet = small_unet()
    path = release(tmp_path, unet)
    write_reference_folder(tmp_path / "other", SMALL_VIT_BIGG)
    with pytest.raises(
        WeightsError,
        match=r"'image_proj.proj.weight' reads image features of 24, the image encoder .*other gives projected image "
        r"embeddings \(projection_dim\) of 32",
    ):
        IPAdapter.from_pretrained(unet, path, image_encoder=tmp_path / "other")
    with pytest.raises(WeightsError, match="reads image features of 24"):
        IPAdapter.from_pretrained(unet, path, image_encoder=CLIPImageEncoder(SMALL_VIT_BIGG))


def test_a_missing_image_encoder_is_refused_naming_where_it_was_looked_for(tmp_path: Path) -> None:
    unet = small_unet()
    path = tmp_path / "weights" / "ip.safetensors"
    path.parent.mkdir()
    attentions = text_cross_attentions(unet)
    save_tensors(
        path,
        released_weights(
            "linear", image_embedding_dim=24, cross_attention_dim=24, inner_dims=[a.inner_dim for a in attentions]
        ),
    )
    with pytest.raises(FileNotFoundError, match="no image encoder given, and no image_encoder/ folder"):
        IPAdapter.from_pretrained(unet, path)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (["ref.png"], TypeError, r"images\[0\]: image must be a PIL.Image.Image, got str"),
        ([Image.new("RGB", (0, 4))], ValueError, r"images\[0\]: the image is 0x4: it has no pixels"),
        (
            [image(), Image.fromarray(np.full((8, 8), np.nan, np.float32), "F")],
            ValueError,
            r"images\[1\]: image: F image",
        ),
    ],
)
def test_unusable_images_are_refused_naming_them(tmp_path: Path, images: list[Image.Image], error: type, message: str):
    ip = IPAdapter.from_pretrained(small_unet(), release(tmp_path, small_unet()))
    with pytest.raises(error, match=message):
        ip.compute_image_embedding(images)


def test_a_bad_image_embedding_is_refused(tmp_path: Path) -> None:
    unet = small_unet()
    ip = IPAdapter.from_pretrained(unet, release(tmp_path, unet)).inject()
    with pytest.raises(ValueError, match=r"must be \(B, tokens, 24\), got \(2, 4, 7\)"):
        ip.set_image_embedding(torch.zeros(2, 4, 7))
    with pytest.raises(ValueError, match="has 1 NaN"):
        ip.set_image_embedding(
            torch.zeros(2, 4, 24)
            .index_fill_(1, torch.tensor([0]), 0)
            .put_(torch.tensor([3]), torch.tensor(float("nan")))
        )
    with pytest.raises(fl.ContextError, match="has no image embedding: call ip_adapter.set_image_embedding"):
        run(unet)


def test_inject_twice_and_eject_without_inject_are_errors(tmp_path: Path) -> None:
    unet = small_unet()
    ip = IPAdapter.from_pretrained(unet, release(tmp_path, unet))
    with pytest.raises(fl.AdapterError, match="not injected"):
        ip.eject()
    ip.inject()
    with pytest.raises(fl.AdapterError, match="already injected"):
        ip.inject()


def test_a_unet_of_another_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="IP-Adapter adapts a SD1UNet .* got Chain"):
        IPAdapter.from_pretrained(fl.Chain(fl.Linear(2, 2)), tmp_path / "ip.safetensors")


def test_two_ip_adapters_stack_and_eject_in_any_order(tmp_path: Path) -> None:
    unet = small_unet()
    output = run(unet)
    before = snapshot(unet)
    first = IPAdapter.from_pretrained(unet, release(tmp_path / "a", unet, seed=1), scale=0.6).inject()
    second = IPAdapter.from_pretrained(unet, release(tmp_path / "b", unet, "perceiver", seed=2), scale=0.9).inject()
    first.set_image_embedding(first.compute_image_embedding(image(0)))
    second.set_image_embedding(second.compute_image_embedding(image(1)))
    both = run(unet)
    first.eject()
    only_second = run(unet)
    assert not torch.equal(both, only_second)
    first.inject()  # now after the second: the same sum, added in another order
    assert torch.allclose(run(unet), both, atol=1e-6)
    second.eject()
    first.eject()
    assert_same(before, snapshot(unet))
    assert torch.equal(run(unet), output)


def test_the_adapter_weights_are_checked_before_the_image_encoder_weights_are_read(tmp_path: Path) -> None:
    unet = small_unet()
    path = release(tmp_path, unet)
    tensors = load_tensors(path)
    del tensors["ip_adapter.3.to_v_ip.weight"]
    save_tensors(path, tensors)
    (tmp_path / "image_encoder" / "model.safetensors").write_bytes(b"not weights")  # would fail if read first
    with pytest.raises(
        WeightsError, match=r"ip.safetensors: no weights for 1 key\(s\) .*'ip_adapter.3.to_v_ip.weight'"
    ):
        IPAdapter.from_pretrained(unet, path)
