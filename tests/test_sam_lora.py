"""LoRA from refiners-lora adapts SegmentAnything: injected in the image encoder and the mask decoder, ejected exactly.

Needs refiners-sam and refiners-lora together (run by `nox -s tests_all`). The model is a small SegmentAnything
(a 2-layer, 32-wide ViT on 128x128 inputs, the published prompt encoder and mask decoder) with random weights.
"""

from __future__ import annotations

import torch
from PIL import Image

import refiners_core.fluxion as fl
from refiners_lora import LoraAdapter
from refiners_sam import ImageEncoderConfig, SegmentAnything

CONFIG = ImageEncoderConfig(
    embedding_dim=32, num_layers=2, num_heads=2, global_attention_indices=(1,), window_size=3, image_size=128
)


def _sam() -> SegmentAnything:
    torch.manual_seed(0)
    sam = SegmentAnything(CONFIG)
    with torch.no_grad():
        for parameter in sam.parameters():
            parameter.normal_(0.0, 0.2)  # no zero relative positions: every layer does something
    return sam.eval()


def _inject(sam: SegmentAnything, rank: int = 4) -> list[LoraAdapter]:
    adapters: list[LoraAdapter] = []
    for chain in (sam.image_encoder, sam.mask_decoder):
        for linear, parent in chain.walk(fl.Linear):
            adapter = LoraAdapter(target=linear, rank=rank)
            adapter.inject(parent)
            adapters.append(adapter)
    return adapters


def _image() -> Image.Image:
    generator = torch.Generator().manual_seed(1)
    return Image.fromarray((torch.rand(64, 96, 3, generator=generator) * 255).to(torch.uint8).numpy())


def _predict(sam: SegmentAnything) -> tuple[torch.Tensor, torch.Tensor]:
    _, scores, logits = sam.predict(_image(), foreground_points=[(40.0, 30.0)], box_points=[[(5.0, 5.0), (80.0, 60.0)]])
    return scores, logits


def test_sam_lora_injects_into_every_linear_of_the_image_encoder_and_the_mask_decoder() -> None:
    sam = _sam()
    linears = len(list(sam.image_encoder.layers(fl.Linear))) + len(list(sam.mask_decoder.layers(fl.Linear)))
    adapters = _inject(sam)
    # encoder: 2 blocks x (qkv, proj, 2 feed-forward); decoder: 2 two-way blocks x (3 attentions x 4 + 2 MLP),
    # the final attention, 4 hypernetwork MLPs and the IoU head of 3 layers each
    assert len(adapters) == linears == 2 * 4 + 2 * (3 * 4 + 2) + 4 + 4 * 3 + 3
    assert all(isinstance(adapter.parent, fl.Chain) for adapter in adapters)
    image_encoder_adapters = list(sam.image_encoder.layers(LoraAdapter))
    assert len(image_encoder_adapters) == 2 * 4


def test_sam_lora_changes_predictions_and_ejecting_restores_them_exactly() -> None:
    sam = _sam()
    state = {key: value.clone() for key, value in sam.state_dict().items()}
    scores, logits = _predict(sam)
    adapters = _inject(sam)
    fresh_scores, fresh_logits = _predict(sam)
    assert torch.allclose(fresh_logits, logits, atol=1e-5)  # a fresh LoRA starts at zero
    for adapter in adapters:
        torch.nn.init.normal_(adapter.lora.up.weight, std=0.1)
    adapted_scores, adapted_logits = _predict(sam)
    assert (adapted_logits - logits).abs().max() > 1e-2
    for adapter in adapters:
        adapter.eject()
    assert sam.state_dict().keys() == state.keys()
    assert all(torch.equal(sam.state_dict()[key], value) for key, value in state.items())
    ejected_scores, ejected_logits = _predict(sam)
    assert torch.equal(ejected_logits, logits) and torch.equal(ejected_scores, scores)


def test_sam_lora_trains_only_the_lora_weights() -> None:
    sam = _sam()
    sam.requires_grad_(False)
    adapters = _inject(sam)
    lora_parameters = [parameter for adapter in adapters for parameter in adapter.lora.parameters()]
    for parameter in lora_parameters:
        parameter.requires_grad_(True)
    torch.nn.init.normal_(adapters[0].lora.up.weight, std=0.1)
    pixels = torch.randn(1, 3, 128, 128)
    embedding = sam.image_encoder(pixels)
    grid = sam.image_encoder.grid_size
    sam.mask_decoder.set_inputs(
        embedding, sam.point_encoder.positional_encoding.grid(grid, grid), sam.mask_encoder.no_mask(1, grid, grid)
    )
    tokens = sam.point_encoder(torch.tensor([[[10.0, 20.0]]]), torch.tensor([[1]]))
    logits, scores = sam.mask_decoder(tokens)
    (logits.mean() + scores.mean()).backward()
    trained = {id(parameter) for parameter in lora_parameters}
    assert all(parameter.grad is None for parameter in sam.parameters() if id(parameter) not in trained)
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in lora_parameters)
