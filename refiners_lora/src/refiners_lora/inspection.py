"""What a LoRA file holds and whether it would load onto a model, told before anything is loaded.

The file is read from its safetensors header (`refiners_core.weights.read_safetensors_shapes`: shapes only, alphas
read), the model is built on the meta device from its configs (`ModelSpec.architecture` of the registered model),
and `refiners_lora.planning.plan_lora`, the code `LoraManager.add` runs, matches one to the other. `refiners lora
inspect` prints the `LoraReport`; its JSON form is documented in the package's README.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import refiners_core.fluxion as fl
from refiners_core.model_kinds import detect_model
from refiners_core.plugins import ModelSpec, registry
from refiners_core.weights import WeightsError, read_safetensors_shapes
from refiners_lora.base_models import guess_base_model
from refiners_lora.formats import parse_lora, unsupported_family
from refiners_lora.planning import LoraPlan, input_weights, plan_lora

UNRECOGNIZED = "unrecognized"
"""The family reported for a module whose keys make no family (its problem says why)."""

BASE_MODEL_KINDS = {"SD1.5": "sd15", "SDXL": "sdxl"}
"""The base models `refiners_lora.base_models` tells apart -> the registered model kind built for them."""


@dataclass(frozen=True)
class Component:
    """A direct child of the model (`unet`, `clip_text_encoder`...) and how many of its layers the file patches."""

    name: str
    patched: int
    """The layers the file's modules patch."""
    layers: int
    """The Linear and Conv2d layers it has, which a LoRA can patch."""


@dataclass(frozen=True)
class Problem:
    """Keys that would not load (empty `keys`: the whole file) and why."""

    keys: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class LoraReport:
    """What `inspect_lora` found: the file, the model it was checked against, the plan, its problems.

    Families (from `refiners_lora.families.recognize`), ranks and alphas are those of every module of the file;
    `components` count the layers of the modules that would load.
    """

    file: str
    model: str
    """The registered model kind, e.g. "sd15"."""
    model_source: str | None
    """The folder or file the model's configs were read from; None for the published architecture."""
    model_class: str
    guessed_from: str | None
    """What in the file told the model when none was given (None when it was given)."""
    plan: LoraPlan
    components: list[Component]
    problems: list[Problem]

    @property
    def loads(self) -> bool:
        """Whether `LoraManager.add` (strict) would load every key of the file."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The report as the README's "`refiners lora inspect --json`" section documents it."""
        modules = self.plan.modules
        return {
            "file": self.file,
            "format": self.plan.format,
            "model": {
                "kind": self.model,
                "source": self.model_source,
                "class": self.model_class,
                "guessed_from": self.guessed_from,
            },
            "modules": len(modules),
            "modules_matched": len(self.plan.applicable),
            "families": dict(sorted(Counter(module.family or UNRECOGNIZED for module in modules).items())),
            "ranks": [
                {"rank": rank, "modules": n}
                for rank, n in sorted(Counter(m.rank for m in modules).items(), key=lambda item: item[0] or 0)
            ],
            "alphas": [{"alpha": alpha, "modules": n} for alpha, n in sorted_alphas(Counter(m.alpha for m in modules))],
            "components": [
                {"name": c.name, "patched": c.patched, "layers": c.layers} for c in self.components if c.patched
            ],
            "problems": [{"keys": list(problem.keys), "reason": problem.reason} for problem in self.problems],
            "loads": self.loads,
        }


def inspect_lora(path: str | Path, model: str | None = None) -> LoraReport:
    """Check the LoRA safetensors file `path` against `model`: a registered model kind ("sd15", "sdxl") or a local
    folder or file one of them recognizes (`ModelSpec.detect`), built from its configs; None: the kind the file's keys
    show (`refiners_lora.base_models.guess_base_model`), published architecture.

    Reads the file's header and its scalars only, and no weight of the model. Raises FileNotFoundError for a missing
    file, WeightsError naming the file when it is not safetensors or not a LoRA (`parse_lora`), ValueError naming
    `model` when no installed plugin offers it or can build it without its weights (`ModelSpec.architecture`), or
    when the file does not tell its model and none is given.
    """
    path = Path(path)
    tensors, metadata = read_safetensors_shapes(path)
    guessed_from: str | None = None
    source: str | None = None
    if model is None:
        kind, guessed_from = _guess(path, tensors)
    elif model in registry().models:
        kind = model
    elif Path(model).expanduser().exists():
        kind, source = _detect(model), model
    else:
        raise ValueError(f"--model {model}: not a model kind ({_kinds()}) nor a local folder or file")
    built = _architecture(kind)(source, device="meta")
    plan = plan_lora(built, tensors, str(path), metadata)
    problems = [Problem(refusal.keys, refusal.reason) for refusal in plan.refused]
    by_reason: dict[str, list[str]] = {}
    for key, reason in plan.unmatched_reasons.items():
        by_reason.setdefault(reason, []).append(key)
    problems += [Problem(tuple(keys), reason) for reason, keys in by_reason.items()]
    return LoraReport(
        str(path), kind, source, type(built).__name__, guessed_from, plan, _components(built, plan), problems
    )


def _guess(path: Path, tensors: dict[str, Any]) -> tuple[str, str]:
    supported = {key: tensor for key, tensor in tensors.items() if unsupported_family(key, str(path)) is None}
    try:
        parsed = parse_lora(supported, str(path))
    except WeightsError:
        parsed = parse_lora(tensors, str(path))  # its error names the first key of an unsupported family, if any
    guessed = guess_base_model(input_weights(parsed))
    kind = BASE_MODEL_KINDS.get(guessed[0]) if guessed else None
    if guessed is None or kind is None or kind not in registry().models:
        what = f"a LoRA for {guessed[0]} ({guessed[1]}), not a kind" if guessed else "no base model"
        raise ValueError(f"{path}: its keys show {what}: pass --model {_kinds()} or a model folder")
    return kind, f"{guessed[0]}: {guessed[1]}"


def _detect(source: str) -> str:
    found = detect_model(source)
    if found is None:
        raise ValueError(f"--model {source}: no installed model kind recognizes what it holds")
    return found[0]


def _architecture(kind: str) -> Any:
    spec: ModelSpec = registry().models[kind]
    if spec.architecture is None:
        raise ValueError(f"--model {kind}: its plugin cannot build it without its weights (no ModelSpec.architecture)")
    return spec.architecture


def _kinds() -> str:
    kinds = sorted(name for name, spec in registry().models.items() if spec.architecture is not None)
    return "|".join(kinds) or "none installed"


def _components(model: nn.Module, plan: LoraPlan) -> list[Component]:
    patched = Counter(module.path.partition(".")[0] for module in plan.applicable if module.path is not None)
    return [
        Component(name, patched[name], sum(isinstance(m, fl.Linear | fl.Conv2d) for m in child.modules()))
        for name, child in model.named_children()
    ]


def sorted_alphas(counts: Counter[float | None]) -> list[tuple[float | None, int]]:
    """`counts` (alpha -> modules) by increasing alpha, None (no alpha: alpha = rank) last."""
    return sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or 0.0))
