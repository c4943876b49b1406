"""`refiners demo`: the ecosystem at work on a small model, offline, with no downloaded weights.

It builds a small Vision Transformer (the Refiners README's, with cross-attention fed through the Context
API), looks up the `lora` adapter in the plugin registry (contributed by refiners-lora), injects it into
every attention projection, checks that a fresh LoRA changes nothing and a trained one does, then ejects
every adapter and checks that the model's weights and outputs are restored bit for bit.

Then it runs the demo of every registered model that offers one (`ModelSpec.demo`), e.g. refiners-sd15's, which
generates an image with a scaled-down Stable Diffusion 1.5 and a LoRA; their checks are listed with these.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, cast

import torch

import refiners_core.fluxion as fl
from refiners_core.plugins import registry


class DemoViT(fl.Chain):
    """The Refiners README's Vision Transformer, with cross-attention to a context embedding."""

    def __init__(self, embedding_dim: int, patch_size: int, image_size: int, num_layers: int, num_heads: int) -> None:
        patches_per_side = image_size // patch_size
        num_patches = patches_per_side**2
        super().__init__(
            fl.Conv2d(3, embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches, embedding_dim),
            fl.Residual(fl.Parameter(num_patches, embedding_dim)),
            *(
                fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Parallel(
                            fl.Identity(),
                            fl.UseContext(context="cross_attention", key="embedding"),
                            fl.UseContext(context="cross_attention", key="embedding"),
                        ),
                        fl.Attention(embedding_dim=embedding_dim, num_heads=num_heads),
                    ),
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                )
                for _ in range(num_layers)
            ),
            fl.Reshape(embedding_dim, patches_per_side, patches_per_side),
        )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="do not print the model tree")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("."),
        help="where model demos write their files, e.g. an image (default: the current directory)",
    )


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)  # pyright: ignore[reportUnknownMemberType]
    start = time.perf_counter()
    print("refiners demo: a small ViT, built offline with random weights, adapted with LoRA from a plugin.\n")

    model = DemoViT(embedding_dim=192, patch_size=8, image_size=64, num_layers=4, num_heads=3).eval()
    images = torch.randn(2, 3, 64, 64)
    embedding = torch.randn(2, 10, 192)
    model.set_context("cross_attention", {"embedding": embedding})
    if not args.quiet:
        print(model, "\n")

    adapters = registry().adapters
    if "lora" not in adapters:
        print("No `lora` adapter is registered: install refiners-lora (`refiners plugins` shows what is installed).")
        return 1
    lora = adapters["lora"]
    print(f"adapter 'lora' from the plugin registry: {lora.summary}")

    checks: list[tuple[str, bool]] = []
    with torch.no_grad():
        original_state = {key: value.clone() for key, value in model.state_dict().items()}
        original_output = model(images)

        injected = [
            _as_layer(lora.create(target=linear, rank=args.rank).inject(parent))
            for attention in model.layers(fl.Attention)
            for linear, parent in attention.walk(fl.Linear)
        ]
        new_parameters = [parameter for adapter in injected for parameter in _own_parameters(adapter)]
        added = sum(parameter.numel() for parameter in new_parameters)
        print(f"injected {len(injected)} LoRA adapters (rank {args.rank}): {added:,} new trainable parameters")
        print(f"  e.g. at `{injected[0].get_path()}`")

        fresh_difference = (model(images) - original_output).abs().max().item()
        checks.append(
            (f"a fresh LoRA leaves outputs unchanged (max |diff| = {fresh_difference:.1e})", fresh_difference == 0)
        )

        for parameter in new_parameters:  # stands for training: any adapter's own weights move
            torch.nn.init.normal_(parameter, std=0.02)
        trained_difference = (model(images) - original_output).abs().max().item()
        checks.append(
            (f"a trained LoRA changes outputs (max |diff| = {trained_difference:.3f})", trained_difference > 0)
        )

        model.set_context("cross_attention", {"embedding": torch.randn(2, 10, 192)})
        context_difference = (model(images) - original_output).abs().max().item()
        checks.append(("a new cross-attention context reaches every block", context_difference > trained_difference))

        for adapter in reversed(injected):
            cast(fl.Adapter[fl.Module], adapter).eject()
        restored_state = model.state_dict()
        same_weights = list(restored_state) == list(original_state) and all(
            torch.equal(restored_state[key], original_state[key]) for key in original_state
        )
        checks.append(("after eject, the state_dict is exactly the original (keys and tensors)", same_weights))
        model.set_context("cross_attention", {"embedding": embedding})
        restored_output = model(images)
        checks.append(("after eject, outputs are bit-identical", torch.equal(restored_output, original_output)))

    checks += _model_demos(args)
    print()
    for description, passed in checks:
        print(f"  [{'ok' if passed else 'FAILED'}] {description}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0 if all(passed for _, passed in checks) else 1


def _model_demos(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """Run the demo of every registered model that offers one; a demo that raises is a failed check."""
    checks: list[tuple[str, bool]] = []
    for name, spec in sorted(registry().models.items()):
        if spec.demo is None:
            continue
        print(f"\nmodel {name!r} from the plugin registry: {spec.summary}")
        try:
            results = spec.demo(seed=args.seed, lora_rank=args.rank, output_dir=args.output_dir, quiet=args.quiet)
            checks += [(f"{name}: {description}", bool(passed)) for description, passed in results]
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a plugin's demo, sys.exit included: report it as a failed check
            checks.append((f"{name}: the demo raised {type(error).__name__}: {error}", False))
    return checks


def _as_layer(adapter: fl.Adapter[Any]) -> fl.Chain:
    if not isinstance(adapter, fl.Chain):
        raise TypeError(f"the 'lora' adapter should be a Chain, got {type(adapter).__name__}")
    return adapter


def _own_parameters(adapter: fl.Chain) -> list[torch.nn.Parameter]:
    """The parameters an adapter adds to the model (not those of the layer it wraps)."""
    wrapped = {id(parameter) for parameter in cast(fl.Adapter[fl.Module], adapter).target.parameters()}
    return [parameter for parameter in adapter.parameters() if id(parameter) not in wrapped]
