"""Evaluation prompts rendered to PNG files, to watch a LoRA learn from one checkpoint to the next."""

from __future__ import annotations

from pathlib import Path

import torch

from refiners_sd15 import DDIM
from refiners_training.config import EvaluationConfig
from refiners_training.models import TrainedModel


def tokenize_prompts(model: TrainedModel, config: EvaluationConfig) -> list[torch.Tensor]:
    """The token ids of each prompt, its negative prompt first (2 rows): tokenized once for the whole run."""
    return [model.tokenize([config.negative_prompt, prompt]) for prompt in config.prompts]


@torch.no_grad()
def render_prompts(
    model: TrainedModel, config: EvaluationConfig, tokens: list[torch.Tensor], resolution: int, folder: Path
) -> list[Path]:
    """Render every prompt (`tokens`, from `tokenize_prompts`) with DDIM (`config.steps` steps, same seed each time)
    into `folder/NN.png`.

    The model's solver and progress setting are restored afterwards. Returns the paths written.
    """
    if not tokens:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.sd
    solver, show_progress = sd.solver, sd.show_progress
    sd.solver, sd.show_progress = DDIM(num_inference_steps=config.steps), False
    size = config.resolution or resolution
    paths: list[Path] = []
    try:
        for index, prompt_tokens in enumerate(tokens):
            conditions = model.prompt_conditions(prompt_tokens, size)
            x = sd.init_latents(size=(size, size), seed=config.seed)
            for step in sd.steps:
                x = sd(x, step=step, **conditions, condition_scale=config.condition_scale)
            path = folder / f"{index:02d}.png"
            sd.lda.latents_to_image(x).save(path)
            paths.append(path)
    finally:
        sd.solver, sd.show_progress = solver, show_progress
    return paths
