"""Concept-level prompts: a template with a domain slot [S] and a class slot [V].

A prompt is token ids with ``n_s`` positions for S and ``n_v`` for V. The slots hold the
natural words' token ids (domain name, class name), so without learned concepts the prompt
is the plain "a {domain} style of a {class}". Learned vectors replace the slots either at the
text encoder's input or at its output: see :mod:`fedbip_flower.method.concepts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEFAULT_TEMPLATE = "a [S] style of a [V]"
PRESETS = {
    "natural": DEFAULT_TEMPLATE,
    "medical": "a [S] dermatoscopic image of a [V], a type of pigmented skin lesion",
    "satellite": "a [S] centered satellite photo of a [V]",
}


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of one prompt per class (C, L) and the slot positions."""

    ids: torch.Tensor
    s_pos: torch.Tensor
    v_pos: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.ids.shape[0])


def _word_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids or tokenizer(".", add_special_tokens=False).input_ids


def _cycle(ids: list[int], n: int) -> list[int]:
    return [ids[i % len(ids)] for i in range(n)]


def build_layout(
    tokenizer, template: str, n_s: int, n_v: int, domain_word: str, class_words: list[str]
) -> PromptLayout:
    """Tokenize ``template`` once per class with the natural words in the slots."""
    parts = re.split(r"(\[S\]|\[V\])", template)
    if parts.count("[S]") != 1 or parts.count("[V]") != 1:
        raise ValueError(f"template needs exactly one [S] and one [V]: {template!r}")
    max_len = int(tokenizer.model_max_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, s_pos, v_pos = [], [], []
    for word in class_words:
        ids = [bos]
        for part in parts:
            if part == "[S]":
                s_pos = list(range(len(ids), len(ids) + n_s))
                ids += _cycle(_word_ids(tokenizer, domain_word), n_s)
            elif part == "[V]":
                v_pos = list(range(len(ids), len(ids) + n_v))
                ids += _cycle(_word_ids(tokenizer, word), n_v)
            elif part.strip():
                ids += tokenizer(part.strip(), add_special_tokens=False).input_ids
        ids.append(eos)
        if len(ids) > max_len:
            raise ValueError(f"prompt for class {word!r} is {len(ids)} tokens; the model takes {max_len}")
        rows.append(ids + [pad] * (max_len - len(ids)))
    return PromptLayout(torch.tensor(rows), torch.tensor(s_pos), torch.tensor(v_pos))


@torch.no_grad()
def empty_prompt_embeds(components) -> torch.Tensor:
    """The unconditional (empty prompt) embedding (1, L, D) for classifier-free guidance."""
    tok = components.tokenizer
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    return components.text_encoder(ids.input_ids.to(components.device))[0]
