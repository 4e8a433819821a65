"""Prompt templates for black-box teachers: a task input -> the text (or chat messages) sent to the endpoint.

A template is a Python format string over the fields of an input row: `{input}` (the task input), `{id}` and
`{split}`; literal braces are doubled (`{{`). Few-shot examples are rows of the same fields plus `target`
(their answer): for a completions endpoint they are rendered with the same template, followed by their
target, and put before the query, separated by `few_shot_separator`; for a chat endpoint they become
user/assistant turns after an optional system prompt. A template or example that names a field the rows do
not have is an error before any request is sent.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Iterable

from dskd.config import ConfigError

ROW_FIELDS = ("input", "id", "split")


class TemplateError(ConfigError):
    """A prompt template or few-shot example that cannot be rendered; the message names the recipe key."""


@dataclass(frozen=True)
class PromptBuilder:
    template: str
    kind: str  # "completions" or "chat"
    few_shot: tuple[dict, ...] = ()
    few_shot_separator: str = "\n\n"
    system_prompt: str | None = None

    @staticmethod
    def from_config(cfg) -> "PromptBuilder":
        """From an `EndpointConfig` (dskd.config), checked against the fields every input row has."""
        builder = PromptBuilder(cfg.prompt_template, cfg.kind, tuple(dict(e) for e in cfg.few_shot),
                                cfg.few_shot_separator, cfg.system_prompt)
        builder.check(ROW_FIELDS)
        return builder

    def fields(self) -> set[str]:
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise TemplateError(f"generate.endpoint.prompt_template is not a valid format string ({exc}); "
                                "write fields as {input} and literal braces as {{ and }}") from None
        names = {name for _, name, _, _ in parsed if name is not None}
        if "" in names or any(name.isdigit() for name in names):
            raise TemplateError("generate.endpoint.prompt_template: positional fields like {} or {0} are not "
                                f"allowed; name a field, one of {{{', '.join(ROW_FIELDS)}}}")
        return {name.split(".")[0].split("[")[0] for name in names}

    def check(self, available: Iterable[str]) -> None:
        available = set(available)
        missing = sorted(self.fields() - available)
        if missing:
            fields = ", ".join("{" + m + "}" for m in missing)
            raise TemplateError(f"generate.endpoint.prompt_template refers to {fields}, "
                                f"which the input rows do not have; available fields: {', '.join(sorted(available))}")
        for number, example in enumerate(self.few_shot):
            lacking = sorted((self.fields() | {"target"}) - set(example))
            if lacking:
                raise TemplateError(f"generate.endpoint.few_shot[{number}] lacks {', '.join(lacking)}: every example "
                                    "needs the template's fields and its answer as 'target'")

    def completion_prompt(self, row: dict) -> str:
        shots = [self.template.format(**example) + example["target"] for example in self.few_shot]
        return self.few_shot_separator.join([*shots, self.template.format(**row)])

    def chat_messages(self, row: dict) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for example in self.few_shot:
            messages += [{"role": "user", "content": self.template.format(**example)},
                         {"role": "assistant", "content": example["target"]}]
        return messages + [{"role": "user", "content": self.template.format(**row)}]

    def render(self, row: dict) -> str | list[dict[str, str]]:
        """The request's prompt (completions) or messages (chat) for one input row."""
        return self.chat_messages(row) if self.kind == "chat" else self.completion_prompt(row)
