"""A word-level tokenizer for the toy world.

One token per whitespace-separated word; ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<unk>``,
then the world's vocabulary in its fixed order. The tokenizer adds no special tokens itself
(no post-processor), so TransformerLens prepends ``<bos>`` exactly once (``to_tokens``
with its default ``prepend_bos=True``), as circuit-tracer does for tokenizers that do not
add one. ``<bos>`` doubles as end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, UNK)


def build_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over ``vocabulary`` (special tokens first, order kept)."""
    words = [w for w in vocabulary if w not in SPECIAL_TOKENS]
    if len(words) != len(set(words)):
        raise ValueError("vocabulary has duplicate words")
    if any(not w or any(ch.isspace() for ch in w) for w in words):
        raise ValueError("every vocabulary entry must be one non-empty word without whitespace")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=BOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(directory))
