"""`load_tensors(..., mmap=True)`: the tensors of a safetensors file (or a stored torch archive) are views of a mapping
of the file, equal to those the default copy gives; the fallbacks (an unaligned tensor, a deflated or legacy torch
file, a dtype conversion) give correct copies; a bad file gives the default mode's error, word for word.

Which contract each mode has is shown by what a change of the file does: overwritten in place (same size), the
file's new bytes reach mapped tensors and not copied ones; truncated, it kills a process holding mapped weights
with SIGBUS (shown in a child process by `test_weights_reliability`: never truncate a file this process maps).
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refiners_core.fluxion as fl
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.testing import CAN_READ_MAPPINGS, is_mapped, is_view_of_file
from refiners_core.weights import WeightsError, load_tensors, save_tensors

needs_mappings = pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "float32": torch.randn(3, 5),
        "float16": torch.randn(7).half(),
        "bfloat16": torch.randn(2, 2).bfloat16(),
        "float64": torch.randn(3).double(),
        "int64": torch.arange(4),
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(1.5),
    }


def data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """The data start of a safetensors file and each tensor's [begin, end) in its data."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return 8 + length, {name: tuple(info["data_offsets"]) for name, info in header.items()}


@needs_mappings
def test_mmap_gives_the_copys_tensors_as_views_of_one_mapping_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_tensors(path, sample_tensors())

    copied = load_tensors(path)
    assert not is_mapped(path)
    mapped = load_tensors(path, mmap=True)

    assert list(mapped) == list(copied)
    for name in copied:
        assert mapped[name].dtype == copied[name].dtype and torch.equal(mapped[name], copied[name]), name
        assert is_view_of_file(mapped[name], path), f"'{name}' is not a view of the mapped file"
        assert not is_view_of_file(copied[name], path)
    assert len({tensor.untyped_storage().data_ptr() for tensor in mapped.values()}) == 1  # one mapping
    del mapped
    assert not is_mapped(path)  # dropped with the last tensor


