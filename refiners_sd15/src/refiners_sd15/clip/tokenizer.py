"""CLIP's byte-pair-encoding tokenizer, as Stable Diffusion 1.5 uses it.

Reference of record: transformers 5's `CLIPTokenizer`, which runs the Rust `tokenizers` library (it is the former
`CLIPTokenizerFast`; transformers 5 has no slow CLIP tokenizer). That is what current `diffusers` loads from SD1.5's
`tokenizer/` folder. The ids are those of `CLIPTokenizer.from_pretrained(folder)(text, padding="max_length",
max_length=77, truncation=True)`, for any text. Text goes through:

1. the exact strings `<|startoftext|>` and `<|endoftext|>` become their special ids; the text between them goes
   through the next steps on its own;
2. NFC normalization, with the Unicode 9.0 tables of the `unicode-normalization-alignments` crate: a character
   assigned since that has a combining class, a decomposition or a part in one (`_NFC_UNKNOWN`) is left as it is,
   and nothing composes or reorders across it;
3. lowercasing, one character at a time, by Rust's `char::to_lowercase` (Unicode 17.0): `Σ` is always `σ`, never
   the final `ς` that `str.lower` writes at the end of a word, `İ` is `i̇`, `ſ` stays `ſ`;
4. CLIP's split pattern, `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
   [^\\s\\p{L}\\p{N}]+` (case-sensitive, run by Oniguruma with its Unicode 16.0 tables): letter runs, single digits,
   runs of anything else; whitespace separates pieces and is dropped. It is reproduced without `regex` by mapping
   each character to an ASCII stand-in (a space, `z` for a letter, `0` for a number, `!` for anything else) and
   running the ASCII pattern with `re` on the stand-ins. `\\s` is Unicode's White_Space: U+001C to U+001F, spaces
   to `str.isspace`, are not;
5. the byte-level pre-tokenizer splits each piece again with GPT-2's pattern. That only changes the special token
   names step 4 finds after lowercasing (`<|EndOfText|>`, `<|STARTOFTEXT|>`): each becomes `<|`, the name and `|>`;
6. byte-pair encoding of each piece, its last symbol ending in `</w>`.

Python's `unicodedata` (Unicode 14.0 on Python 3.11, 16.0 on 3.14) and the three tables compiled into `tokenizers` 0.23
(NFC 9.0, lowercasing 17.0, Oniguruma 16.0) disagree on recently assigned characters (and on U+001C to U+001F, see step
4). `_NFC_UNKNOWN`, `_LOWERCASE` and `_STAND_IN_OVERRIDES` list every such code point for Python's Unicode 14.0 to 17.0
(derived from `unicodedata`, `unicodedata2` 17.0 and the behaviour of `tokenizers` 0.23.3 on every code point). With
them the ids matched transformers 5.23 on every code point, in eleven contexts each, on Python 3.11, 3.12 and 3.13. A
Python with Unicode data newer than 17.0, or a `tokenizers` release with other tables, can differ on characters assigned
after 16.0: `tokenizers` 0.22.1 (Rust's Unicode 16.0) does not lowercase U+A7CE, U+A7D2, U+A7D4 and U+16EA0 to U+16EB8.

Other CLIP tokenizers agree with this one on most prompts (words in any alphabet, accents, emoji without joiners,
weights syntax, contractions in any case) and differ on:

- transformers 4.31 to 4.57's slow `CLIPTokenizer` without `ftfy` (the default `CLIPTokenizer` before transformers 5):
  it drops control, format and unassigned characters (U+200B, the U+200D joining emoji sequences, U+00AD, U+FEFF,
  NUL), which joins the words around them, and U+FFFD; it makes each CJK ideograph a word of its own, lowercases a
  final `Σ` to `ς` and matches its split pattern case-insensitively, so that `<|ENDOFTEXT|>` is the special token,
  `'ſ` is a contraction and U+0345 separates pieces. Before 4.31 it also stripped accents and split punctuation;
- the same slow tokenizer with `ftfy` installed, and OpenAI's original tokenizer that the CLIP text encoder was
  trained with: `ftfy.fix_text` and HTML unescaping replace the cleaning above. `&amp;` is `&`, curly quotes are
  straight, full-width forms and ligatures (`ﬁ`, `ĳ`) are folded, mojibake is repaired;
- transformers 4.x's `CLIPTokenizerFast`: the same pipeline, up to the Unicode tables of its `tokenizers` release,
  but its split pattern has no special token names, so that `<|EndOfText|>>` ends in `|>>` rather than `|>`, `>`.

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` beside this module is the merges list OpenAI published with CLIP
(repository openai/CLIP, MIT licence, Copyright (c) 2021 OpenAI), copied unchanged from the `open_clip_torch` 3.3.0
wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`), sha256
924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import refiners_core.fluxion as fl

DEFAULT_VOCABULARY_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

_MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps this many merges from the file: 49408 tokens in all
_START_OF_TEXT = "<|startoftext|>"
_END_OF_TEXT = "<|endoftext|>"
# CLIP's split pattern, on the ASCII stand-ins of `_STAND_INS`: `z` stands for any other letter, `0` for any number,
# `!` for anything else that is not a space. Its `special` group finds the names that step 5 of the module docstring
# splits again.
_PIECES = re.compile(
    r"(?P<special><\|startoftext\|>|<\|endoftext\|>)|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", flags=re.ASCII
)
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]")  # what `_PIECES` reads as a space: pieces never span one
_MAX_COMPOSED = 4  # NFC makes one character of at most 4 (U+1F82 is U+03B1 U+0313 U+0300 U+0345)
_CACHE_SIZE = 1 << 16  # pieces whose ids are kept; the cache is emptied when it is full


def _code_points(ranges: str) -> list[int]:
    """The code points of space-separated hexadecimal code points and ranges, such as `"1C-1F 88F"`."""
    bounds = [[int(bound, 16) for bound in item.split("-")] for item in ranges.split()]
    return [code_point for bound in bounds for code_point in range(bound[0], bound[-1] + 1)]


# The tables below make `unicodedata` agree with `tokenizers` 0.23 on every code point, for Python's Unicode 14.0 to
# 17.0 (see the module docstring). Characters assigned after Unicode 9.0 with a combining class, a canonical
# decomposition or a part in one, that `tokenizers`' NFC leaves alone:
_NFC_UNKNOWN_CODE_POINTS = (
    "7FD 897-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1ADD 1AE0-1AEB 1DF6-1DFA A82C 105C9 105D2 105DA 105E4"
    " 10D24-10D27 10D69-10D6D 10EAB-10EAC 10EFA-10EFB 10EFD-10EFF 10F46-10F50 10F82-10F85 11070 1133B 11382-11385"
    " 1138B 1138E 11390-11391 113B8 113BB 113C2 113C5 113C7-113C9 113CE-113D0 1145E 11839-1183A 11930 11935 11938"
    " 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42 11D44-11D45 11D97 11F41-11F42 1611E-16129 1612F 16D63"
    " 16D67-16D6A 16FF0-16FF1 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5"
)
_NFC_UNKNOWN = re.compile("([" + "".join(map(chr, _code_points(_NFC_UNKNOWN_CODE_POINTS))) + "])")
# Rust's lowercase where `str.lower` differs: always `σ` for `Σ`, and the case pairs added by Unicode 16.0 and 17.0,
# given as (first, last, lowercase of first) ranges.
_LOWERCASE = {ord("Σ"): "σ"} | {
    code_point: chr(lower + code_point - first)
    for first, last, lower in [
        (0x1C89, 0x1C89, 0x1C8A),
        (0xA7CB, 0xA7CB, 0x0264),
        (0xA7CC, 0xA7CC, 0xA7CD),
        (0xA7CE, 0xA7CE, 0xA7CF),
        (0xA7D2, 0xA7D2, 0xA7D3),
        (0xA7D4, 0xA7D4, 0xA7D5),
        (0xA7DA, 0xA7DA, 0xA7DB),
        (0xA7DC, 0xA7DC, 0x019B),
        (0x10D50, 0x10D65, 0x10D70),
        (0x16EA0, 0x16EB8, 0x16EBB),
    ]
    for code_point in range(first, last + 1)
}
# Oniguruma's stand-in where `unicodedata`'s category gives another: U+001C to U+001F are not `\s`, the letters and
# numbers of Unicode 15.0 and 16.0 are `\p{L}` and `\p{N}`, those of Unicode 17.0 are neither.
_STAND_IN_OVERRIDES = {
    code_point: stand_in
    for stand_in, ranges in [
        (
            "z",
            "1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240 11380-11389"
            " 1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 11F04-11F10 11F12-11F33 1342F 13441-13446"
            " 13460-143FA 16100-1611D 16D40-16D6C 18CFF 1B132 1B155 1DF25-1DF2A 1E030-1E06D 1E4D0-1E4EB 1E5D0-1E5ED"
            " 1E5F0 2B739 2EBF0-2EE5D 31350-323AF",
        ),
        (
            "0",
            "10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9 1D2C0-1D2D3"
            " 1E4F0-1E4F9 1E5F1-1E5FA",
        ),
        (
            "!",
            "1C-1F 88F C5C CDC A7CE-A7CF A7D2 A7D4 A7F1 10940-10959 10EC5-10EC7 11DB0-11DDB 11DE0-11DE9 16EA0-16EB8"
            " 16EBB-16ED3 16FF2-16FF6 187F8-187FF 18D09-18D1E 18D80-18DF2 1E6C0-1E6DE 1E6E0-1E6E2 1E6E4-1E6E5"
            " 1E6E7-1E6ED 1E6F0-1E6F4 1E6FE-1E6FF 2B73A-2B73F 2CEA2-2CEAD 323B0-33479",
        ),
    ]
    for code_point in _code_points(ranges)
}


class _StandIns(dict[int, str]):
    """`str.translate` table mapping each character to the ASCII character `_PIECES` reads in its place.

    Filled in from `unicodedata` as characters are met, over `_STAND_IN_OVERRIDES`.
    """

    def __missing__(self, codepoint: int) -> str:
        char = chr(codepoint)
        category = unicodedata.category(char)
        if char.isspace():
            value = " "
        elif codepoint < 128:
            value = char
        elif category[0] == "L":
            value = "z"
        elif category[0] == "N":
            value = "0"
        else:
            value = "!"
        self[codepoint] = value
        return value


_STAND_INS = _StandIns(_STAND_IN_OVERRIDES)


def _nfc(text: str) -> str:
    """NFC with Unicode 9.0's tables: text between the characters of `_NFC_UNKNOWN` is normalized on its own."""
    parts = _NFC_UNKNOWN.split(text)
    return "".join(
        part if index % 2 else unicodedata.normalize("NFC", _canonical_order(part)) for index, part in enumerate(parts)
    )


