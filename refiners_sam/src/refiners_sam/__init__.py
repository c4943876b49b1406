"""Segment Anything for refiners: image encoder, prompt encoder, mask decoder and predictor."""

from importlib.metadata import version

__version__ = version("refiners-sam")
