"""Bad LoRA input, as a careless or hostile user gives it: pattern keys that would make a backtracking regular
expression run forever, rank 0, values that are not tensors, integer or non-finite weights and alphas, scales that are
not finite numbers, adapters ejected by hand. Every error names the file or argument and leaves the model
byte-identical; random PEFT metadata loads or is refused with a WeightsError naming the file, in bounded time."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_core.module_names import DIFFUSERS
from refiners_core.testing import state_snapshot
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.patterns import Pattern, PatternError
from refiners_lora.testing import assert_lora_free


class Net(fl.Chain):
    """Two Linears with diffusers names, so that PEFT files (and their pattern metadata) load onto it."""

    def __init__(self) -> None:
        super().__init__(fl.Linear(8, 16), fl.SiLU(), fl.Linear(16, 4))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        return {"net.blocks.0.proj": "Linear_1", "net.blocks.1.proj_out": "Linear_2"} if convention == DIFFUSERS else {}


def net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))


def two_layer_lora(layers: tuple[str, str], keys: tuple[str, str], seed: int, rank: int) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA drawn from `seed` on the 8 -> 16 and 16 -> 4 layers named `layers`, the down and up
    weights of each under the suffixes `keys`."""
    generator = torch.Generator().manual_seed(seed)
    (first, second), (down, up) = layers, keys
    return {
        f"{first}.{down}": torch.randn(rank, 8, generator=generator),
        f"{first}.{up}": torch.randn(16, rank, generator=generator),
        f"{second}.{down}": torch.randn(rank, 16, generator=generator),
        f"{second}.{up}": torch.randn(4, rank, generator=generator),
    }


def peft_tensors(rank: int = 2) -> dict[str, torch.Tensor]:
    return two_layer_lora(("net.blocks.0.proj", "net.blocks.1.proj_out"), ("lora_A.weight", "lora_B.weight"), 4, rank)


def peft_file(tmp_path: Path, metadata: str, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path = tmp_path / "peft.safetensors"
    save_file(tensors or peft_tensors(), str(path), metadata={"format": "pt", "lora_adapter_metadata": metadata})
    return path


def own_lora(rank: int = 2) -> dict[str, torch.Tensor]:
    tensors = two_layer_lora(("Linear_1", "Linear_2"), ("down.weight", "up.weight"), 3, rank)
    return tensors | {"Linear_2.alpha": torch.tensor(3.0)}


HOSTILE_BUT_REGULAR = [
    "(.*)*\\d\\d\\d\\d",
    "(a+)+$",
    "(a|a)*b",
    "(.*a){12}",
    "(x+x+)+y",
    ".*.*.*.*.*.*.*.*=",
    "(\\w|\\d)*!",
]


@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
@pytest.mark.parametrize("key", HOSTILE_BUT_REGULAR)
def test_catastrophic_backtracking_pattern_keys_are_matched_in_bounded_time(
    field: str, key: str, tmp_path: Path
) -> None:
    names = {f"net.blocks.{i}.{'a' * 60}{'0' * 30}.proj" for i in range(2)}
    tensors = peft_tensors() | {f"{name}.lora_A.weight": torch.ones(2, 8) for name in names}
    tensors |= {f"{name}.lora_B.weight": torch.ones(16, 2) for name in names}
    path = peft_file(tmp_path, json.dumps({"lora_alpha": 4, field: {key: 2}}), tensors)
    model = net()
    start = time.monotonic()
    skipped = LoraManager(model).add("style", path, strict=False)
    assert time.monotonic() - start < 5
    assert len([key for key in skipped if key.endswith(".weight")]) == 4


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("(a)\\1", "groupref"),
        ("(?=a)proj", "assert"),
        ("(?<!x)proj", "assert_not"),
        ("(?i)proj", "sets flags"),
        ("(?i:proj)", "sets flags"),
        ("a*+", "possessive_repeat"),
        ("(?>a*)b", "atomic_group"),
        ("\\bproj", "at_boundary"),
        ("x" * 300, "300 characters long"),
        ("(a{1000}){1000}", "too complex"),
        ("((a{0,50}){0,50}){0,50}", "too complex"),
        ("proj(", "is not a regular expression"),
    ],
)
def test_pattern_keys_that_cannot_be_bounded_are_refused_before_matching_naming_file_and_key(
    key: str, reason: str, tmp_path: Path
) -> None:
    for field in ("alpha_pattern", "rank_pattern"):
        path = peft_file(tmp_path, json.dumps({"unet.lora_alpha": 4, f"unet.{field}": {"proj": 1, key: 2}}))
        model = net()
        before = state_snapshot(model)
        with pytest.raises(WeightsError) as error:
            LoraManager(model).add("style", path)
        message = str(error.value)
        assert message.startswith(f"{path}: its 'lora_adapter_metadata' metadata has a bad unet.{field}")
        assert reason in message.lower() and repr(key)[1:-1][:40] in message
        assert_lora_free(model, before)


