"""Hot-swap slots (`LoraManager.enable_hotswap`) on a core-only model: LoRAs added, removed and replaced in slots give
the outputs of the same LoRAs loaded the usual way (within 1e-5 of max |reference|), the limits declared up front are
enforced in one line naming the file and the limit, and every refused call leaves the model as it was.

The no-recompilation promise under `torch.compile` is tested on a small SD1.5 UNet in the repository's
tests/test_lora_compile.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_core.testing import assert_relative_close, relative_error
from refiners_core.weights import WeightsError
from refiners_lora import LoraManager


def model() -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(
        fl.Conv2d(3, 8, kernel_size=3, padding=1),
        fl.SiLU(),
        fl.Flatten(-2, -1),
        fl.Transpose(-1, -2),
        fl.Linear(8, 16),
        fl.Linear(16, 4),
    )


def lora(seed: int, rank: int, layers: tuple[str, ...] = ("Conv2d", "Linear_1", "Linear_2")) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "Conv2d": ((rank, 3, 3, 3), (8, rank, 1, 1)),
        "Linear_1": ((rank, 8), (16, rank)),
        "Linear_2": ((rank, 16), (4, rank)),
    }
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        down, up = shapes[layer]
        tensors[f"{layer}.down.weight"] = torch.randn(down, generator=generator)
        tensors[f"{layer}.up.weight"] = torch.randn(up, generator=generator)
        tensors[f"{layer}.alpha"] = torch.tensor(float(rank + 1))
    return tensors


def lora_file(path: Path, seed: int, rank: int, layers: tuple[str, ...]) -> Path:
    """`lora(seed, rank, layers)` saved at `path`."""
    save_file(lora(seed, rank, layers), path)
    return path


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def expected(*loras: tuple[dict[str, torch.Tensor], float]) -> torch.Tensor:
    fresh = model()
    for index, (tensors, scale) in enumerate(loras):
        LoraManager(fresh).add(f"lora-{index}", tensors, scale=scale)
    return fresh(X)


@torch.no_grad()
def test_slots_give_the_outputs_of_loras_loaded_the_usual_way(tmp_path: Path) -> None:
    chain = model()
    state_dict = {key: value.clone() for key, value in chain.state_dict().items()}
    plain = chain(X)
    loras = LoraManager(chain)
    loras.enable_hotswap(max_rank=4, max_loras=2)
    assert_relative_close(chain(X), plain, 0.0)
    first, second, third = lora(1, rank=4), lora(2, rank=1, layers=("Linear_2",)), lora(3, rank=3)
    loras.add("first", first, scale=0.5)
    assert relative_error(chain(X), plain) > 1e-2
    assert_relative_close(chain(X), expected((first, 0.5)), 1e-5)
    loras.add("second", second, scale=2.0)
    assert_relative_close(chain(X), expected((first, 0.5), (second, 2.0)), 1e-5)
    path = tmp_path / "third.safetensors"
    save_file(third, path)
    loras.replace("first", path, scale=0.25)
    assert loras.names == ("first", "second")
    assert_relative_close(chain(X), expected((third, 0.25), (second, 2.0)), 1e-5)
    loras.remove("second")
    loras.add("again", second)
    assert_relative_close(chain(X), expected((third, 0.25), (second, 1.0)), 1e-5)
    loras.remove("first")
    loras.remove("again")
    assert_relative_close(chain(X), plain, 0.0)
    loras.disable_hotswap()
    assert chain.state_dict().keys() == state_dict.keys()
    for key, value in chain.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


@torch.no_grad()
def test_exceeding_the_declared_limits_is_refused_naming_the_file_and_the_limit(tmp_path: Path) -> None:
    chain = model()
    loras = LoraManager(chain)
    loras.enable_hotswap(max_rank=2, max_loras=1, layers=["Linear_1", "Linear_2"])
    big = lora_file(tmp_path / "big.safetensors", 1, rank=3, layers=("Linear_1",))
    with pytest.raises(
        WeightsError,
        match=rf"^{re.escape(str(big))}: 'Linear_1.down.weight' has rank 3, more than the hot-swap maximum rank 2 "
        r"\(enable_hotswap\(max_rank=2\)\)$",
    ):
        loras.add("big", big)
    with pytest.raises(WeightsError, match=r"'Conv2d.down.weight' patches layer `Conv2d`, which has no hot-swap slot"):
        loras.add("conv", lora(1, rank=2, layers=("Conv2d",)))
    assert loras.names == ()
    small = lora(2, rank=2, layers=("Linear_1",))
    loras.add("small", small)
    before = chain(X)
    other = lora_file(tmp_path / "other.safetensors", 3, rank=1, layers=("Linear_2",))
    with pytest.raises(
        ValueError,
        match=rf"^cannot add LoRA 'other' from {re.escape(str(other))}: all 1 hot-swap slots are taken "
        r"\(enable_hotswap\(max_loras=1\)\); remove one first$",
    ):
        loras.add("other", other)
    with pytest.raises(WeightsError, match="has rank 3, more than the hot-swap maximum rank 2"):
        loras.replace("small", big)
    assert loras.names == ("small",)
    assert_relative_close(chain(X), before, 0.0)


def test_hotswap_refuses_what_it_cannot_keep() -> None:
    chain = model()
    loras = LoraManager(chain)
    with pytest.raises(RuntimeError, match="hot-swap is not enabled"):
        loras.replace("x", lora(1, rank=1))
    with pytest.raises(ValueError, match="max_rank must be at least 1, got 0"):
        loras.enable_hotswap(max_rank=0, max_loras=1)
    with pytest.raises(ValueError, match="has no Linear or Conv2d at 'SiLU'"):
        loras.enable_hotswap(max_rank=1, max_loras=1, layers=["Linear_1", "SiLU"])
    assert len(list(chain.modules())) == len(list(model().modules())), "nothing injected"
    loras.add("plain", lora(1, rank=1))
    with pytest.raises(RuntimeError, match=r"enable_hotswap\(\) before adding LoRAs: remove 'plain' first"):
        loras.enable_hotswap(max_rank=1, max_loras=1)
    loras.remove("plain")
    loras.enable_hotswap(max_rank=1, max_loras=1)
    with pytest.raises(RuntimeError, match="hot-swap is already enabled"):
        loras.enable_hotswap(max_rank=2, max_loras=1)
    with pytest.raises(RuntimeError, match="cannot create LoRA 'new' while hot-swap is enabled"):
        loras.create("new", ["Linear_1"], rank=1)
    loras.add("in-slot", lora(1, rank=1))
    with pytest.raises(RuntimeError, match="cannot fuse while hot-swap is enabled"):
        loras.fuse()
    with pytest.raises(RuntimeError, match="cannot disable hot-swap: remove 'in-slot' first"):
        loras.disable_hotswap()


def test_a_dora_module_is_refused_by_the_slots_naming_its_key() -> None:
    """A slot runs a plain LoRA: a DoRA magnitude (or any LyCORIS weight) on one of the modules refuses the file."""
    chain = model()
    loras = LoraManager(chain)
    loras.enable_hotswap(max_rank=2, max_loras=1)
    dora = lora(1, rank=1, layers=("Linear_1",)) | {"Linear_1.dora_scale": torch.rand(16, 1) + 0.5}
    with pytest.raises(WeightsError, match=r"'Linear_1\.down\.weight' is not a plain LoRA .* cannot be hot-swapped"):
        loras.add("dora", dora)
    assert not loras.names and torch.equal(chain(X), model()(X))  # nothing filled
