"""A byte-level BPE tokenizer trained in-process for the `tiny` preset (no hub access needed).

It is built like Qwen2.5's tokenizer where that decides the prompt ids: the same pre-tokenizer split pattern,
byte-level symbols, no BOS, `<|endoftext|>` as eos and pad, and `<|im_start|>` / `<|im_end|>` as special tokens, so
the chat-template prompt splits into the same pieces. It is saved and reloaded exactly like a real tokenizer
(`save_pretrained` / `AutoTokenizer.from_pretrained`), so the tiny preset exercises the real loading code.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prismatic.models.prompting import CHAT_SPECIAL_TOKENS, ENDOFTEXT, build_prompt

TINY_SPECIAL_TOKENS = {"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
# Qwen2's pre-tokenizer split (a fact of its tokenizer.json): decides where "\n", spaces and words break.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Words of LIBERO-style instructions, so the tiny vocabulary covers the prompts the tests and demo use.
_SEED_INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the alphabet soup and place it in the basket",
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "put the wine bottle on top of the cabinet",
    "turn on the stove and put the moka pot on it",
    "put both the cream cheese box and the butter in the basket",
    "push the plate to the front of the stove",
    "move the red block to the left of the green cup",
    "stack the blue cube on the yellow cube",
)


def train_tiny_tokenizer(vocab_size: int = 512, extra_corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on LIBERO-style prompts and return it as a HF fast tokenizer."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + specials + merges), got {vocab_size}")
    corpus = [build_prompt(text) for text in (*_SEED_INSTRUCTIONS, *extra_corpus)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=None, add_bos_token=False,
                                   additional_special_tokens=list(CHAT_SPECIAL_TOKENS[1:]), **TINY_SPECIAL_TOKENS)
