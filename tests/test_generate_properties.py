"""A property of `refiners generate` over random arguments, plugin options included (every package installed):
each run is either refused, with exit code 2 and exactly one stderr line `refiners generate: error: ...` naming an
option at fault, or passes every check and only then fails on the model, which does not exist. Which of the two is
decided here, independently, from each argument's documented bounds. No model is loaded: a few seconds in all."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from refiners_core.cli import main
from refiners_core.plugins import registry

MAX_SIDE, MAX_PIXELS = 8192, 4096 * 4096


@dataclass(frozen=True)
class Files:
    root: Path
    lora: Path
    embedding: Path
    image: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("generate_properties")
    lora = root / "style.safetensors"
    save_file({"unet.Linear.down.weight": torch.randn(2, 4), "unet.Linear.up.weight": torch.randn(4, 2)}, lora)
    (root / "notes.safetensors").write_text("not weights")
    save_file({"unet.Linear.weight": torch.randn(4, 4)}, root / "model.safetensors")
    embedding = root / "cat.safetensors"
    save_file({"emb_params": torch.randn(1, 768)}, embedding)
    save_file({"emb_params": torch.full((1, 768), float("nan"))}, root / "nan.safetensors")
    image = root / "edges.png"
    Image.new("RGB", (64, 64)).save(image)
    (root / "folder").mkdir()
    (root / "file.txt").write_text("a file")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = root / "hub" / "models--acme--controlnet-canny"  # the layout huggingface_hub's cache has
    (repository / "snapshots" / commit).mkdir(parents=True)
    (repository / "snapshots" / commit / "config.json").write_text("{}")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    return Files(root, lora, embedding, image)


@pytest.fixture(autouse=True, scope="module")
def offline_hub_cache(files: Files) -> Iterator[None]:
    """No network: hub ids are read from a cache under the test's folder, as with HF_HUB_OFFLINE=1."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(files.root / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def integers_as_text(low: int, high: int) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """Valid and invalid values of an integer option from `low` to `high`."""
    outside = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)).map(str)
    near = st.one_of(st.integers(low - 10, low - 1), st.integers(high + 1, 2 * high + 10)).map(str)
    odd = st.sampled_from(["", "ten", "1.5", "nan", "0x10", "9" * 5000])
    return st.integers(low, high).map(str) | st.sampled_from([f" {low} ", f"{high:_}"]), near | outside | odd


def numbers_as_text(low: float, high: float) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """Valid and invalid values of a number option in `[low, high]`."""
    outside = st.floats(allow_nan=True, allow_infinity=True).filter(lambda number: not low <= number <= high)
    near = st.floats(high, 20 * high, exclude_min=True) | st.floats(low - 20 * high, low, exclude_max=True)
    odd = st.sampled_from(["1e999", "abc", "nan", "-inf", "Infinity", f"{high + 0.5}", f"{low - 1e-9}", "7.5x"])
    valid = st.floats(low, high).map(repr) | st.sampled_from([" 7.5 ", "-0", "1e-300"])
    return valid, near.map(repr) | outside.map(repr) | odd


def sizes() -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """Valid and invalid `--size` values."""
    sides = st.integers(1, 512).map(lambda side: 8 * side)
    valid = st.tuples(sides, sides).map(lambda size: f"{size[0]}x{size[1]}") | st.sampled_from(["64X64", "8192x2048"])
    bad_sides = st.sampled_from([0, 60, 8200, 100_000]) | st.integers(0, 20_000).filter(lambda side: side % 8 > 0)
    bad = st.tuples(bad_sides, st.integers(0, 20_000)).map(lambda size: f"{size[0]}x{size[1]}")
    odd = st.sampled_from(["512", "axb", "512x512x3", "-8x8", "8192x2056", "4104x4096", f"{2**40}x8"])
    return valid, bad | odd


def tabled(table: dict[str, bool]) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """Valid and invalid values among `table`'s."""
    valid = sorted(key for key, is_valid in table.items() if is_valid)
    return st.sampled_from(valid), st.sampled_from(sorted(set(table) - set(valid)))


def valid_int(text: str, low: int, high: int) -> bool:
    try:
        return low <= int(text) <= high
    except ValueError:
        return False


def valid_number(text: str, low: float, high: float) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and low <= number <= high


def valid_size(text: str) -> bool:
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return False
    width, height = int(parts[0]), int(parts[1])
    return all(0 < side <= MAX_SIDE and side % 8 == 0 for side in (width, height)) and width * height <= MAX_PIXELS


def valid_device(name: str) -> bool:
    if name == "cpu":
        return True
    if name == "cuda":
        return torch.cuda.is_available()
    if name.startswith("cuda:") and name[5:].isdigit():
        return torch.cuda.is_available() and int(name[5:]) < torch.cuda.device_count()
    return name == "mps" and torch.backends.mps.is_available()


