"""The one prompt format of the policy, shared by training, caching and inference.

VLA-Adapter's Qwen2.5 models (`use_minivlm=True` upstream) were trained on Qwen's chat template with the default
system prompt, no BOS token (Qwen2.5 defines none), and the instruction lower-cased only. The sequence handed to
the LLM starts with the template's first token `<|im_start|>`; the image patches go right after it (see
`prismatic.models.sequence_layout`).
"""

from __future__ import annotations

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
PROMPT_TEMPLATE = (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
                   f"{IM_START}user\nWhat action should the robot take to {{instruction}}?{IM_END}\n"
                   f"{IM_START}assistant\n")


def build_prompt(instruction: str) -> str:
    """The policy prompt for a language instruction: lower-cased, nothing stripped (upstream does the same)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    return PROMPT_TEMPLATE.format(instruction=instruction.lower())


def check_chat_tokenizer(tokenizer) -> None:
    """Fail clearly when a tokenizer cannot encode the chat template (each special token must be one id)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in CHAT_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == unk:
            raise ValueError(f"tokenizer does not encode the chat-template token {token!r} as one id (got {ids}); "
                             f"use a Qwen2.5 tokenizer, or add {list(CHAT_SPECIAL_TOKENS)} as special tokens")


def tokenize_prompt(tokenizer, instruction: str) -> list[int]:
    """Token ids of `build_prompt(instruction)`, no special tokens added: id 0 is `<|im_start|>`."""
    return list(tokenizer(build_prompt(instruction), add_special_tokens=False)["input_ids"])

