"""Chat templates for base models that have none (GPT-2, GPT-NeoX, OPT, Falcon): named ones, a user's file, or the
raw prompt text, and the label a safety module records of which was used."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

from salora_merge.errors import InputError

__all__ = ["NAMED", "RAW", "apply_chat_template_choice", "UserTurnFrame", "user_turn_frame", "chat_prompt_ids",
           "conversation_ids"]

RAW = "none"

# Jinja templates in the form transformers' ``apply_chat_template`` renders (messages, add_generation_prompt).
NAMED = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "plain": ("{% for m in messages %}{{ 'User' if m['role'] == 'user' else 'Assistant' }}: {{ m['content'] }}\n"
              "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"),
}


def apply_chat_template_choice(tokenizer, choice: str | None) -> tuple[object, str]:
    """The tokenizer to prompt with and a label of the template used.

    ``choice`` None keeps the model's own template (label ``model``) or, when it has none, the raw prompt text
    (label ``none (the model has no chat template: raw prompt text)``); ``none`` forces the raw text; a name of
    :data:`NAMED` or a file of Jinja text sets that template on a copy of the tokenizer (the label names it with
    its SHA-256)."""
    own = getattr(tokenizer, "chat_template", None)
    if choice is None:
        return tokenizer, "model" if own else "none (the model has no chat template: raw prompt text)"
    if choice == RAW:
        chosen = copy.copy(tokenizer)
        chosen.chat_template = None
        return chosen, "none (raw prompt text, as asked)"
    if choice in NAMED:
        text, label = NAMED[choice], choice
    else:
        path = Path(choice)
        if not path.is_file():
            raise InputError(f"--chat-template {choice}: no such file, and not one of {', '.join([*NAMED, RAW])}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--chat-template {choice}: not a UTF-8 text file of Jinja") from None
        if "messages" not in text:
            raise InputError(f"--chat-template {choice}: a chat template renders 'messages'; this file never "
                             "mentions them")
        label = path.name
    chosen = copy.copy(tokenizer)
    chosen.chat_template = text
    try:
        chosen.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template error, reported in one line
        raise InputError(f"--chat-template {choice}: does not render a user message ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return chosen, f"{label} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


_SENTINEL = "SALORAUSERTURNSENTINEL"


@dataclass(frozen=True)
class UserTurnFrame:
    """How a user turn opens and closes under a tokenizer's chat template: the token ids before the user's text
    (any default system turn included), the ids that end it when generated, and the text that follows it."""

    prefix_ids: tuple[int, ...]
    stop_ids: tuple[int, ...]
    end_text: str  # the first line of the template's text after the user's content (the text is cut there too)


def user_turn_frame(tokenizer) -> UserTurnFrame:
    """The frame of a single user turn, derived from the tokenizer's own chat template by rendering a sentinel
    message: nothing is hard-coded for a model family. A tokenizer without a chat template is an error (give one
    with ``--chat-template``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--task-prompts discover samples user turns through the model's chat template, and this "
                         "model's tokenizer has none: give the adapter's task prompts with --task-prompts FILE, or "
                         "the template it was trained with (--chat-template chatml, plain or a Jinja file)")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # a template error, reported in one line
        raise InputError(f"the chat template does not render a user message ({type(exc).__name__}); give "
                         "--task-prompts FILE") from None
    at = text.find(_SENTINEL)
    if at < 0:
        raise InputError("the chat template drops the user's text; give --task-prompts FILE")
    prefix, suffix = text[:at], text[at + len(_SENTINEL):]
    prefix_ids = tuple(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    first = tokenizer(suffix.lstrip(), add_special_tokens=False)["input_ids"][:1] if suffix.strip() else []
    stops |= {t for t in first if t in special}  # a plain-text closer ("[/INST]" as text) is cut as text instead
    closer = next((line.strip() for line in suffix.splitlines() if line.strip()), "")
    return UserTurnFrame(prefix_ids=prefix_ids, stop_ids=tuple(sorted(stops)), end_text=closer)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single-turn user prompt with the chat template and the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def conversation_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of a user prompt and an assistant response through the chat template (for judges)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"User: {prompt}\nAssistant: {response}")["input_ids"])
