"""The README's Adapter API example: LoRA in every linear layer of the toy ViT's attentions, then ejected.

`ViT` is the README's model (`refiners_core.testing.readme_vit`). The full-size model runs the example itself; the
gradient check uses a reduced configuration of the same class to keep CPU runs fast.
"""

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.testing.readme_vit import ViT
from refiners_lora import LoraAdapter


def inject_readme_loras(vit: fl.Chain, rank: int = 64) -> list[LoraAdapter]:
    """The README loop, collecting the adapters it creates."""
    adapters: list[LoraAdapter] = []
    for layer in vit.layers(fl.Attention):
        for linear, parent in layer.walk(fl.Linear):
            adapters.append(LoraAdapter(target=linear, rank=rank, device=vit.device, dtype=vit.dtype).inject(parent))  # type: ignore[arg-type]
    return adapters


def test_readme_adapter_example_injects_and_ejects_loras_exactly() -> None:
    torch.manual_seed(0)
    vit = ViT(embedding_dim=768, image_size=224, num_heads=12)  # ~ViT-B/16 like
    x = torch.randn(1, 3, 224, 224)  # one image keeps the three full-size forwards affordable on CPU
    keys = list(vit.state_dict())
    tensors = [t.clone() for t in vit.state_dict().values()]
    parameters = {id(p) for p in vit.parameters()}
    targets = {
        name: layer for name, layer in vit.named_modules() if ".Attention." in name and isinstance(layer, fl.Linear)
    }
    assert len(targets) == 12 * 4
    with torch.inference_mode():
        expected = vit(x)

    adapters = inject_readme_loras(vit)

    assert len(adapters) == 12 * 4
    for attention in vit.layers(fl.Attention):
        assert len(list(attention.layers(LoraAdapter))) == 4
        assert list(dict(attention["Distribute"].named_children())) == ["Linear_1", "Linear_2", "Linear_3"]
    for name, target in targets.items():
        adapter = vit[name]
        assert isinstance(adapter, LoraAdapter) and adapter.target is target and adapter.rank == 64
    new = [p for p in vit.parameters() if id(p) not in parameters]
    assert len(new) == 2 * 48
    assert all(p.requires_grad for p in new)
    assert sum(p.numel() for p in new) == 48 * (768 * 64 + 64 * 768)
    with torch.inference_mode():
        assert torch.equal(vit(x), expected)  # a fresh LoRA is a no-op

    for adapter in adapters:
        adapter.eject()

    assert list(vit.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), tensors, strict=True))
    assert {id(p) for p in vit.parameters()} == parameters
    for name, target in targets.items():
        assert vit[name] is target
        assert target.get_path() == f"ViT.{name}"
    with torch.inference_mode():
        assert torch.equal(vit(x), expected)


@pytest.mark.parametrize("eject_order", ["forward", "reverse"])
def test_readme_loras_are_the_only_trainable_weights_of_a_frozen_vit(eject_order: str) -> None:
    torch.manual_seed(0)
    vit = ViT(embedding_dim=32, patch_size=8, image_size=32, num_layers=2, num_heads=4)
    vit.requires_grad_(False)
    adapters = inject_readme_loras(vit, rank=4)
    assert len(adapters) == 2 * 4
    vit(torch.randn(2, 3, 32, 32)).square().sum().backward()
    trainable = {name for name, p in vit.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in vit.named_parameters() if p.grad is not None}
    lora_names = {name for name, _ in vit.named_parameters() if ".Lora." in name}
    assert len(lora_names) == 2 * 4 * 2
    assert trainable == with_grad == lora_names
    for adapter in adapters:
        up = adapter.lora.up
        assert isinstance(up, fl.Linear) and up.weight.grad is not None and up.weight.grad.abs().sum() > 0
    for adapter in adapters if eject_order == "forward" else reversed(adapters):
        adapter.eject()
    assert not any(p.requires_grad for p in vit.parameters())