@pytest.mark.skipif(sys.platform == "win32", reason="a mapped file cannot be written on Windows")
def test_an_in_place_change_of_the_file_reaches_mapped_tensors_and_not_copied_ones(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    before = torch.zeros(4096)  # 16 KiB: pages of its own
    save_tensors(path, {"before": before, "other": torch.ones(3)})
    copied, mapped = load_tensors(path), load_tensors(path, mmap=True)
    assert torch.equal(mapped["before"], before)  # its pages read (and cached) before the change

    start, offsets = data_offsets(path)
    after = torch.arange(4096, dtype=torch.float32)
    with open(path, "r+b") as file:  # same size, same header: only the tensor's bytes change
        file.seek(start + offsets["before"][0])
        file.write(after.numpy().tobytes())

    assert torch.equal(copied["before"], before)  # the default's contract: the file no longer reaches the tensors
    assert torch.equal(mapped["before"], after)  # mmap's: the tensors are the file
    assert torch.equal(mapped["other"], torch.ones(3))


@needs_mappings
def test_a_tensor_not_aligned_to_its_element_size_in_the_file_is_copied(tmp_path: Path) -> None:
    path = tmp_path / "unaligned.safetensors"
    values = torch.arange(6, dtype=torch.float32)
    header = {
        "byte": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "floats": {"dtype": "F32", "shape": [6], "data_offsets": [2, 26]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-aligned: 'floats' starts 2 bytes past a float
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes([7, 9]) + values.numpy().tobytes())

    copied, mapped = load_tensors(path), load_tensors(path, mmap=True)

    assert torch.equal(mapped["floats"], values) and torch.equal(copied["floats"], values)
    assert torch.equal(mapped["byte"], torch.tensor([7, 9], dtype=torch.uint8))
    assert is_view_of_file(mapped["byte"], path)
    assert not is_view_of_file(mapped["floats"], path)


@needs_mappings
def test_a_dtype_conversion_copies_and_keeps_no_view_of_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = fl.Linear(8, 4)
    path = tmp_path / "linear.safetensors"
    save_tensors(path, {key: value.contiguous() for key, value in reference.state_dict().items()})
    same, converted = fl.Linear(8, 4, device="meta"), fl.Linear(8, 4, device="meta", dtype=torch.float64)

    load_state_dict_checked(same, load_tensors(path, mmap=True), source=str(path), assign_to_device="cpu")
    load_state_dict_checked(converted, load_tensors(path, mmap=True), source=str(path), assign_to_device="cpu")

    assert all(is_view_of_file(parameter, path) for parameter in same.parameters())
    assert torch.equal(same.weight, reference.weight)
    assert all(parameter.dtype == torch.float64 for parameter in converted.parameters())
    assert not any(is_view_of_file(parameter, path) for parameter in converted.parameters())
    assert torch.equal(converted.weight, reference.weight.double())
    del same
    assert not is_mapped(path)  # the converted model keeps no mapping


def deflate(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as deflated:
        for info in archive.infolist():
            deflated.writestr(info.filename, archive.read(info.filename))


@needs_mappings
@pytest.mark.parametrize("writer", ["torch.save", "deflated", "legacy"])
def test_torch_files_are_mapped_when_stored_and_copied_otherwise(writer: str, tmp_path: Path) -> None:
    tensors = {"weight": torch.randn(64, 64), "bias": torch.randn(64)}
    path = tmp_path / "model.pth"
    if writer == "legacy":
        torch.save(tensors, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(tensors, tmp_path / "stored.pth")
        if writer == "torch.save":
            (tmp_path / "stored.pth").rename(path)
        else:
            deflate(tmp_path / "stored.pth", path)

    mapped = load_tensors(path, mmap=True)

    assert set(mapped) == set(tensors)
    assert all(torch.equal(mapped[name], tensor) for name, tensor in tensors.items())  # torch's mmap misreads
    assert all(is_view_of_file(tensor, path) == (writer == "torch.save") for tensor in mapped.values())


def bad_files() -> dict[str, bytes]:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    overlapping = json.dumps(header).encode()
    out_of_range = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return {
        "overlapping offsets": len(overlapping).to_bytes(8, "little") + overlapping + bytes(24),
        "data past the end": len(out_of_range).to_bytes(8, "little") + out_of_range + bytes(8),
        "header not JSON": (12).to_bytes(8, "little") + b"{not json!!}" + bytes(4),
        "header longer than the file": (4000).to_bytes(8, "little") + b'{"a": 1}',
        "a git-lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n",
        "text": b"these are not weights\n" * 4,
        "empty": b"",
    }


@pytest.mark.parametrize("case", sorted(bad_files()))
def test_a_bad_file_gives_the_default_modes_error_word_for_word(case: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad_files()[case])

    with pytest.raises(WeightsError) as copied:
        load_tensors(path)
    with pytest.raises(WeightsError) as mapped:
        load_tensors(path, mmap=True)

    assert str(mapped.value) == str(copied.value) and str(path) in str(mapped.value)
    if CAN_READ_MAPPINGS:
        assert not is_mapped(path)


def test_a_truncated_file_gives_the_default_modes_error_before_anything_is_mapped(tmp_path: Path) -> None:
    complete = tmp_path / "complete.safetensors"
    save_tensors(complete, sample_tensors())
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(complete.read_bytes()[:-5])

    with pytest.raises(WeightsError, match="truncated") as copied:
        load_tensors(path)
    with pytest.raises(WeightsError) as mapped:
        load_tensors(path, mmap=True)

    assert str(mapped.value) == str(copied.value)
    if CAN_READ_MAPPINGS:
        assert not is_mapped(path)


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_load_alike_or_fail_alike_in_both_modes(data: st.DataObject, tmp_path: Path) -> None:
    path = tmp_path / "mutated.safetensors"
    save_tensors(path, {"a": torch.randn(2, 3), "b": torch.arange(4, dtype=torch.int32)}, metadata={"k": "v"})
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))

    outcomes: list[str | dict[str, torch.Tensor]] = []
    for mmap in (False, True):
        try:
            outcomes.append(load_tensors(path, mmap=mmap))
        except WeightsError as error:
            outcomes.append(str(error))
    copied, mapped = outcomes
    if isinstance(copied, str) or isinstance(mapped, str):
        assert copied == mapped
    else:
        assert list(copied) == list(mapped)
        assert all(
            torch.equal(copied[key].view(-1).view(torch.uint8), mapped[key].view(-1).view(torch.uint8))
            for key in copied
        )
