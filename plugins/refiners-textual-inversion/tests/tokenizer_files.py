"""transformers `CLIPTokenizer` files for the references of the parity tests, written offline from the vocabulary
refiners-sd15 ships (SD1.5's and SDXL's tokenizers share it)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from refiners_sd15.clip.tokenizer import DEFAULT_VOCABULARY_PATH


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt from refiners-sd15's shipped merges file, as CLIP builds its vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.decompress(DEFAULT_VOCABULARY_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocabulary = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge.split()) for merge in merges)]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
