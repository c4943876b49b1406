"""Evaluation prompts rendered to PNG files, to watch a LoRA learn from one checkpoint to the next."""

from __future__ import annotations

from pathlib import Path

import torch

from refiners_sd15 import DDIM, StableDiffusion_1
from refiners_training.config import EvaluationConfig


@torch.no_grad()
def render_prompts(sd: StableDiffusion_1, config: EvaluationConfig, resolution: int, folder: Path) -> list[Path]:
    """Render every prompt with DDIM (`config.steps` steps, same seed each time) into `folder/NN.png`.

    The model's solver and progress setting are restored afterwards. Returns the paths written.
    """
    if not config.prompts:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    solver, show_progress = sd.solver, sd.show_progress
    sd.solver, sd.show_progress = DDIM(num_inference_steps=config.steps), False
    size = config.resolution or resolution
    paths: list[Path] = []
    try:
        for index, prompt in enumerate(config.prompts):
            embedding = sd.compute_clip_text_embedding(prompt, negative_text=config.negative_prompt)
            x = sd.init_latents(size=(size, size), seed=config.seed)
            for step in sd.steps:
                x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=config.condition_scale)
            path = folder / f"{index:02d}.png"
            sd.lda.latents_to_image(x).save(path)
            paths.append(path)
    finally:
        sd.solver, sd.show_progress = solver, show_progress
    return paths