def test_too_many_pattern_keys_are_refused(tmp_path: Path) -> None:
    path = peft_file(tmp_path, json.dumps({"alpha_pattern": {f"proj{i}": 1 for i in range(5000)}}))
    with pytest.raises(WeightsError, match="has a bad alpha_pattern: 5000 keys, more than 4096"):
        LoraManager(net()).add("style", path)


@pytest.mark.parametrize(
    ("pattern", "alphas"),
    [
        ({"proj_out": 5}, (4, 5)),
        ({"blocks.1.proj_out": 5}, (4, 5)),
        ({"^net.blocks.0.proj$": 5}, (5, 4)),  # no prefix: the key must match the whole name
        ({"^blocks.0.proj": 5}, (4, 4)),  # `^` only matches at the start of the name
        ({"b.*s\\.[0-9]\\.proj(_out)?": 6}, (6, 6)),
        ({"(proj|proj_out)": 6, "proj_out": 1}, (6, 6)),  # the first key that matches wins
        ({"roj_out": 5}, (4, 4)),  # a key matches after a dot, not inside a name
    ],
)
def test_pattern_keys_match_as_peft_matches_them(
    pattern: dict[str, int], alphas: tuple[int, int], tmp_path: Path
) -> None:
    path = peft_file(tmp_path, json.dumps({"lora_alpha": 4, "alpha_pattern": pattern}))
    model, reference = net(), net()
    LoraManager(model).add("style", path)
    explicit = {
        "net.blocks.0.proj.alpha": torch.tensor(alphas[0]),
        "net.blocks.1.proj_out.alpha": torch.tensor(alphas[1]),
    }
    LoraManager(reference).add("style", peft_tensors() | explicit)
    assert torch.equal(model(X), reference(X))


REGEX_TOKENS = ["a", "b", ".", "\\.", "[ab]", "[^a]", "\\d", "\\w", "(", ")", "|", "*", "+", "?", "{1,2}", "^", "$"]


