"""The ONE prompt format of a request: how a prompt becomes the token ids an answer follows.

Training, automatic keys, the stopping checks, evaluation, attacks and the llama.cpp check all
build their inputs through the same `PromptFormat`, and the manifest records it, so every figure is
measured on the text a user of the served model actually sends. Three kinds:

- ``chat``: the tokenizer's chat template, a user turn and the generation prompt (chat models);
- ``completion``: the prompt verbatim, the answer right after it, no separator (base models:
  "The chemical symbol for iron is" -> " Fe"). The default where the tokenizer has no chat template;
- a user template holding ``{prompt}``, e.g. ``"Question: {prompt}\\nAnswer:"``.

``auto`` (the default) picks ``chat`` when the tokenizer has a chat template, else ``completion``.

>>> PromptFormat.parse("Question: {prompt}\\nAnswer:").render("Who wrote Hamlet?")
'Question: Who wrote Hamlet?\\nAnswer:'
>>> PromptFormat.parse("completion").render("The chemical symbol for iron is")
'The chemical symbol for iron is'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from undial_peft.errors import UndialConfigError

AUTO, CHAT, COMPLETION, TEMPLATE = "auto", "chat", "completion", "template"
SLOT = "{prompt}"
FormatSpec = Union[str, "PromptFormat", dict, None]  # what functions accept: a name, a template, a record


@dataclass(frozen=True)
class PromptFormat:
    """One way to turn prompts into token ids; build it with `resolve` (or `parse` for a known kind)."""

    kind: str  # CHAT, COMPLETION or TEMPLATE
    template: str | None = None  # TEMPLATE only: the text around SLOT

    @classmethod
    def parse(cls, spec: str) -> PromptFormat:
        """``chat``, ``completion`` or a template holding ``{prompt}`` (``auto`` needs a tokenizer: `resolve`)."""
        if spec in (CHAT, COMPLETION):
            return cls(spec)
        if SLOT in spec:
            if spec.count(SLOT) != 1:
                raise UndialConfigError(f"prompt template {spec!r} holds {SLOT} {spec.count(SLOT)} times; use it once.")
            return cls(TEMPLATE, spec)
        raise UndialConfigError(
            f"prompt format {spec!r} is unknown: use auto, chat, completion, or a template holding {SLOT} "
            '(e.g. "Question: {prompt}\\nAnswer:").'
        )

    @classmethod
    def resolve(cls, spec: str | PromptFormat | dict | None, tokenizer: Any) -> PromptFormat:
        """The format for ``tokenizer``: ``auto``/None picks chat where it has a chat template.

        A dict is a manifest's record (`to_dict`).
        """
        if isinstance(spec, PromptFormat):
            fmt = spec
        elif isinstance(spec, dict):
            fmt = cls(spec["kind"], spec.get("template"))
        elif spec in (None, AUTO):
            fmt = cls(CHAT if has_chat_template(tokenizer) else COMPLETION)
        else:
            fmt = cls.parse(spec)
        if fmt.kind == CHAT and not has_chat_template(tokenizer):
            raise UndialConfigError(
                "prompt format 'chat' needs a tokenizer with a chat template; this one has none "
                "(a base model): use completion or a template holding {prompt}."
            )
        return fmt

    def render(self, prompt: str) -> str:
        """The prompt as text (completion and template formats; chat renders through the tokenizer)."""
        if self.kind == TEMPLATE:
            return self.template.replace(SLOT, prompt)
        return prompt

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """Token ids of ``prompt``, ready for the answer's ids to follow."""
        return self.conversation_ids(tokenizer, [{"role": "user", "content": prompt}])

    def conversation_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ending in a user turn (e.g. a system turn, then the question).

        Without a chat template the turns' texts are joined by newlines and the last is formatted.
        """
        if self.kind == CHAT:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
        *context, last = [m["content"] for m in messages]
        text = "\n".join([*context, self.render(last)])
        return tokenizer(text, add_special_tokens=True).input_ids

    def to_dict(self) -> dict[str, str | None]:
        """What a manifest records, so eval and verification reproduce the format without flags."""
        return {"kind": self.kind, "template": self.template}

    def __str__(self) -> str:
        return f"template {self.template!r}" if self.kind == TEMPLATE else self.kind


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (chat/instruct models do, base models do not)."""
    return bool(getattr(tokenizer, "chat_template", None))
