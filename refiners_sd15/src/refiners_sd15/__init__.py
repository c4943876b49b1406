"""Stable Diffusion 1.5 for refiners: CLIP text encoder and tokenizer, UNet, autoencoder, solvers and pipelines."""

from importlib.metadata import version

__version__ = version("refiners-sd15")
