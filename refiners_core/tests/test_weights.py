"""Weight files: safetensors and torch checkpoints in, atomic safetensors out, local or hub paths resolved."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from refiners_core.weights import WeightsError, load_tensors, read_safetensors_shapes, resolve_path, save_tensors


def tensors() -> dict[str, torch.Tensor]:
    return {"linear.weight": torch.randn(3, 4), "linear.bias": torch.arange(3, dtype=torch.float16)}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype
        assert torch.equal(actual[name], tensor), name


class RunsCode:
    """Unpickling this calls `os.system`; a safe loader must refuse it without running anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))  # pyright: ignore[reportDeprecated]


def test_save_then_load_round_trips_tensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    expected = tensors()

    save_tensors(path, expected, metadata={"format": "refiners", "rank": "4"})

    assert_same(load_tensors(path), expected)
    with safe_open(str(path), framework="pt") as file:  # pyright: ignore[reportUnknownVariableType]
        assert file.metadata() == {"format": "refiners", "rank": "4"}  # pyright: ignore[reportUnknownMemberType]
    assert sorted(os.listdir(tmp_path)) == ["weights.safetensors"]


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".bin"])
def test_load_tensors_reads_torch_checkpoints(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    expected = tensors()
    torch.save(expected, path)

    assert_same(load_tensors(path, device=torch.device("cpu")), expected)


def test_load_tensors_unwraps_a_nested_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "lightning.ckpt"
    expected = tensors()
    torch.save({"state_dict": expected, "epoch": 3, "global_step": 1200}, path)

    assert_same(load_tensors(path), expected)


def test_load_tensors_flattens_one_level_of_nested_dicts(tmp_path: Path) -> None:
    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(3)}}, path)

    assert_same(
        load_tensors(path), {"image_proj.proj.weight": torch.ones(2), "ip_adapter.1.to_k_ip.weight": torch.zeros(3)}
    )


def test_load_tensors_rejects_a_nested_dict_holding_something_else(tmp_path: Path) -> None:
    path = tmp_path / "nested.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2), "step": 3}}, path)

    with pytest.raises(WeightsError, match=f"{path} is not a dict of tensors: entry 'image_proj': 'step' is a int"):
        load_tensors(path)


def test_load_tensors_rejects_a_checkpoint_with_non_tensor_entries(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(2), "epoch": 3}, path)

    with pytest.raises(WeightsError, match=f"{path} is not a dict of tensors: entry 'epoch' is a int"):
        load_tensors(path)


