"""refiners-training: fine-tune LoRAs on Stable Diffusion 1.5 and SDXL (with the `sdxl` extra), resumable, single- or
multi-process (torchrun).

from refiners_training import TrainingConfig, train_lora

result = train_lora(TrainingConfig.from_toml("my-lora.toml"))  # or `refiners train lora my-lora.toml`
"""

from importlib.metadata import PackageNotFoundError, version

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
