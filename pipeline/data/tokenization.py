"""Tokenize preference pairs with the prompt masked out, and collate them with dynamic padding.

Prompt and responses are tokenized separately and concatenated, so a token
never straddles the prompt/response boundary and the response tokens are
exactly the ones the model is scored on. Conversational rows go through the
tokenizer's chat template: the prompt with the generation prompt appended, the
response as the template's rendering of the whole conversation minus the prompt.

Truncation: a prompt over ``max_prompt_length`` loses tokens from the side
``prompt_truncation`` names (left by default, keeping the end next to the
response); responses are cut from the right to fit ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data.normalize import PreferenceExample
from pipeline.errors import DataError, RowProblem
from pipeline.tokenstats import IGNORE_INDEX


@dataclass(frozen=True)
class TokenizedPair:
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool

    @property
    def chosen_length(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)


class PairTokenizer:
    """Turns :class:`PreferenceExample` into :class:`TokenizedPair` (or a :class:`RowProblem`)."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        max_prompt_length: int | None = None,
        prompt_truncation: str = "left",
    ):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; responses cannot be terminated")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompt_truncation = prompt_truncation

    def render(self, example: PreferenceExample) -> tuple[str, str, str]:
        """The prompt and the two responses as the exact text the model sees."""
        if not example.conversational:
            return example.prompt, example.chosen, example.rejected  # type: ignore[return-value]
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError("conversational data needs a tokenizer with a chat template; this tokenizer has none")
        template = self.tokenizer.apply_chat_template
        prompt = template(example.prompt, tokenize=False, add_generation_prompt=True)
        responses = []
        for response in (example.chosen, example.rejected):
            full = template(example.prompt + response, tokenize=False)
            if not full.startswith(prompt):
                # Templates that rewrite earlier turns cannot be split into prompt + response.
                raise DataError("the chat template does not render the prompt as a prefix of the conversation")
            responses.append(full[len(prompt) :])
        return prompt, responses[0], responses[1]

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def __call__(self, example: PreferenceExample) -> TokenizedPair | RowProblem:
        prompt, chosen, rejected = self.render(example)
        # A chat template already carries its special tokens; plain text gets the tokenizer's (e.g. BOS).
        prompt_ids = self._ids(prompt, special=not example.conversational)
        eos = self.tokenizer.eos_token_id
        chosen_ids, rejected_ids = (self._with_eos(self._ids(r, special=False), eos) for r in (chosen, rejected))

        truncated = False
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            keep = self.max_prompt_length
            prompt_ids = prompt_ids[-keep:] if self.prompt_truncation == "left" else prompt_ids[:keep]
            truncated = True
        room = self.max_length - len(prompt_ids)
        if room < 1:
            return RowProblem(
                example.row,
                "prompt",
                f"prompt is {len(prompt_ids)} tokens and leaves no room for the response "
                f"(max_length {self.max_length}; set data.max_prompt_length to truncate prompts)",
            )
        if len(chosen_ids) > room or len(rejected_ids) > room:
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            truncated = True
        if chosen_ids == rejected_ids:
            return RowProblem(example.row, "rejected", "identical to chosen after tokenization and truncation")
        return TokenizedPair(example.row, prompt_ids, chosen_ids, rejected_ids, truncated)

    @staticmethod
    def _with_eos(ids: list[int], eos: int) -> list[int]:
        return ids if ids and ids[-1] == eos else ids + [eos]


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack B pairs as 2B sequences, chosen first then rejected, right-padded to the longest.

    Returns input_ids (2B, T), attention_mask (2B, T) and labels (2B, T) with
    IGNORE_INDEX on prompt and padding positions. One forward pass of the
    concatenation scores both responses.
    """
    prompts = [p.prompt_ids for p in pairs] * 2
    return collate_sequences(prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_token_id)


def collate_sequences(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Row i is ``prompts[i] + responses[i]``, right-padded; labels are IGNORE_INDEX except on the response."""
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, prompt) in enumerate(zip(sequences, prompts, strict=True)):
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq)] = ids
        attention_mask[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = ids[len(prompt) :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