def _canonical_order(text: str) -> str:
    """`text` with each run of combining characters stably sorted by combining class, as NFC orders them.

    NFC gives the same result from it, but in linear time: CPython sorts a run by insertion, quadratic in its length
    (a 100 000-mark run took 40 s). Canonical decompositions of combining characters keep their class, and the
    classes of characters assigned after Unicode 9.0, which Python's tables may have, are split off before.
    """
    if text.isascii():
        return text
    ordered: list[str] = []
    run: list[str] = []
    for char in text:
        if unicodedata.combining(char):
            run.append(char)
            continue
        if run:
            ordered.extend(sorted(run, key=unicodedata.combining))
            run = []
        ordered.append(char)
    ordered.extend(sorted(run, key=unicodedata.combining))
    return "".join(ordered)


def _chunks(text: str) -> Iterator[str]:
    """`text` cut before each space: a space ends any piece and NFC composes nothing across it, so the chunks are
    normalized and split into pieces on their own with the same result as the whole text."""
    start = 0
    for match in _WHITESPACE.finditer(text):
        if match.start() > start:
            yield text[start : match.start()]
            start = match.start()
    yield text[start:]


def _pieces(text: str) -> Iterator[str]:
    """The pieces of text without special tokens that are byte-pair encoded, steps 2 to 5 of the module docstring."""
    text = _nfc(text).translate(_LOWERCASE).lower()
    for match in _PIECES.finditer(text.translate(_STAND_INS)):
        piece = text[match.start() : match.end()]
        if match.lastgroup:
            yield from (piece[:2], piece[2:-2], piece[-2:])
        else:
            yield piece


