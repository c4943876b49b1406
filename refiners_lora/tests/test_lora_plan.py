"""`plan_lora`: the loader's matching and checks as one step that changes nothing and lists every key that cannot be
applied, with the reason; `LoraManager.add` refuses with the first of them, the same message."""

from __future__ import annotations

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.weights import WeightsError
from refiners_lora import LoraManager
from refiners_lora.planning import UNKNOWN_KEY, plan_lora


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
        "Linear_1.bogus": torch.zeros(2, 2),  # a key of no known form
        "Linear_2.oft_blocks": torch.zeros(4, 4, 4),  # a family refiners-lora does not apply
    }


def test_plan_lists_every_refused_and_unmatched_key_with_its_reason_in_the_file_order() -> None:
    model = net()

    plan = plan_lora(model, bad_lora(), "bad.safetensors")

    assert [(m.module, m.path, m.family, m.rank, m.alpha) for m in plan.applicable] == [
        ("Linear_1", "Linear_1", "lora", 2, 1.0)
    ]
    assert [refusal.keys for refusal in plan.refused] == [
        ("Linear_2.oft_blocks",),
        ("SiLU.down.weight", "SiLU.up.weight"),
        ("Conv2d.down.weight", "Conv2d.up.weight"),
        ("Linear_2.down.weight",),
    ]
    reasons = [refusal.reason for refusal in plan.refused]
    assert reasons[0].startswith("'Linear_2.oft_blocks' is a OFT / BOFT (LyCORIS) weight, a family refiners-lora")
    assert (
        reasons[1]
        == "'SiLU.down.weight' targets layer `Chain.SiLU`, a SiLU: LoRA patches Linear and Conv2d layers only"
    )
    assert reasons[2].startswith("'Conv2d.up.weight' has shape (7, 2, 1, 1) but layer `Chain.Conv2d` (Conv2d 4 -> 6")
    assert reasons[3] == "'Linear_2.down.weight' has no up weights beside it (LoRA for layer `Chain.Linear_2`)"
    assert all(r.message == f"bad.safetensors: {r.reason}" for r in plan.refused)
    assert plan.unmatched_reasons == {
        "Linear_1.bogus": UNKNOWN_KEY,
        "Linear_9.down.weight": "Chain has no layer at 'Linear_9'",
    }


def test_the_loader_refuses_with_the_plans_first_refusal_and_changes_nothing() -> None:
    model = net()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    tensors = bad_lora()
    del tensors["Linear_2.oft_blocks"]
    plan = plan_lora(model, tensors, "LoRA state dict 'bad'")
    first = plan.refused[0].message

    with pytest.raises(WeightsError) as error:
        LoraManager(model).add("bad", tensors)

    assert str(error.value) == first and first.startswith("LoRA state dict 'bad': 'SiLU.down.weight' targets")
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())
    with pytest.raises(WeightsError, match="'Linear_2.oft_blocks' is a OFT / BOFT"):  # checked first, as before
        LoraManager(model).add("bad", bad_lora())


def test_meta_tensors_are_planned_from_their_shapes_and_alphas_read() -> None:
    meta = {
        "Linear_1.down.weight": torch.empty(2, 8, device="meta"),
        "Linear_1.up.weight": torch.empty(16, 2, device="meta"),
        "Linear_1.alpha": torch.tensor(4.0),
        "Conv2d.hada_w1_a": torch.empty(6, 2, device="meta"),
        "Conv2d.hada_w1_b": torch.empty(2, 36, device="meta"),
        "Conv2d.hada_w2_a": torch.empty(6, 2, device="meta"),
        "Conv2d.hada_w2_b": torch.empty(2, 36, device="meta"),
        "Linear_2.down.weight": torch.empty(2, 5, device="meta"),
        "Linear_2.up.weight": torch.empty(4, 2, device="meta"),
    }

    plan = plan_lora(net(), meta, "meta.safetensors")

    assert [(m.path, m.family, m.rank, m.alpha) for m in plan.applicable] == [
        ("Linear_1", "lora", 2, 4.0),
        ("Conv2d", "loha", 2, None),
    ]
    assert plan.refused[0].reason.startswith("'Linear_2.down.weight' has shape (2, 5) but layer `Chain.Linear_2`")
