"""Bad weight files: archive bombs, integer or non-finite weights, inconsistent shard indexes, files that change after
loading, files named for another kind, and random safetensors headers. Each is refused with a WeightsError naming the
file (and the entry, key or shard), before anything is built from it, or loads unaffected."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file  # pyright: ignore[reportUnknownVariableType]

import refiners_core.fluxion as fl
import refiners_core.weight_formats
import refiners_core.weights
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.testing.files import FILE_CHANGES
from refiners_core.weights import WeightsError, check_weights, load_tensors, read_metadata, shard_files


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes] | None = None) -> None:
    """Copy the torch archive `source` to `target` with every entry deflated, and the entries ending in a key of
    `replace` given other contents."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = next((new for end, new in (replace or {}).items() if info.filename.endswith(end)), None)
            out.writestr(info.filename, archive.read(info) if data is None else data, zipfile.ZIP_DEFLATED)


def test_a_deflated_torch_archive_whose_entries_match_their_tensors_loads(tmp_path: Path) -> None:
    tensors = {"weight": torch.randn(3, 4), "zeros": torch.zeros(1000)}
    torch.save(tensors, tmp_path / "plain.pth")
    rewrite_archive(tmp_path / "plain.pth", tmp_path / "deflated.pth")
    loaded = load_tensors(tmp_path / "deflated.pth")
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())


@pytest.mark.parametrize(
    ("tensors", "replace", "limit", "match"),
    [
        ({"w": torch.randn(3)}, {"data/0": bytes(64 * 2**20)}, None, r"'bomb/data/0' inflates to 67108864 bytes from"),
        (
            {"w": torch.randn(3)},
            {"data/0": os.urandom(2**20)},
            None,
            r"'bomb/data/0' inflates to 1048576 bytes, but the",
        ),
        ({"w": torch.zeros(4 * 2**20)}, {}, None, r"'bomb/data/0' inflates to 16777216 bytes from \d+ \(more than 32"),
        ({"w": torch.randn(3)}, {"data.pkl": pickle.dumps(os.urandom(2**16))}, 2**15, r"'bomb/data.pkl' inflates to"),
        ({"w": torch.randn(3)}, {"byteorder": os.urandom(2**16)}, 2**15, r"'bomb/byteorder' inflates to \d+ bytes and"),
    ],
    ids=["entry over its tensor", "incompressible entry over its tensor", "32x inflation", "pickle", "other entry"],
)
def test_a_torch_archive_whose_entries_inflate_out_of_proportion_is_refused_before_inflating(
    tensors: dict[str, torch.Tensor],
    replace: dict[str, bytes],
    limit: int | None,
    match: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if limit is not None:
        monkeypatch.setattr(refiners_core.weight_formats, "MAX_PICKLE_BYTES", limit)
    torch.save(tensors, tmp_path / "bomb.pth")
    path = tmp_path / "bomb.ckpt"
    rewrite_archive(tmp_path / "bomb.pth", path, replace)
    assert path.stat().st_size < 3 * 2**20
    with pytest.raises(WeightsError, match=f"{path}: archive entry {match}"):
        load_tensors(path)


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize(
    "value", [torch.arange(6).reshape(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.uint8)]
)
def test_integer_and_bool_weights_are_refused_not_cast_naming_file_key_and_dtype(value: torch.Tensor) -> None:
    model = fl.Linear(3, 2)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    dtype = str(value.dtype).removeprefix("torch.")
    with pytest.raises(WeightsError, match=f"w.safetensors: 'weight' holds {dtype} values, expected floating-point"):
        load_state_dict_checked(model, {"weight": value, "bias": torch.zeros(2)}, source="w.safetensors")
    assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())
    with pytest.raises(WeightsError, match=f"lora.pth: 'up' holds {dtype} values"):
        check_weights({"up": value}, source="lora.pth")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("bad", "kind"), [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "inf")])
