"""`plan_lora`: the loader's matching and checks as one step that changes nothing and lists every key that cannot be
applied, with the reason; `LoraManager.add` refuses with the first of them, the same message."""

from __future__ import annotations

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.weights import WeightsError
from refiners_lora import LoraManager
from refiners_lora.plan import UNKNOWN_KEY, plan_lora


def net() -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(fl.Linear(8, 16), fl.SiLU(), fl.Conv2d(4, 6, kernel_size=3), fl.Linear(16, 4))


def bad_lora() -> dict[str, torch.Tensor]:
    return {
        "Linear_1.down.weight": torch.zeros(2, 8),
        "Linear_1.up.weight": torch.zeros(16, 2),
        "Linear_1.alpha": torch.tensor(1.0),
        "SiLU.down.weight": torch.zeros(2, 8),  # not a Linear nor a Conv2d
        "SiLU.up.weight": torch.zeros(8, 2),
        "Conv2d.down.weight": torch.zeros(2, 4, 3, 3),
        "Conv2d.up.weight": torch.zeros(7, 2, 1, 1),  # the convolution gives 6 channels
        "Linear_2.down.weight": torch.zeros(3, 16),  # no up weight
        "Linear_9.down.weight": torch.zeros(2, 8),  # no such layer
        "Linear_1.lokr_w1": torch.zeros(2, 2),  # a key of no known form
    }


def test_plan_lists_every_refused_and_unmatched_key_with_its_reason_in_the_file_order() -> None:
    model = net()

    plan = plan_lora(model, bad_lora(), "bad.safetensors")

    assert [(module.module, module.path, module.lora.rank, module.lora.alpha) for module in plan.modules] == [
        ("Linear_1", "Linear_1", 2, 1.0)
    ]
    assert [refusal.keys for refusal in plan.refused] == [
        ("SiLU.down.weight", "SiLU.up.weight"),
        ("Conv2d.down.weight", "Conv2d.up.weight"),
        ("Linear_2.down.weight",),
    ]
    reasons = [refusal.reason for refusal in plan.refused]
    assert (
        reasons[0]
        == "'SiLU.down.weight' targets layer `Chain.SiLU`, a SiLU: LoRA patches Linear and Conv2d layers only"
    )
    assert reasons[1].startswith("'Conv2d.up.weight' has shape (7, 2, 1, 1) but layer `Chain.Conv2d` (Conv2d 4 -> 6")
    assert reasons[2] == "'Linear_2.down.weight' has no up weights beside it (LoRA for layer `Chain.Linear_2`)"
    assert all(r.message == f"bad.safetensors: {r.reason}" for r in plan.refused)
    assert plan.unmatched == {
        "Linear_1.lokr_w1": UNKNOWN_KEY,
        "Linear_9.down.weight": "Chain has no layer at 'Linear_9'",
    }


def test_the_loader_refuses_with_the_plans_first_refusal_and_changes_nothing() -> None:
    model = net()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    first = plan_lora(model, bad_lora(), "LoRA state dict 'bad'").refused[0].message

    with pytest.raises(WeightsError) as error:
        LoraManager(model).add("bad", bad_lora())

    assert str(error.value) == first
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())


def test_meta_tensors_are_planned_from_their_shapes_and_alphas_read() -> None:
    meta = {
        "Linear_1.down.weight": torch.empty(2, 8, device="meta"),
        "Linear_1.up.weight": torch.empty(16, 2, device="meta"),
        "Linear_1.alpha": torch.tensor(4.0),
        "Conv2d.down.weight": torch.empty(2, 5, 3, 3, device="meta"),
        "Conv2d.up.weight": torch.empty(6, 2, 1, 1, device="meta"),
    }

    plan = plan_lora(net(), meta, "meta.safetensors")

    assert [(module.path, module.lora.alpha) for module in plan.modules] == [("Linear_1", 4.0)]
    assert plan.refused[0].reason.startswith("'Conv2d.down.weight' has shape (2, 5, 3, 3) but layer `Chain.Conv2d`")
