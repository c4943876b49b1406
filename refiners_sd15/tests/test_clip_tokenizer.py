"""CLIPTokenizer against its reference: transformers 5's `CLIPTokenizer` (the Rust `tokenizers` pipeline).

The reference is built offline from vocab.json and merges.txt derived from the vocabulary file shipped with the
package, the way CLIP builds its vocabulary, and must give identical ids (no tolerance). Tests that need it skip when
transformers is missing or older than 5 (whose default `CLIPTokenizer` is the slow one, which cleans text otherwise);
the known-id tests below run everywhere.
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch

from refiners_sd15.clip import CLIPTokenizer
from refiners_sd15.clip.tokenizer import _LOWERCASE, _NFC_UNKNOWN, _STAND_IN_OVERRIDES, DEFAULT_VOCABULARY_PATH

PAD = [49407]

PROMPTS = [
    "",
    " ",
    "    ",
    "\t\n",
    "a photo of a cat",
    "A Photo Of A CAT",
    "portrait of a woman, highly detailed, sharp focus, 8k, trending on artstation",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "  leading and trailing spaces  ",
    "multiple     spaces   between words",
    "tabs\tand\nnewlines\r\nand\r\rcarriage returns",
    "café crème brûlée, résumé, naïve",
    "über straße, Äpfel und Öl",
    "niño, piñata, mañana, ESPAÑA",
    "Ærøskøbing, Œuvre, ÉCOLE",
    "combining e\u0301 versus precomposed é",
    "東京タワーの夜景",
    "一只猫坐在窗台上",
    "日本語とEnglishのmix",
    "고양이 사진",
    "Привет, мир! СОБАКА",
    "Ελληνικά ΟΔΟΣ ΣΟΦΟΣ",
    "final sigma: ΣΟΦΟΣ. Σ ΑΣ' σοφος",
    "עברית ועוד",
    "العربية جميلة",
    "हिन्दी भाषा",
    "ภาษาไทย",
    "cat 🐱 emoji 🎨✨",
    "family 👨\u200d👩\u200d👧 and 🧑🏽\u200d🚀 astronaut",
    "flag 🇫🇷 heart ❤️ thumbs 👍🏻 rainbow 🏳️\u200d🌈",
    "emoji only 😀😃😄😁",
    "(masterpiece:1.2), best quality, [blurry], (worst quality:0.8)",
    "((very detailed)), {{soft light}}, [[bad hands]]",
    "a cat AND a dog BREAK in the rain",
    "embedding:my_style, <lora:add_detail:0.7>",
    "it's a dog's life",
    "IT'S A DOG'S LIFE",
    "we're they've I'm you'll he'd don't can't",
    "WE'RE THEY'VE I'M YOU'LL HE'D DON'T CAN'T",
    "We'Re ThEy'Ve I'M",
    "O'Brien's rock'n'roll 'tis",
    "!'s ?'ll ''re",
    "1234567890",
    "3.14159 and 2,000,000 and 1e-5",
    "version 1.5-beta, 4K UHD, 16:9, 1920x1080",
    "!!!???...",
    "--- *** ### @@@ $$$ %%%",
    "hello, world! how are you?",
    "a&amp;b &lt;tag&gt; &quot;quoted&quot; &#39;",
    "tom &amp; jerry",
    "‘curly’ “quotes” – en dash — em dash … ellipsis",
    "ﬁne ﬂow ĳ ŉ ǰ ǅ",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "zero\u200bwidth space, soft\u00adhyphen, bom\ufeffstart, joiner\u2060word",
    "nul\x00char bell\x07 escape\x1b[0m delete\x7f",
    "form\x0cfeed vertical\x0btab file\x1cseparator unit\x1fseparator next\x85line",
    "nbsp\u00a0here ideographic\u3000space en\u2002space",
    "line\u2028separator paragraph\u2029separator",
    "replacement\ufffdcharacter",
    "mojibake: Ã©tÃ©",
    "²³ ½ ⅓ Ⅻ ⅻ ① ⑴",
    "٣ ४ ๓ ໓ 三",
    "<|startoftext|>",
    "a <|endoftext|> b<|startoftext|>c",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "<|EndOfText|>> !<|STARTOFTEXT|>!",
    "x<<|endoftext|>> !<|endoftext|>",
    "<|ſtartoftext|> <|endoftext|",
    "ſ 'ſ long s",
    "İstanbul, KELVIN \u212a, Ångström \u212b",
    "\u0345 ypogegrammeni α\u0345ι",
    "Todhri \U000105d2\u0307, N'Ko a\u0301\u07fd\u0334, Garay \U00010d50\U00010d70",
    "photo_of_cat snake_case camelCase PascalCase",
    "@user #hashtag $5 %20 ^caret ~tilde `backtick` |pipe| \\backslash/",
    "http://example.com/path?q=1&r=2#frag",
    "a" * 300,
    "word " * 100,
    "1 2 3 " * 40,
    "a very long prompt, " * 30,
    "🐱" * 80,
    "猫" * 100,
]


def _write_byte_pair_files(directory: Path) -> None:
    """vocab.json and merges.txt derived from the shipped merges file, as CLIP builds its vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(DEFAULT_VOCABULARY_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocabulary = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge.split()) for merge in merges)]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary_json = json.dumps({token: index for index, token in enumerate(vocabulary)})
    (directory / "vocab.json").write_text(vocabulary_json, encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """transformers 5's CLIPTokenizer, loaded like SD1.5's `tokenizer/` folder."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the reference is transformers 5's CLIPTokenizer: the test extras pin transformers>=5")
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    _write_byte_pair_files(directory)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory), pad_token="<|endoftext|>")
    assert tokenizer.backend_tokenizer is not None, "the reference must be the tokenizers-backed CLIPTokenizer"
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def _reference_ids(reference: Any, texts: str | list[str]) -> torch.Tensor:
    ids = reference(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return torch.tensor([ids] if isinstance(texts, str) else ids, dtype=torch.int64)


@pytest.mark.parametrize("prompt", PROMPTS, ids=[ascii(prompt)[:40] for prompt in PROMPTS])
def test_prompt_ids_match_transformers_tokenizer(tokenizer: CLIPTokenizer, reference: Any, prompt: str) -> None:
    assert tokenizer(prompt).tolist() == _reference_ids(reference, prompt).tolist()


def test_batch_ids_match_transformers_tokenizer(tokenizer: CLIPTokenizer, reference: Any) -> None:
    ids = tokenizer(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, _reference_ids(reference, PROMPTS))


def test_sdxl_tokenizer_2_padding_with_bang_matches_transformers_tokenizer(
    reference: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SDXL's `tokenizer_2` is CLIP's with `pad_token` `!` (id 0, its published special_tokens_map.json): padded with
    0, and a `!` written in a prompt is the special token 0 too, not the `!</w>` (256) of SD1.5's tokenizer."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("clip_tokenizer_2")
    _write_byte_pair_files(directory)
    reference_2 = transformers.CLIPTokenizer.from_pretrained(str(directory), pad_token="!")
    assert reference_2.pad_token_id == 0
    tokenizer_2 = CLIPTokenizer(pad_token_id=0)
    prompts = ["a photo of a cat", "", "a very long prompt, " * 30, "猫 🐱", "(masterpiece:1.2), [blurry]"]
    bangs = ["it's 1984!!", "a ! b !!", "wow!wow", "!" * 80, "<|endoftext|>!<|startoftext|>", "¡hola! ！"]
    ids = tokenizer_2(prompts + bangs)
    assert torch.equal(ids, _reference_ids(reference_2, prompts + bangs))
    assert ids[1].tolist() == [49406, 49407] + [0] * 75
    assert tokenizer_2.encode("a ! b !!") == [320, 0, 321, 0, 0]
    assert torch.equal(ids[: len(prompts)], _reference_ids(reference, prompts).masked_fill(ids[: len(prompts)] == 0, 0))
    assert torch.equal(_reference_ids(reference, prompts).eq(49407).sum(dim=-1) - 1, ids[: len(prompts)].eq(0).sum(-1))
    assert "pad_token_id=0" in repr(tokenizer_2) and "pad_token_id" not in repr(CLIPTokenizer())

    hypothesis = pytest.importorskip("hypothesis")
    fragments = [*"!!!¡！ ab'<|>", "'s", "!'s", "<|endoftext|>", "<|startoftext|>", "word", "1girl", "猫", "🐱"]

    @hypothesis.settings(max_examples=100, deadline=None, database=None)
    @hypothesis.given(hypothesis.strategies.lists(hypothesis.strategies.sampled_from(fragments), max_size=40))
    def check(parts: list[str]) -> None:
        text = "".join(parts)
        assert tokenizer_2(text).tolist() == _reference_ids(reference_2, text).tolist()

    check()


@pytest.mark.parametrize("prompt", ["a very long prompt, " * 30, "word " * 100, "🐱" * 80])
def test_encode_matches_untruncated_reference(tokenizer: CLIPTokenizer, reference: Any, prompt: str) -> None:
    ids = tokenizer.encode(prompt)
    assert len(ids) > 75
    assert ids == reference.encode(prompt, add_special_tokens=False)


def test_random_text_matches_transformers_tokenizer(tokenizer: CLIPTokenizer, reference: Any) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    fragments = [
        *"abcdesz ABSTZ0123456789'!?.,;:()[]{}<>|&#_-~\t\n\r\x0b\x0c",
        *"éüñßİıΣσςſ\u212a\u212b\u0301\u0308\u0334\u0345\u07fd\u1ac1\u00ad\u200b\u200c\u200d\u2060\ufe0f\ufeff\ufffd",
        *"\x00\x07\x1c\x1f\x7f\x85\u2028\u00a0\u3000\U000105d2\U00010d50\u1c89\U0001f3fd",
        *"猫東京タワー고양이Привет١٢३²½Ⅻ🐱👨👩🏽🚀🇫🇷",
        *["👨\u200d👩\u200d👧", "🧑🏽\u200d🚀", "🏳️\u200d🌈", "❤️", "ΟΔΟΣ", "ΣΟΦΟΣ ", "e\u0301", "a\u0301\u07fd\u0334"],
        *["'s", "'S", "'ſ", "'t", "'re", "'VE", "'m", "'ll", "'d", "<|startoftext|>", "<|endoftext|>"],
        *["<|ENDOFTEXT|>", "<|EndOfText|>", "<|StartOfText|>", "<|ſtartoftext|>", "<|", "|>", "&amp;"],
        *["(word:1.2)", "[word]", "photo", "the", "1girl", "8k"],
    ]

    @hypothesis.settings(max_examples=400, deadline=None, database=None)
    @hypothesis.given(
        strategies.one_of(
            strategies.text(),  # any code point but surrogates
            strategies.text(strategies.characters(max_codepoint=0x3000)),
            strategies.lists(strategies.sampled_from(fragments), max_size=60).map("".join),
        )
    )
    def check(text: str) -> None:
        assert tokenizer(text).tolist() == _reference_ids(reference, text).tolist()

    check()


def test_random_long_words_match_transformers_tokenizer(tokenizer: CLIPTokenizer, reference: Any) -> None:
    """The heap byte-pair encoding merges as `tokenizers` does (lowest rank, leftmost first) on long words, and
    `encode`'s bounded mode gives the reference's first ids, around the 75-token window and past it."""
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    syllables = ["a", "b", "ab", "ba", "aa", "the", "ing", "er", "ss", "é", "\u0301", "!", "1", "猫", "'s", "-"]
    word = strategies.lists(strategies.sampled_from(syllables), min_size=1, max_size=400).map("".join)

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(strategies.lists(word, min_size=1, max_size=4).map(" ".join), strategies.integers(1, 120))
    def check(text: str, max_tokens: int) -> None:
        expected = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text) == expected
        assert tokenizer.encode(text, max_tokens=max_tokens) == expected[:max_tokens]
        assert tokenizer(text).tolist() == _reference_ids(reference, text).tolist()

    check()


HUGE_PROMPTS = {
    "one 1 MB word": "ab" * 500_000,
    "1 MB of combining marks": "a" + "\u0301\u0316" * 500_000,  # quadratic in CPython's NFC as a whole
    "1 MB of punctuation": "!?" * 500_000,
    "a million words": "cat " * 1_000_000,
    "a long word after 70 short ones": "cat " * 70 + "xy" * 500_000,
}


@pytest.mark.parametrize("prompt", HUGE_PROMPTS.values(), ids=HUGE_PROMPTS.keys())
def test_huge_prompts_tokenize_in_bounded_time(tokenizer: CLIPTokenizer, prompt: str) -> None:
    """Only what the 77-token window can hold is normalized and byte-pair encoded: each of these took minutes when the
    whole text was encoded (byte-pair encoding was quadratic in the length of a word). A generous 10 s alarm, for a
    loaded machine: it takes well under a second."""
    signal = pytest.importorskip("signal")
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")

    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("tokenizing took more than 10 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        ids = tokenizer(prompt)
        count = tokenizer.count_tokens(prompt, limit=1000)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 != ids[0, -2]
    assert count == 1000


def test_huge_word_keeps_the_reference_first_tokens(tokenizer: CLIPTokenizer, reference: Any) -> None:
    for prompt in ["ab" * 20_000, "a" * 30_000, "cat " * 70 + "xy" * 20_000]:
        assert tokenizer(prompt).tolist() == _reference_ids(reference, prompt).tolist()


def _has_unicode_subtleties(code_point: int) -> bool:
    """Whether the module's Unicode tables name `code_point`, or this Python's `unicodedata` gives it a combining
    class, a decomposition, a case mapping or a category other than letter, number, unassigned and private use."""
    char = chr(code_point)
    category = unicodedata.category(char)
    return (
        code_point in _STAND_IN_OVERRIDES
        or code_point in _LOWERCASE
        or _NFC_UNKNOWN.match(char) is not None
        or unicodedata.combining(char) != 0
        or unicodedata.decomposition(char) != ""
        or char.lower() != char
        or (category[0] not in "LN" and category not in ("Cn", "Co"))
    )


def test_code_points_with_unicode_subtleties_match_transformers_tokenizer(reference: Any) -> None:
    """Each such code point, and every 101st other one, alone, between letters, between punctuation and with
    combining marks (the tokenizer matched every code point so when it was written: this is the cheap part)."""
    code_points = [
        code_point
        for code_point in range(0x110000)
        if not 0xD800 <= code_point <= 0xDFFF and (code_point % 101 == 0 or _has_unicode_subtleties(code_point))
    ]
    chunks = [code_points[start : start + 64] for start in range(0, len(code_points), 64)]

    def contexts(code_point: int) -> str:
        return "{0} a{0}a !{0}! a\u0301{0}\u0334 {0}\u0301".format(chr(code_point))

    texts = ["\n".join(map(contexts, chunk)) for chunk in chunks]
    tokenizer = CLIPTokenizer()  # not the shared one: this fills its cache with 200,000 one-off pieces
    expected = reference(texts, add_special_tokens=False)["input_ids"]
    failing = [chunk for chunk, text, ids in zip(chunks, texts, expected) if tokenizer.encode(text) != ids]
    differing = [
        f"U+{code_point:04X}"
        for code_point in [code_point for chunk in failing for code_point in chunk]
        if tokenizer.encode(contexts(code_point)) != reference.encode(contexts(code_point), add_special_tokens=False)
    ]
    assert not failing, f"code points tokenized otherwise than by transformers: {differing[:50]}"


def test_tokenizes_prompt_to_known_ids(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("a photo of a cat")
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407] + PAD * 70]


@pytest.mark.parametrize(
    "prompt, content",
    [
        ("it's 1984!!", [585, 568, 272, 280, 279, 275, 748]),  # `'s` kept whole, one token per digit
        ("café", [15304]),  # accents kept
        ("Tom &amp; Jerry", [2435, 261, 6259, 282, 9164]),  # HTML entities not unescaped (ftfy would)
        (
            "一只猫",
            [19759, 222, 34517, 103, 163, 234, 360],
        ),  # CJK ideographs are one word (the slow tokenizer split them)
        ("family 👨\u200d👩\u200d👧", [1315, 25023, 26304, 964, 356]),  # zero width joiners kept in the emoji word
        ("zero\u200bwidth", [5848, 9844, 23571]),  # format characters kept, as a piece of their own
        ("ΟΔΟΣ", [138, 123, 138, 112, 138, 123, 139, 481]),  # final capital sigma lowercased to σ, not ς
        ("<|ENDOFTEXT|>", [27, 347, 40786, 4160, 91, 285]),  # special only when written exactly: `<|`, name, `|>`
        ("<|EndOfText|>>", [27, 347, 40786, 4160, 91, 285, 285]),  # the name ends at its `|>`
        ("a\x1cb", [320, 472, 321]),  # U+001C is no space to Oniguruma (`str.isspace` says it is)
        ("İ", [328, 16384]),  # lowercased to `i` and U+0307
        ("\U00010d50", [172, 238, 113, 364]),  # lowercased to U+10D70 (Unicode 16, unknown to Python 3.11)
        ("\U000105d2\u0307", [172, 238, 245, 496, 16384]),  # not composed: U+105C9 is newer than NFC's Unicode 9.0
    ],
)
def test_splits_text_like_transformers_5(tokenizer: CLIPTokenizer, prompt: str, content: list[int]) -> None:
    assert tokenizer.encode(prompt) == content


def test_batch_of_prompts_gives_one_row_each(tokenizer: CLIPTokenizer) -> None:
    prompts = ["a photo of a cat", "", "a dog"]
    ids = tokenizer(prompts)
    assert ids.shape == (3, 77)
    assert [row.tolist() for row in ids] == [tokenizer(prompt)[0].tolist() for prompt in prompts]
    assert tokenizer([]).shape == (0, 77)


def test_empty_prompt_is_start_end_and_padding(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer("").tolist() == [[49406, 49407] + PAD * 75]


def test_long_prompt_is_truncated_to_75_content_tokens(tokenizer: CLIPTokenizer) -> None:
    prompt = "a very long prompt, " * 30
    ids = tokenizer(prompt)[0].tolist()
    assert len(tokenizer.encode(prompt)) > 75
    assert ids == [49406, *tokenizer.encode(prompt)[:75], 49407]


def test_custom_sequence_length_and_special_ids() -> None:
    tokenizer = CLIPTokenizer(sequence_length=8, start_of_text_token_id=1, end_of_text_token_id=2, pad_token_id=0)
    assert tokenizer("a photo of a cat").tolist() == [[1, 320, 1125, 539, 320, 2368, 2, 0]]
    assert tokenizer("a photo of a cat again and again").tolist() == [[1, 320, 1125, 539, 320, 2368, 1495, 2]]
    assert tokenizer.encode("a <|endoftext|><|startoftext|>") == [320, 2, 1]


def test_sequence_length_without_room_for_special_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="sequence_length >= 2"):
        CLIPTokenizer(sequence_length=1)


def test_malformed_vocabulary_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "merges.txt.gz"
    path.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h e\n"))
    with pytest.raises(ValueError, match="line 3: expected two symbols"):
        CLIPTokenizer(vocabulary_path=path)