def _byte_symbols() -> dict[int, str]:
    """The printable character standing for each byte in CLIP's vocabulary, in vocabulary order.

    Printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {byte: chr(byte) for byte in printable} | {byte: chr(256 + index) for index, byte in enumerate(others)}


class CLIPTokenizer(fl.Module):
    """Turns prompts into the token ids of CLIP's text encoder, as Stable Diffusion 1.5's tokenizer does.

    Each prompt becomes `start_of_text_token_id`, at most `sequence_length - 2` content tokens (longer prompts are
    cut, like transformers' `truncation=True`), `end_of_text_token_id`, then `pad_token_id` up to `sequence_length`.
    See the module docstring for the reference implementation matched and how the text is split.

    Args:
        vocabulary_path: a gzipped CLIP merges file; defaults to the one shipped with this package.
        sequence_length: number of ids per prompt, special tokens included.
        start_of_text_token_id: id put first, and given to `<|startoftext|>` written in a prompt.
        end_of_text_token_id: id put after the content, and given to `<|endoftext|>` written in a prompt.
        pad_token_id: id filling the rest of the sequence (SD1.5 pads with `<|endoftext|>`, SDXL's second tokenizer
            with `!`, id 0). The pad token is special, as transformers makes it: its vocabulary entry written in a
            prompt (`!` for id 0) is that id on its own, cut out of the text around it (`wow!!` is `wow</w>`, 0, 0).

    Raises:
        ValueError: if `sequence_length` leaves no room for the two special tokens, or the merges file is malformed.
        OSError: if the vocabulary file cannot be read.
    """

    def __init__(
        self,
        vocabulary_path: Path | None = None,
        sequence_length: int = 77,
        start_of_text_token_id: int = 49406,
        end_of_text_token_id: int = 49407,
        pad_token_id: int = 49407,
    ) -> None:
        super().__init__()
        if sequence_length < 2:
            raise ValueError(
                f"CLIPTokenizer expects sequence_length >= 2 (start and end of text tokens), got {sequence_length}"
            )
        self.sequence_length = sequence_length
        self.start_of_text_token_id = start_of_text_token_id
        self.end_of_text_token_id = end_of_text_token_id
        self.pad_token_id = pad_token_id
        path = vocabulary_path or DEFAULT_VOCABULARY_PATH
        file = path.stat()
        tables = _vocabulary_tables(path.resolve(), file.st_mtime_ns, file.st_size)
        self._merge_ranks, vocabulary, self._token_ids, self._longest_token = tables  # shared, never changed
        byte_symbols = _byte_symbols()
        self._special_ids = {_START_OF_TEXT: start_of_text_token_id, _END_OF_TEXT: end_of_text_token_id}
        if pad_token_id not in self._special_ids.values() and 0 <= pad_token_id < len(vocabulary):
            self._special_ids[vocabulary[pad_token_id]] = pad_token_id
        names = sorted(self._special_ids, key=len, reverse=True)
        self._special_tokens = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        self._byte_symbols = [byte_symbols[byte] for byte in range(256)]
        self._piece_ids: dict[str, tuple[int, ...]] = {}

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids (int64) of shape `(1, sequence_length)` for a prompt, `(N, sequence_length)` for N prompts."""
        prompts = [text] if isinstance(text, str) else list(text)
        rows = [self._sequence(prompt) for prompt in prompts]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.sequence_length)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The content token ids of `text`: no start/end of text tokens, no padding, no truncation.

        With `max_tokens`, the first `max_tokens` ids only (at most), in time bounded by `max_tokens` whatever the
        length of `text` beyond its linear scan: a word too long for `max_tokens` tokens is cut before it is
        normalized and byte-pair encoded. The ids are those of the whole text's first `max_tokens` whenever the text
        has at most `max_tokens` tokens; past that, a cut word may end in other tokens. Without it, the time grows
        with the text (byte-pair encoding is O(n log n) in the length of a word).
        """
        ids: list[int] = []
        for index, segment in enumerate(self._special_tokens.split(text)):
            if max_tokens is not None and len(ids) >= max_tokens:
                break
            if index % 2:
                ids.append(self._special_ids[segment])
                continue
            if max_tokens is None:
                for piece in _pieces(segment):
                    ids.extend(self._encode_piece(piece))
                continue
            for chunk in _chunks(segment):
                # a chunk of more characters than this makes more than the remaining tokens (each token covers at
                # most `_longest_token` bytes, NFC joins at most `_MAX_COMPOSED` characters): cut it
                bound = _MAX_COMPOSED * self._longest_token * (max_tokens - len(ids) + 1)
                for piece in _pieces(chunk[:bound]):
                    ids.extend(self._encode_piece(piece[: self._longest_token * (max_tokens - len(ids) + 1)]))
                    if len(ids) >= max_tokens:
                        break
                if len(ids) >= max_tokens:
                    break
        return ids if max_tokens is None else ids[:max_tokens]

    def count_tokens(self, text: str, limit: int) -> int:
        """The number of content tokens of `text`, counting at most `limit` (bounded time, as `encode`)."""
        return len(self.encode(text, max_tokens=limit))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (`"cat"`, `"cat</w>"`, `"<|endoftext|>"`), None if `token` is not one.

        Entries are byte-pair symbols, `</w>` marking the end of a word: a whole prompt word is usually not one.
        """
        if token == _START_OF_TEXT:
            return self.start_of_text_token_id
        if token == _END_OF_TEXT:
            return self.end_of_text_token_id
        return self._token_ids.get(token)

    def extra_repr(self) -> str:
        padding = "" if self.pad_token_id == self.end_of_text_token_id else f", pad_token_id={self.pad_token_id}"
        return f"sequence_length={self.sequence_length}{padding}"

    def _sequence(self, text: str) -> list[int]:
        content = self.encode(text, max_tokens=self.sequence_length - 2)
        ids = [self.start_of_text_token_id, *content, self.end_of_text_token_id]
        return ids + [self.pad_token_id] * (self.sequence_length - len(ids))

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = self._piece_ids.get(piece)
        if ids is None:
            if len(self._piece_ids) >= _CACHE_SIZE:
                self._piece_ids = {}
            ids = self._piece_ids[piece] = tuple(self._token_ids[token] for token in self._byte_pair_encode(piece))
        return ids

    def _byte_pair_encode(self, piece: str) -> list[str]:
        """Merge the byte symbols of `piece` (the last one marked `</w>`), lowest ranked pair first, leftmost first
        among equals, as `tokenizers`' BPE does: a heap of candidate pairs over a linked list, O(n log n)."""
        symbols: list[str] = [self._byte_symbols[byte] for byte in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        ranks = self._merge_ranks
        following = list(range(1, len(symbols) + 1))  # index of the next live symbol (len: none)
        preceding = list(range(-1, len(symbols) - 1))
        heap: list[tuple[int, int, str, str]] = []

        def push(left: int) -> None:
            right = following[left]
            if right < len(symbols):
                rank = ranks.get(f"{symbols[left]} {symbols[right]}")
                if rank is not None:
                    heapq.heappush(heap, (rank, left, symbols[left], symbols[right]))

        for index in range(len(symbols) - 1):
            push(index)
        while heap:
            _, left, first, second = heapq.heappop(heap)
            right = following[left]
            # a pair is stale once either symbol has changed: symbols only grow, a merged-away one is emptied
            if right >= len(symbols) or symbols[left] != first or symbols[right] != second:
                continue
            symbols[left] = first + second
            symbols[right] = ""
            following[left] = following[right]
            if following[left] < len(symbols):
                preceding[following[left]] = left
            if preceding[left] >= 0:
                push(preceding[left])
            push(left)
        return [symbol for symbol in symbols if symbol]


@functools.cache
def _vocabulary_tables(
    path: Path, mtime_ns: int, size: int
) -> tuple[dict[str, int], tuple[str, ...], dict[str, int], int]:
    """The merge ranks (keyed by "first second"), the vocabulary, the token ids and the longest token's length in
    bytes of a merges file, read once per file (and version of it: `mtime_ns` and `size` are part of the key) for
    every tokenizer that uses it."""
    merges = _read_merges(path)
    symbols = list(_byte_symbols().values())
    vocabulary = (*symbols, *(symbol + "</w>" for symbol in symbols), *(merge.replace(" ", "") for merge in merges))
    merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
    token_ids = {token: index for index, token in enumerate(vocabulary)}
    return merge_ranks, vocabulary, token_ids, max(len(token.removesuffix("</w>")) for token in vocabulary)


def _read_merges(path: Path) -> list[str]:
    """The first `_MERGE_COUNT` merges (`"first second"` lines) of a gzipped CLIP merges file, after its header line.

    Only the start of the file is decompressed: CLIP ignores the rest.
    """
    chunks: list[str] = []
    line_count = 0
    with gzip.open(path, "rt", encoding="utf-8") as file:
        while line_count <= _MERGE_COUNT and (chunk := file.read(1 << 16)):
            chunks.append(chunk)
            line_count += chunk.count("\n")
    merges = "".join(chunks).rstrip().split("\n", _MERGE_COUNT + 1)[1 : _MERGE_COUNT + 1]
    for line_number, merge in enumerate(merges, start=2):
        if merge.count(" ") != 1 or merge.startswith(" ") or merge.endswith(" "):
            raise ValueError(f"CLIP merges file {path}, line {line_number}: expected two symbols, got {merge!r}")
    return merges
