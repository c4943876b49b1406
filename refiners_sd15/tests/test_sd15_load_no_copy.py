"""`from_pretrained` holds each weight in memory once: the model takes the file's tensors, never a copy of them.

`refiners_core.weights.load_tensors` reads a safetensors file tensor by tensor into one buffer of the process's own
memory (no mapping of the file remains, so changing the file afterwards cannot reach the model), and its tensors are
views of that buffer. A component built on the meta device that takes those tensors as its own has every parameter
in that same storage; a component built normally (random initialisation, then a copy of the file's weights) would
hold two copies at its peak and one storage per parameter. Buffers no file provides (the UNet's empty dtype and
device anchor) are recreated on the target device. With `mmap=True` the parameters are views of the file's mapping
instead, again one storage, with the same outputs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

from refiners_core.testing import CAN_READ_MAPPINGS, assert_relative_close, is_mapped, is_view_of_file
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import SD15_UNET_CONFIG
from refiners_sd15.unet.blocks import SinusoidalEmbedding

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


def save_reference(folder: Path) -> UNet2DConditionModel:
    torch.manual_seed(0)
    reference = cast(UNet2DConditionModel, UNet2DConditionModel.from_config(TINY_UNET_CONFIG)).eval()  # pyright: ignore[reportUnknownMemberType]
    reference.save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    return reference


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
def test_sd15_unet_from_pretrained_takes_the_file_tensors_from_one_unmapped_buffer(tmp_path: Path) -> None:
    reference = save_reference(tmp_path)
    unet = SD1UNet.from_pretrained(tmp_path).eval()
    storages = {parameter.untyped_storage().data_ptr() for parameter in unet.parameters()}
    assert len(storages) == 1, f"the weights are in {len(storages)} storages: some were copied out of the file's buffer"
    assert not is_mapped(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    anchor = unet.ensure_find(SinusoidalEmbedding).anchor
    assert (anchor.device.type, anchor.dtype) == ("cpu", torch.float32)
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        unet.set_timestep(torch.tensor([500]))
        unet.set_clip_text_embedding(text)
        expected = reference(x, 500, encoder_hidden_states=text).sample
        assert (unet(x) - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
def test_sd15_unet_from_pretrained_with_mmap_takes_views_of_the_file_itself(tmp_path: Path) -> None:
    save_reference(tmp_path)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    copied = SD1UNet.from_pretrained(tmp_path).eval()
    mapped = SD1UNet.from_pretrained(tmp_path, mmap=True).eval()
    assert all(is_view_of_file(parameter, path) for parameter in mapped.parameters())
    storages = {parameter.untyped_storage().data_ptr() for parameter in mapped.parameters()}
    assert len(storages) == 1, f"the weights are in {len(storages)} storages: some were copied out of the mapping"
    assert not any(is_view_of_file(parameter, path) for parameter in copied.parameters())
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        outputs = []
        for unet in (copied, mapped):
            unet.set_timestep(torch.tensor([500]))
            unet.set_clip_text_embedding(text)
            outputs.append(unet(x))
    assert_relative_close(outputs[1], outputs[0], 1e-5)  # float32 rounding: BLAS may sum unaligned weights otherwise


def test_sd15_unet_from_pretrained_converts_to_the_dtype_asked_for(tmp_path: Path) -> None:
    save_reference(tmp_path)
    unet = SD1UNet.from_pretrained(tmp_path, dtype=torch.float64)
    assert {tensor.dtype for tensor in [*unet.parameters(), *unet.buffers()]} == {torch.float64}


CHANGE_AFTER_FROM_PRETRAINED = """
import sys, torch
from pathlib import Path
from refiners_core.testing.files import change_file
from refiners_sd15 import SD1UNet

path, change = Path(sys.argv[1]), sys.argv[2]
unet = SD1UNet.from_pretrained(path).eval()
change_file(path, change)
torch.manual_seed(0)
x, text = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
with torch.no_grad():
    unet.set_timestep(torch.tensor([500]))
    unet.set_clip_text_embedding(text)
    print(float(unet(x).double().sum()), float(sum(p.double().sum() for p in unet.parameters())))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="an open file cannot be changed on Windows")
@pytest.mark.parametrize("change", ["truncate", "overwrite in place", "replace like cp"])
def test_changing_the_file_after_from_pretrained_neither_crashes_nor_changes_the_model(
    change: str, tmp_path: Path
) -> None:
    reference = save_reference(tmp_path)
    path = tmp_path / "unet.safetensors"
    SD1UNet.from_pretrained(tmp_path).save(path)
    script = textwrap.dedent(CHANGE_AFTER_FROM_PRETRAINED)
    unchanged = subprocess.run([sys.executable, "-c", script, str(path), "none"], capture_output=True, text=True)
    assert unchanged.returncode == 0, unchanged.stderr
    changed = subprocess.run([sys.executable, "-c", script, str(path), change], capture_output=True, text=True)
    assert changed.returncode == 0, changed.stderr  # no SIGBUS
    assert changed.stdout == unchanged.stdout  # the same outputs and parameters, bit for bit
    assert float(sum(p.detach().double().sum() for p in reference.parameters())) != 0.0
