"""The one prompt format of the policy, shared by training, caching and inference."""

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"


def build_prompt(instruction: str) -> str:
    """Return the policy prompt for a language instruction (lower-cased, trailing whitespace and '.' removed)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    text = instruction.strip().rstrip(".").strip().lower()
    return PROMPT_TEMPLATE.format(instruction=text)


def bos_token_id(tokenizer) -> int:
    """The token that opens every sequence. Qwen2.5 defines no BOS: `<|endoftext|>` plays that role there."""
    if getattr(tokenizer, "bos_token_id", None) is not None:
        return int(tokenizer.bos_token_id)
    fallback = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if fallback is None or fallback == getattr(tokenizer, "unk_token_id", None):
        raise ValueError("tokenizer has no bos_token and no '<|endoftext|>' token to use in its place")
    return int(fallback)


def tokenize_prompt(tokenizer, instruction: str) -> list[int]:
    """Token ids of `[BOS] + build_prompt(instruction)`: the prompt part of the multimodal sequence."""
    ids = tokenizer(build_prompt(instruction), add_special_tokens=False)["input_ids"]
    return [bos_token_id(tokenizer), *ids]