def test_non_finite_weights_are_refused_naming_file_and_key(dtype: torch.dtype, bad: float, kind: str) -> None:
    weight = torch.randn(2, 3).to(dtype)
    weight[1, 2] = bad
    model = fl.Linear(3, 2, dtype=dtype)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(WeightsError, match=f"model.safetensors: 'weight' holds {kind}"):
        load_state_dict_checked(
            model, {"weight": weight, "bias": torch.zeros(2, dtype=dtype)}, source="model.safetensors"
        )
    assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())


def test_weights_past_the_parallel_scan_size_name_the_first_bad_key_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past `_PARALLEL_SCAN_BYTES` the tensors are read in threads (split by size), and the error is still the one a
    reading in key order gives: the first key at fault, whatever its thread."""
    monkeypatch.setattr(refiners_core.weights, "_PARALLEL_SCAN_BYTES", 1024)
    tensors = {f"w{index}": torch.randn(64 * (index + 1)) for index in range(8)}  # 16 KiB: threads
    tensors["w6"][5] = float("nan")
    tensors["w2"][-1] = float("inf")
    tensors["w4"] = tensors["w4"].long()
    with pytest.raises(WeightsError, match="w.safetensors: 'w2' holds infinite values"):
        check_weights(tensors, source="w.safetensors")
    with pytest.raises(WeightsError, match="'w4' holds int64 values"):
        check_weights(tensors, source="w.safetensors", keys=["w4", "w2"])
    with pytest.raises(WeightsError, match="'w6' holds NaN values"):
        check_weights(tensors, source="w.safetensors", keys=["w0", "w6", "w4"])
    check_weights(tensors, source="w.safetensors", keys=["w0", "w1", "w3", "w5", "w7"])


class Masked(fl.Chain):
    """A Linear and a persistent float mask buffer that holds -inf, as attention masks do, and an integer buffer."""

    def __init__(self) -> None:
        super().__init__(fl.Linear(3, 2))
        self.register_buffer("mask", torch.zeros(2))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def test_buffers_may_hold_infinities_and_integer_buffers_take_integers() -> None:
    model = Masked()
    tensors = {
        "Linear.weight": torch.randn(2, 3),
        "Linear.bias": torch.randn(2),
        "mask": torch.tensor([0.0, -float("inf")]),
        "steps": torch.tensor(7),
    }
    load_state_dict_checked(model, tensors, source="masked.safetensors")
    assert model.state_dict()["mask"][1] == -float("inf") and model.state_dict()["steps"] == 7
    with pytest.raises(WeightsError, match="masked.safetensors: 'mask' holds int64 values"):
        load_state_dict_checked(model, tensors | {"mask": torch.tensor([0, 1])}, source="masked.safetensors")


def sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, tensors in shards.items():
        if name.endswith(".bin"):
            torch.save(tensors, folder / name)
        else:
            save_file(tensors, str(folder / name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


A, B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_consistent_shard_index_gives_its_shards(suffix: str, tmp_path: Path) -> None:
    a, b = A.replace(".safetensors", suffix), B.replace(".safetensors", suffix)
    index = sharded(tmp_path, {a: {"x": torch.ones(1)}, b: {"y": torch.ones(1)}}, {"x": a, "y": b})
    assert shard_files(index) == [tmp_path / a, tmp_path / b]


@pytest.mark.parametrize(
    ("shards", "weight_map", "match"),
    [
        ({A: {"x": torch.ones(1), "y": torch.ones(1)}, B: {}}, {"x": A, "y": B}, f"'y' is in the shard {A}, but the "),
        ({A: {"x": torch.ones(1), "z": torch.ones(1)}}, {"x": A}, f"'z' is in the shard {A}, but the index does not"),
        ({A: {"x": torch.ones(1)}, B: {"x": torch.ones(1), "y": torch.ones(1)}}, {"x": A, "y": B}, "'x' is in two "),
        ({A: {"x": torch.ones(1)}}, {"x": A, "y": A}, f"the index puts 'y' in the shard {A}, which does not hold it"),
        ({A: {"x": torch.ones(1)}}, {"x": "../x.safetensors"}, "the shard path '../x.safetensors' leaves the index"),
        ({A: {"x": torch.ones(1)}}, {"x": "/etc/x.safetensors"}, "the shard path '/etc/x.safetensors' leaves the"),
        ({A: {"x": torch.ones(1)}}, {"x": "a/../../x.bin"}, "the shard path 'a/../../x.bin' leaves the index"),
        ({A: {"x": torch.ones(1)}}, {"x": 3}, "its weight_map entry 'x': 3 does not name a shard file"),
        ({A: {"x": torch.ones(1)}}, {}, "has no 'weight_map' object"),
    ],
    ids=[
        "stray key",
        "unlisted key",
        "two shards",
        "missing key",
        "parent",
        "absolute",
        "nested parent",
        "number",
        "empty",
    ],
)
def test_an_inconsistent_shard_index_is_refused_naming_index_key_and_shards(
    shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, Any], match: str, tmp_path: Path
) -> None:
    index = sharded(tmp_path / "unet", shards, weight_map)
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "unet" / A).read_bytes())
    with pytest.raises(WeightsError, match=f"{index}: {match}"):
        shard_files(index)


def test_a_missing_shard_is_named_with_its_index(tmp_path: Path) -> None:
    index = sharded(tmp_path, {A: {"x": torch.ones(1)}}, {"x": A, "y": B})
    with pytest.raises(FileNotFoundError, match=f"{index} lists the shard {B}, which is missing"):
        shard_files(index)


CHANGE_AFTER_LOAD = """
import sys, torch
from pathlib import Path
import refiners_core.fluxion as fl
from refiners_core.testing.files import change_file
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.weights import load_tensors
from safetensors.torch import load_file