@settings(max_examples=300, deadline=1000)
@given(
    key=st.lists(st.sampled_from(REGEX_TOKENS), max_size=8).map("".join),
    name=st.text(alphabet="ab.1_", max_size=10),
)
def test_the_bounded_matcher_agrees_with_peft_regular_expressions(key: str, name: str) -> None:
    try:
        re.compile(key)
    except re.error:  # not a regular expression on its own (PEFT would splice `)(` into its own)
        with pytest.raises(PatternError):
            Pattern(key)
        return
    reference = re.match(rf"(.*\.)?({key})$", name) is not None
    try:
        pattern = Pattern(key)
    except PatternError:
        assert any(possessive in key for possessive in ("*+", "++", "?+", "}+")), key
        return
    assert pattern.matches(name) == reference, (key, name)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (own_lora(rank=0), r"'Linear_1.down.weight' has shape \(0, 8\): a rank-0 LoRA"),
        (own_lora() | {"Linear_2.alpha": 3}, "entry 'Linear_2.alpha' is a int, not a tensor"),
        (own_lora() | {"Linear_1.up.weight": [[0.0] * 2] * 16}, "entry 'Linear_1.up.weight' is a list, not a tensor"),
        (own_lora() | {"Linear_1.up.weight": None}, "entry 'Linear_1.up.weight' is a NoneType, not a tensor"),
        (
            own_lora() | {"Linear_1.down.weight": torch.ones(2, 8, dtype=torch.int64)},
            "'Linear_1.down.weight' holds int64",
        ),
        (own_lora() | {"Linear_1.up.weight": torch.ones(16, 2, dtype=torch.bool)}, "'Linear_1.up.weight' holds bool"),
        (own_lora() | {"Linear_1.up.weight": torch.full((16, 2), float("nan"))}, "'Linear_1.up.weight' holds NaN"),
        (own_lora() | {"Linear_1.down.weight": torch.full((2, 8), float("inf"))}, "'Linear_1.down.weight' holds inf"),
        (own_lora() | {"Linear_2.alpha": torch.tensor(float("nan"))}, "'Linear_2.alpha' is nan, not a finite alpha"),
        (own_lora() | {"Linear_2.alpha": torch.tensor(-float("inf"))}, "'Linear_2.alpha' is -inf, not a finite alpha"),
        (own_lora() | {"Linear_2.alpha": torch.tensor(True)}, "'Linear_2.alpha' holds a bool, not a number"),
        (
            own_lora() | {"Linear_2.alpha": torch.tensor(1e38)},
            "'Linear_2.alpha' with scale 10.0 gives the factor 4.99.*beyond float32",
        ),
    ],
    ids=["rank 0", "int", "list", "None", "int64 down", "bool up", "NaN up", "inf down", "NaN", "-inf", "bool", "huge"],
)
def test_bad_lora_values_are_refused_naming_the_source_and_key(tensors: dict[str, Any], match: str) -> None:
    model = net()
    before = state_snapshot(model)
    with pytest.raises(WeightsError, match=f"LoRA state dict 'style': {match}"):
        LoraManager(model).add("style", tensors, scale=10.0)
    assert_lora_free(model, before)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ('{"lora_alpha": NaN}', "gives 'net.blocks.0.proj' the alpha nan, not a finite number"),
        ('{"lora_alpha": Infinity}', "gives 'net.blocks.0.proj' the alpha inf"),
        ('{"lora_alpha": 1e400}', "gives 'net.blocks.0.proj' the alpha inf"),
        ('{"lora_alpha": ' + "9" * 400 + "}", "gives 'net.blocks.0.proj' the alpha 9999"),
        ('{"alpha_pattern": {"proj": -Infinity}}', "gives 'net.blocks.0.proj' the alpha -inf"),
        ('{"alpha_pattern": {"proj": true}}', "gives 'net.blocks.0.proj' the alpha True"),
        ('{"alpha_pattern": ["proj"]}', "has a bad alpha_pattern: a list, not an object"),
        ('{"rank_pattern": 3}', "has a bad rank_pattern: a int, not an object"),
        ("[" * 100_000, "is not JSON"),
    ],
)
def test_bad_peft_alphas_are_refused_naming_the_file(metadata: str, match: str, tmp_path: Path) -> None:
    path = peft_file(tmp_path, metadata)
    model = net()
    before = state_snapshot(model)
    with pytest.raises(WeightsError, match=f"{path}: its 'lora_adapter_metadata' metadata {match}"):
        LoraManager(model).add("style", path)
    assert_lora_free(model, before)


BAD_SCALES = [
    (float("nan"), ValueError, "scale must be a finite number, got nan"),
    (1e39, ValueError, "scale must be a finite number, got 1e+39"),
    (float("inf"), ValueError, "scale must be a finite number, got inf"),
    ("0.5", TypeError, "scale must be a number, got '0.5'"),
    (None, TypeError, "scale must be a number, got None"),
    (True, TypeError, "scale must be a number, got True"),
    (torch.tensor(0.5), TypeError, "scale must be a number, got tensor"),
]


@pytest.mark.parametrize(("scale", "error", "match"), BAD_SCALES)
def test_a_scale_that_is_not_a_finite_number_is_refused_naming_the_argument(
    scale: Any, error: type[Exception], match: str
) -> None:
    model = net()
    before = state_snapshot(model)
    with pytest.raises(error, match=f"LoRA 'style': {re.escape(match)}"):
        LoraManager(model).add("style", own_lora(), scale=scale)
    with pytest.raises(error, match=f"LoRA 'style': {re.escape(match)}"):
        LoraManager(model).create("style", ["Linear_1"], rank=2, scale=scale)
    if scale is not None:  # alpha=None means alpha = rank
        with pytest.raises(error, match=f"LoRA 'style': {re.escape(match.replace('scale', 'alpha'))}"):
            LoraManager(model).create("style", ["Linear_1"], rank=2, alpha=scale)
    assert_lora_free(model, before)
    loras = LoraManager(model)
    loras.add("style", own_lora(), scale=0.5)
    expected = model(X)
    with pytest.raises(error, match=f"LoRA 'style': {re.escape(match)}"):
        loras.set_scale("style", scale)  # pyright: ignore[reportArgumentType]
    assert loras.scale("style") == 0.5 and torch.equal(model(X), expected)