DEVICES = ["cpu", "cuda", "cuda:0", "cuda:7", "mps", "meta", "tpu", "", "CPU", "cuda:-1"]
OUTS = {  # --out, relative to the files' folder: valid or not
    "out.png": True,
    "out.JPG": True,
    "out.webp": True,
    "new/sub/out.jpeg": True,
    "out.gif": False,
    "out": False,
    "folder": False,
    "file.txt/out.png": False,
}
LORAS = {"{lora}": True, "{lora}:0.5": True, "{lora}:-2": True, "{lora}:nan": False, "{lora}:inf": False}
LORAS |= {"{root}/missing.safetensors": False, "{root}/notes.safetensors": False, "{root}/model.safetensors": False}
FREEUS = {"default": True, "0.9,0.2,1.2,1.4": True, "nan,0.2,1.2,1.4": False, "1,2": False, "": False}
EMBEDDINGS = {"{embedding}": True, "{embedding}:other": True, "{root}/nan.safetensors": False}
EMBEDDINGS |= {"{root}/missing.pt": False}
CONTROLNETS = {"acme/controlnet-canny:{image}": True, "{root}/no-folder:{image}": False}
CONTROLNETS |= {"acme/controlnet-canny:{image}:nan": False, "acme/controlnet-canny:{root}": False}
CONTROLNETS |= {"acme/not-cached:{image}": False}  # offline, a hub id must be in the cache
# Before the model loads, a T2I-Adapter value is checked as a ControlNet one is (a hub id by its cached config.json).
T2I_ADAPTERS = dict(CONTROLNETS)
PLUGIN_TABLES = {"--lora": LORAS, "--freeu": FREEUS, "--embedding": EMBEDDINGS, "--controlnet": CONTROLNETS}
PLUGIN_TABLES |= {"--t2i-adapter": T2I_ADAPTERS}


def option_values() -> dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]]:
    """Each option (`prompt` for the prompt) and strategies for its valid and invalid values."""
    devices = [name for name in DEVICES if valid_device(name)], [name for name in DEVICES if not valid_device(name)]
    values = {
        "prompt": (st.text(max_size=15), st.sampled_from(["a cat \udcff", "\ud800"])),
        "--steps": integers_as_text(1, 1000),
        "--seed": integers_as_text(0, 2**64 - 1),
        "--guidance": numbers_as_text(0, 100),
        "--size": sizes(),
        "--device": (st.sampled_from(devices[0]), st.sampled_from(devices[1])),
        "--out": tabled(OUTS),
    }
    plugin_options = registry().generate_options
    return values | {flag: tabled(table) for flag, table in PLUGIN_TABLES.items() if flag in plugin_options}


@st.composite
def arguments(draw: st.DrawFn) -> tuple[list[str], set[str]]:
    """Command-line arguments (with `{root}`-style placeholders) and the options whose value is invalid.

    A third of the runs has only valid values, a third exactly one invalid option, a third any mix. Whether a value
    is valid is decided from the value (`valid_*` and the tables), not from the strategy that drew it.
    """
    values = option_values()
    mode = draw(st.sampled_from(["valid", "one invalid", "any"]))
    target = draw(st.sampled_from(sorted(values))) if mode == "one invalid" else None
    args: list[str] = []
    for name, (valid, invalid) in values.items():
        if name == target:
            chosen = [draw(invalid)]
        elif name in ("prompt", "--out"):
            chosen = [draw(valid if mode != "any" else valid | invalid)]
        else:
            most = 2 if name in ("--lora", "--embedding", "--controlnet", "--t2i-adapter") else 1
            chosen = draw(st.lists(valid if mode != "any" else valid | invalid, max_size=most))
        for value in chosen:
            if name == "prompt":
                args.insert(0, " " + value if value.startswith("-") else value)
            else:
                args.append(f"{name}={'{root}/' if name == '--out' else ''}{value}")
    return args, invalid_options(args)


def invalid_options(args: list[str]) -> set[str]:
    """The options of `args` (prompt first, then `--flag=value`) whose value is not valid: the oracle."""
    invalid = set() if _utf8(args[0]) else {"the prompt"}
    given: dict[str, list[str]] = {}
    for argument in args[1:]:
        flag, _, value = argument.partition("=")
        given.setdefault(flag, []).append(value)
    checks = {
        "--steps": lambda text: valid_int(text, 1, 1000),
        "--seed": lambda text: valid_int(text, 0, 2**64 - 1),
        "--guidance": lambda text: valid_number(text, 0, 100),
        "--size": valid_size,
        "--device": valid_device,
        "--out": lambda text: OUTS[text.removeprefix("{root}/")],
    }
    for flag, flag_values in given.items():
        check = checks.get(flag) or PLUGIN_TABLES[flag].__getitem__
        if not all(check(value) for value in flag_values):
            invalid.add(flag)
    embeddings = given.get("--embedding", [])
    if len({value.rpartition(":")[2] for value in embeddings}) < len(embeddings):
        invalid.add("--embedding")  # a token given twice (`{embedding}` twice)
    return invalid


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=arguments())
def test_generate_refuses_bad_arguments_in_one_line_or_fails_only_on_the_model(
    files: Files, drawn: tuple[list[str], set[str]]
) -> None:
    template, invalid = drawn
    event("passes the checks" if not invalid else f"{len(invalid)} invalid option(s)")
    places = {"root": str(files.root), "lora": str(files.lora), "embedding": str(files.embedding)}
    places["image"] = str(files.image)
    args = template[:1]  # the prompt, as drawn
    for argument in template[1:]:
        for name, path in places.items():
            argument = argument.replace("{" + name + "}", path)
        args.append(argument)
    model = files.root / "no-such-model"
    stderr = io.StringIO()

    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["generate", *args, f"--model={model}", "--no-progress"])

    lines = stderr.getvalue().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("refiners generate: error: "), lines
    model_error = f"refiners generate: error: --model {model}: no such file or folder"
    if invalid:
        assert lines[0] != model_error, f"{args} passed the checks, but {invalid} are invalid"
        assert any(name in lines[0] for name in invalid), (lines[0], invalid)
    else:
        assert lines[0] == model_error, args
    assert not (files.root / "new").exists() and sorted(files.root.glob("*.png")) == [files.image]