path, change, loader = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
model = fl.Linear(256, 256, device="meta")
tensors = load_file(path) if loader == "mapped" else load_tensors(path, mmap=loader == "ours, mmap=True")
load_state_dict_checked(model, tensors, source=str(path), assign_to_device="cpu")
change_file(path, change)
with torch.no_grad():
    print(float(model(torch.ones(1, 256)).sum()), float(model.weight.sum()))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="a mapped file cannot be changed on Windows")
@pytest.mark.parametrize("change", FILE_CHANGES)
def test_changing_a_weights_file_after_loading_neither_crashes_nor_changes_the_model(
    change: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    reference = fl.Linear(256, 256)
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
    with torch.no_grad():
        expected = f"{float(reference(torch.ones(1, 256)).sum())} {float(reference.weight.sum())}"
    script = textwrap.dedent(CHANGE_AFTER_LOAD)
    run = subprocess.run([sys.executable, "-c", script, str(path), change, "ours"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
    if change == "truncate":  # control: a memory-mapped load (ours opted in, or safetensors') dies of SIGBUS
        for loader in ("mapped", "ours, mmap=True"):
            save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
            mapped = subprocess.run([sys.executable, "-c", script, str(path), change, loader], capture_output=True)
            assert mapped.returncode == -signal.SIGBUS, loader
    if change == "delete":  # a mapping keeps an unlinked file's pages: deleting is safe with mmap=True too
        save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
        run = subprocess.run([sys.executable, "-c", script, str(path), change, "ours, mmap=True"], capture_output=True)
        assert run.returncode == 0 and run.stdout.decode().strip() == expected


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".bin"])
def test_a_safetensors_file_named_as_a_torch_checkpoint_is_read_as_safetensors(suffix: str, tmp_path: Path) -> None:
    tensors = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    path = tmp_path / f"model{suffix}"
    save_file(tensors, str(path))
    loaded = load_tensors(path)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())