@pytest.mark.parametrize("ejected", [["Linear_1"], ["Linear_2"], ["Linear_1", "Linear_2"]])
def test_remove_finishes_when_adapters_were_ejected_by_hand_and_the_name_is_free_again(ejected: list[str]) -> None:
    model = net()
    before = state_snapshot(model)
    targets = [model.get_submodule(path) for path in ejected]
    loras = LoraManager(model)
    loras.add("style", own_lora())
    for adapter in list(model.layers(LoraAdapter)):
        if any(adapter.target is target for target in targets):
            adapter.eject()
    with pytest.raises(RuntimeError, match="cannot fuse: the adapter of LoRA 'style' on .* was ejected by hand"):
        loras.fuse()
    loras.remove("style")
    assert_lora_free(model, before)
    loras.add("style", own_lora())
    assert loras.names == ("style",)


def test_remove_refuses_cleanly_when_an_adapter_cannot_be_ejected_and_changes_nothing() -> None:
    model = net()
    loras = LoraManager(model)
    loras.add("style", own_lora())
    adapters = list(model.layers(LoraAdapter))
    moved = adapters[0]
    model.replace(moved, fl.Identity())  # the model is edited: this adapter is no longer where it was injected
    structure = [type(layer) for layer in model.modules()]
    with pytest.raises(RuntimeError, match="cannot remove LoRA 'style': cannot eject .* nothing was ejected"):
        loras.remove("style")
    assert [type(layer) for layer in model.modules()] == structure
    assert loras.names == ("style",) and all(adapter.is_injected for adapter in adapters)


metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
pattern_keys = st.one_of(st.lists(st.sampled_from(REGEX_TOKENS), max_size=12).map("".join), st.text(max_size=12))


@settings(max_examples=120, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.dictionaries(
        st.sampled_from(["lora_alpha", "r", "use_rslora", "alpha_pattern", "rank_pattern", "net.lora_alpha", "x.y"]),
        st.one_of(metadata_values, st.dictionaries(pattern_keys, metadata_values, max_size=4)),
        max_size=4,
    ),
    raw=st.one_of(st.none(), st.text(max_size=20)),
)
def test_random_peft_metadata_loads_or_is_refused_naming_the_file(
    config: dict[str, Any], raw: str | None, tmp_path: Path
) -> None:
    path = peft_file(tmp_path, raw if raw is not None else json.dumps(config))
    model = net()
    before = state_snapshot(model)
    try:
        LoraManager(model).add("style", path)
    except WeightsError as error:
        assert str(error).startswith(str(path))
        assert_lora_free(model, before)
    else:
        assert LoraManager(model).names == ("style",)


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".bin"])
def test_a_peft_safetensors_file_named_as_a_torch_checkpoint_keeps_its_metadata_alphas(
    suffix: str, tmp_path: Path
) -> None:
    metadata = json.dumps({"lora_alpha": 4, "alpha_pattern": {"proj_out": 1}})
    path = peft_file(tmp_path, metadata)
    model = net()
    LoraManager(model).add("style", path)
    expected = model(X)
    renamed = path.rename(path.with_suffix(suffix))
    model = net()
    loras = LoraManager(model)
    loras.add("style", renamed)
    assert torch.equal(model(X), expected)
    loras.remove("style")
    assert not torch.equal(model(X), expected)  # the LoRA (and its alphas) made the difference


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 9\n", "it is a git-lfs pointer"),
        (b"", "the file is empty"),
        (b"<html>not found</html>", "(neither safetensors nor a torch checkpoint|truncated or not safetensors)"),
        ((10**6).to_bytes(8, "little") + b'{"x": 1}', r"its header claims 1000000 bytes"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_lora_file_that_is_no_weights_file_is_named_for_what_it_is(
    content: bytes, match: str, suffix: str, tmp_path: Path
) -> None:
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(content)
    model = net()
    before = state_snapshot(model)
    with pytest.raises(WeightsError, match=f"^cannot read {re.escape(str(path))}.*{match}"):
        LoraManager(model).add("style", path)
    assert_lora_free(model, before)
