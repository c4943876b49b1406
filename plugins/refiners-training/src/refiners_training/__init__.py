"""refiners-training: fine-tune LoRAs on Stable Diffusion 1.5 and SDXL (with the `sdxl` extra), resumable, single- or
multi-process (torchrun).

from refiners_training import TrainingConfig, train_lora

result = train_lora(TrainingConfig.from_toml("my-lora.toml"))  # or `refiners train lora my-lora.toml`
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_training.checkpoint import CheckpointError
    from refiners_training.config import (
        ConfigError,
        DataConfig,
        EvaluationConfig,
        ExportConfig,
        LoraConfig,
        ModelConfig,
        OptimizationConfig,
        TrainingConfig,
    )
    from refiners_training.dataset import CaptionedImages, DatasetError
    from refiners_training.trainer import TrainingError, TrainingResult, train_lora


try:
    __version__ = version("refiners-training")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CheckpointError": "refiners_training.checkpoint",
        "ConfigError": "refiners_training.config",
        "DataConfig": "refiners_training.config",
        "EvaluationConfig": "refiners_training.config",
        "ExportConfig": "refiners_training.config",
        "LoraConfig": "refiners_training.config",
        "ModelConfig": "refiners_training.config",
        "OptimizationConfig": "refiners_training.config",
        "TrainingConfig": "refiners_training.config",
        "CaptionedImages": "refiners_training.dataset",
        "DatasetError": "refiners_training.dataset",
        "TrainingError": "refiners_training.trainer",
        "TrainingResult": "refiners_training.trainer",
        "train_lora": "refiners_training.trainer",
    },
)

__all__ = [
    "CaptionedImages",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DatasetError",
    "EvaluationConfig",
    "ExportConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimizationConfig",
    "TrainingConfig",
    "TrainingError",
    "TrainingResult",
    "__version__",
    "train_lora",
]