def test_load_tensors_rejects_a_checkpoint_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)

    with pytest.raises(WeightsError, match=f"{path} holds a list, not a dict of tensors"):
        load_tensors(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_load_tensors_refuses_a_pickle_that_would_run_code(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.bin"
    if writer == "torch.save":
        torch.save({"weight": RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": RunsCode(marker)}, protocol=2))

    with pytest.raises(WeightsError, match=f"cannot read {path} as a torch checkpoint"):
        load_tensors(path)

    assert not marker.exists()
    if writer == "torch.save":  # control: plain unpickling does run the payload
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pth"])
def test_load_tensors_rejects_a_truncated_file(tmp_path: Path, name: str) -> None:
    complete = tmp_path / f"complete-{name}"
    if name.endswith(".safetensors"):
        save_tensors(complete, tensors())
    else:
        torch.save(tensors(), complete)
    truncated = tmp_path / name
    truncated.write_bytes(complete.read_bytes()[: complete.stat().st_size // 2])

    with pytest.raises(WeightsError, match=f"cannot read {truncated}"):
        load_tensors(truncated)


@pytest.mark.parametrize("name", ["notes.safetensors", "notes.pt", "empty.safetensors", "empty.ckpt"])
def test_load_tensors_rejects_a_file_that_is_not_weights(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("" if name.startswith("empty") else "these are not weights\n" * 10)

    with pytest.raises(WeightsError, match=f"cannot read {path}"):
        load_tensors(path)


def test_load_tensors_rejects_an_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")

    with pytest.raises(WeightsError, match="unknown weights file extension '.npz'"):
        load_tensors(path)


def test_load_tensors_of_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"

    with pytest.raises(FileNotFoundError, match=f"no weights file at {path}"):
        load_tensors(path)


def test_failed_save_leaves_the_existing_file_untouched_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_tensors(path, tensors())
    before = path.read_bytes()
    shared = torch.zeros(4)

    with pytest.raises(WeightsError, match=f"cannot write {path}"):
        save_tensors(path, {"a": shared, "b": shared})  # safetensors refuses tensors that share memory

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["weights.safetensors"]


def test_save_interrupted_before_the_final_rename_leaves_the_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "weights.safetensors"
    save_tensors(path, tensors())
    before = path.read_bytes()

    def fail_replace(source: str, destination: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="No space left on device"):
        save_tensors(path, {"other": torch.ones(8)})

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["weights.safetensors"]


def test_save_tensors_writes_only_safetensors_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="save_tensors writes safetensors"):
        save_tensors(tmp_path / "weights.pth", tensors())


def test_save_tensors_rejects_values_that_are_not_tensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"

    with pytest.raises(WeightsError, match=f"cannot write {path}: entry 'scale' is a float, not a tensor"):
        save_tensors(path, {"scale": 2.0})  # pyright: ignore[reportArgumentType]
    assert os.listdir(tmp_path) == []


def test_resolve_path_returns_local_files_and_folders_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"")

    assert resolve_path(tmp_path) == tmp_path
    assert resolve_path(str(tmp_path / "unet" / "model.safetensors")) == tmp_path / "unet" / "model.safetensors"
    assert resolve_path(tmp_path, "model.safetensors", subfolder="unet") == tmp_path / "unet" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=f"no unet/missing.bin in {tmp_path}"):
        resolve_path(tmp_path, "missing.bin", subfolder="unet")


def test_resolve_path_rejects_an_empty_string() -> None:
    with pytest.raises(ValueError, match="empty string"):
        resolve_path("")


def test_resolve_path_finds_hub_files_in_the_cache_offline(tmp_path: Path) -> None:
    """A fake Hugging Face cache (the layout `huggingface_hub` writes) under a temporary HF_HOME, with
    HF_HUB_OFFLINE=1. Run in a subprocess so `huggingface_hub` reads these variables at import, as for a user."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / sha
    (snapshot / "unet").mkdir(parents=True)
    save_tensors(snapshot / "model.safetensors", {"weight": torch.ones(2)})
    (snapshot / "unet" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    script = textwrap.dedent(f"""
        import json
        from refiners_core.weights import load_tensors, resolve_path

        def missing(*args, **kwargs):
            try:
                resolve_path(*args, **kwargs)
            except FileNotFoundError as error:
                return str(error)

        print(json.dumps({{
            "file": str(resolve_path("acme/tiny", "model.safetensors")),
            "loaded": load_tensors(resolve_path("acme/tiny", "model.safetensors"))["weight"].tolist(),
            "pinned": str(resolve_path("acme/tiny", "model.safetensors", revision="{sha}")),
            "subfolder_file": str(resolve_path("acme/tiny", "config.json", subfolder="unet")),
            "folder": str(resolve_path("acme/tiny")),
            "subfolder": str(resolve_path("acme/tiny", subfolder="unet")),
            "missing_repo": missing("acme/missing", "model.safetensors"),
            "missing_file": missing("acme/tiny", "vae.safetensors"),
        }}))
    """)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environment |= {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}

    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120
    )

    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["file"] == str(snapshot / "model.safetensors")
    assert found["loaded"] == [1.0, 1.0]
    assert found["pinned"] == str(snapshot / "model.safetensors")
    assert found["subfolder_file"] == str(snapshot / "unet" / "config.json")
    assert found["folder"] == str(snapshot)
    assert found["subfolder"] == str(snapshot / "unet")
    hub_id = "is no local file or folder, so it was taken as a Hugging Face Hub repository id"
    assert found["missing_repo"].startswith(f"'acme/missing' {hub_id}; 'model.safetensors' of 'acme/missing' is not ")
    assert found["missing_file"].startswith(f"'acme/tiny' {hub_id}; 'vae.safetensors' of 'acme/tiny' is not in the ")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in found["missing_file"]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="the page cache is only released where posix_fadvise is")
@pytest.mark.parametrize("free_memory", [0, 2**40])
def test_a_file_bigger_than_the_free_memory_leaves_the_page_cache_as_it_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_memory: int
) -> None:
    from refiners_core import weight_formats

    path = tmp_path / "weights.safetensors"
    expected = {f"layer_{index}.weight": torch.randn(64, 64) for index in range(5)}
    save_tensors(path, expected)
    released: list[tuple[int, int]] = []
    fadvise = os.posix_fadvise

    def spy(descriptor: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        released.append((offset, length))
        fadvise(descriptor, offset, length, advice)

    monkeypatch.setattr(weight_formats, "_free_memory", lambda: free_memory)
    monkeypatch.setattr(weight_formats, "_PIECE_BYTES", 2 * 64 * 64 * 4 - 1000)  # pieces across tensors, split ones
    monkeypatch.setattr(os, "posix_fadvise", spy)

    assert_same(load_tensors(path), expected)
    if free_memory:
        assert released == []
    else:  # the whole data once, piece by piece, each piece once copied (the readers may finish out of order)
        released.sort()
        assert len(released) > 2
        assert all(offset + length == next_offset for (offset, length), (next_offset, _) in zip(released, released[1:]))
        assert released[-1][0] + released[-1][1] == path.stat().st_size
        assert sum(length for _, length in released) == 5 * 64 * 64 * 4


@pytest.mark.parametrize("piece_bytes", [1, 100, 4096, 2**24])
def test_safetensors_are_read_whole_whatever_the_pieces_they_are_read_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_bytes: int
) -> None:
    from refiners_core import weight_formats

    path = tmp_path / "weights.safetensors"
    expected = {
        "empty": torch.zeros(0),
        "odd": torch.randn(3, 7),
        "big": torch.randn(50, 50),
        "half": torch.randn(13).half(),
        "int": torch.arange(5),
    }
    save_tensors(path, expected)
    monkeypatch.setattr(weight_formats, "_PIECE_BYTES", piece_bytes)

    assert_same(load_tensors(path), expected)


def test_read_safetensors_shapes_reads_scalars_and_leaves_the_rest_on_meta(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    alpha, empty = torch.tensor(4.0, dtype=torch.float16), torch.zeros(0, 3)
    save_tensors(path, {"a.weight": torch.randn(8, 3), "a.alpha": alpha, "b.empty": empty}, metadata={"k": "v"})

    shapes, metadata = read_safetensors_shapes(path)

    assert metadata == {"k": "v"}
    assert list(shapes) == ["a.alpha", "a.weight", "b.empty"]
    assert shapes["a.weight"].is_meta and shapes["a.weight"].shape == (8, 3)
    assert not shapes["a.alpha"].is_meta and shapes["a.alpha"].dtype == torch.float16
    assert torch.equal(shapes["a.alpha"], alpha) and torch.equal(shapes["b.empty"], empty)


def test_read_safetensors_shapes_never_reads_the_big_tensors(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_tensors(path, {"a.alpha": torch.tensor(2.0), "a.weight": torch.randn(64, 64)})
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    alpha_at = data.index(torch.tensor(2.0).numpy().tobytes(), header_end)
    garbage = bytearray(data)
    for position in range(header_end, len(data)):  # every data byte but the alpha's: NaN bits
        if not alpha_at <= position < alpha_at + 4:
            garbage[position] = 0xFF
    path.write_bytes(bytes(garbage))

    shapes, _ = read_safetensors_shapes(path)

    assert shapes["a.alpha"].item() == 2.0 and shapes["a.weight"].is_meta
    assert torch.isnan(load_tensors(path)["a.weight"]).all()  # the bytes were indeed garbage


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "the file is empty"), (b"hello world, not weights", "neither safetensors"), (b"PK\x03\x04xx", "torch")],
)
def test_read_safetensors_shapes_refuses_other_files_naming_them(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)

    with pytest.raises(WeightsError, match=f"{path} is not a safetensors file: .*{expected}"):
        read_safetensors_shapes(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_safetensors_shapes(tmp_path / "missing.safetensors")