@pytest.mark.parametrize("name", ["model.pth", "model.ckpt", "model.safetensors", "model.bin"])
def test_a_git_lfs_pointer_is_named_as_one(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2149\nsize 4265380512\n")
    with pytest.raises(WeightsError, match=f"cannot read {path}: it is a git-lfs pointer .* not the weights"):
        load_tensors(path)


class RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))  # pyright: ignore[reportDeprecated]


@pytest.mark.parametrize("payload", ["torch.save", "pickle", "torch.save of a module", "numpy"])
def test_no_message_suggests_loading_with_weights_only_false(payload: str, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    if payload == "torch.save":
        torch.save({"weight": RunsCode()}, path)
    elif payload == "pickle":
        path.write_bytes(pickle.dumps({"weight": RunsCode()}, protocol=2))
    elif payload == "torch.save of a module":
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
    else:
        torch.save({"weight": torch.ones(2).numpy()}, path)
    with pytest.raises(WeightsError) as error:
        load_tensors(path)
    assert str(path) in str(error.value)
    assert "weights_only" not in str(error.value)


SAFETENSORS_DTYPES = sorted(refiners_core.weight_formats.SAFETENSORS_DTYPES)


def header_bytes(header: object, pad: int = 0) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(text).to_bytes(8, "little") + text + bytes(pad)


entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(SAFETENSORS_DTYPES), st.text(max_size=4), st.integers()),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.integers(), st.none()),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 200), min_size=0, max_size=3), st.text(max_size=3)),
    }
)
headers = st.one_of(
    st.dictionaries(st.text(max_size=8), entries, max_size=4),
    st.dictionaries(
        st.sampled_from(["__metadata__", "w"]), st.one_of(entries, st.dictionaries(st.text(), st.text()), st.integers())
    ),
    st.binary(max_size=64),
    st.recursive(
        st.none() | st.integers() | st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)
    ),
)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=headers,
    pad=st.integers(0, 256),
    suffix=st.sampled_from([".safetensors", ".pth"]),
    claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_random_safetensors_headers_load_or_are_refused_naming_the_file(
    header: object, pad: int, suffix: str, claimed: int | None, tmp_path: Path
) -> None:
    path = tmp_path / f"random{suffix}"
    data = header_bytes(header, pad)
    if claimed is not None:
        data = claimed.to_bytes(8, "little") + data[8:]
    path.write_bytes(data)
    try:
        tensors = load_tensors(path)
    except WeightsError as error:
        assert str(path) in str(error)
    else:
        assert all(isinstance(tensor, torch.Tensor) for tensor in tensors.values())


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_safetensors_files_load_or_are_refused_naming_the_file(data: st.DataObject, tmp_path: Path) -> None:
    path = tmp_path / "mutated.safetensors"
    save_file({"a": torch.randn(2, 3), "b": torch.arange(4, dtype=torch.int32)}, str(path), metadata={"k": "v"})
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path.write_bytes(bytes(raw[:cut]))
    try:
        load_tensors(path)
    except WeightsError as error:
        assert str(path) in str(error)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_read_metadata_reads_a_safetensors_header_whatever_the_name(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"model{suffix}"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt", "k": "v"})
    assert read_metadata(path) == {"format": "pt", "k": "v"}
    torch.save({"w": torch.ones(2)}, path)
    assert read_metadata(path) == {}  # a torch checkpoint has no metadata


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 9\n", "it is a git-lfs pointer"),
        (b"", "the file is empty"),
        (b"\x00" * 40, "(neither safetensors nor a torch checkpoint|its header is not JSON)"),
        ((10**6).to_bytes(8, "little") + b'{"x": 1}', "its header claims 1000000 bytes, but the file has 16"),
        ((8).to_bytes(8, "little") + b'{"x": 1}', "tensor 'x' is described by 1, not an object"),
        ((20).to_bytes(8, "little") + b'{"__metadata__": 3} ', "'__metadata__' must map strings to strings"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_read_metadata_names_the_file_and_what_it_is(content: bytes, match: str, suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=f"^cannot read {re.escape(str(path))}.*{match}"):
        read_metadata(path)
