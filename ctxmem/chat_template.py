"""The chat template: a conversation (a list of {"role", "content"} messages) <-> token ids.

With our special tokens:  <|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|> [<|assistant|>]
Without them (an imported HF tokenizer): plain text, one line per message,
    "System: …\\nUser: …\\nAssistant: …\\n" [+ "Assistant:"]
and generation should also stop at `ChatTemplate.stop_strings`.

`TextTemplate` is the other choice, for a model that was never chat-trained (a base or task model):
the conversation is one running text, each user message joined to what precedes it by a space and
each reply appended as the model wrote it, exactly as a client would grow a completions prompt.
`template_for(tokenizer, style)` picks one by name (TEMPLATE_STYLES).

Only the stdlib is imported here: a byte tokenizer needs no Hugging Face package.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .tokenizer import END, Tokenizer, TokenizerError, _as_ids

ROLES = ("system", "user", "assistant")
_PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_PLAIN_MARK = re.compile(r"^(System|User|Assistant):", re.MULTILINE)


class ChatTemplate:
    """Messages [{"role": "system"|"user"|"assistant", "content": str}, ...] <-> token ids.

    Tokenizers with <|system|>, <|user|>, <|assistant|> and <|end|> (ours):
        <|system|>content<|end|><|user|>content<|end|><|assistant|>content<|end|> ... [<|assistant|>]
    Others (imported HF tokenizers) use plain text, one "Role: content" line per message:
        "System: ...\\nUser: ...\\nAssistant: ...\\n" [+ "Assistant:"]
    which a base model continues naturally; a content line that itself starts with "User:" etc.
    reads back as a new message. Generation should stop at `stop_ids` and, in plain mode, at
    `stop_strings` (the model starting the next turn).

    `render` adds no BOS: prepend `tokenizer.bos_id` if the model was trained with one. Content is
    encoded as plain text, so a user typing "<|end|>" cannot close their own turn.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._role_ids = {role: tokenizer.token_to_id(f"<|{role}|>") for role in ROLES}
        self._end_id = tokenizer.token_to_id(END)
        self.uses_special_tokens = self._end_id is not None and None not in self._role_ids.values()
        self.stop_ids: set[int] = tokenizer.stop_ids()
        self.stop_strings: tuple[str, ...] = () if self.uses_special_tokens else tuple(
            f"\n{name}:" for name in _PLAIN_NAMES.values())

    @staticmethod
    def _check(messages: Any) -> list[tuple[str, str]]:
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise TokenizerError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                 f"got {type(messages).__name__}")
        checked = []
        for n, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(f"message {n} must be a dict with 'role' and 'content', "
                                     f"got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise TokenizerError(f"message {n} has role {role!r}; the roles are {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise TokenizerError(f"message {n} ({role}) has content of type {type(content).__name__}; "
                                     "content must be a str (join multi-part content into one string)")
            checked.append((role, content))
        return checked

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation, ending with the assistant prompt if add_generation_prompt."""
        checked = self._check(messages)
        tok = self.tokenizer
        if not self.uses_special_tokens:
            text = "".join(f"{_PLAIN_NAMES[role]}: {content}\n" for role, content in checked)
            return tok.encode(text + ("Assistant:" if add_generation_prompt else ""))
        ids: list[int] = []
        for role, content in checked:
            ids.append(self._role_ids[role])
            ids.extend(tok.encode(content))
            ids.append(self._end_id)
        if add_generation_prompt:
            ids.append(self._role_ids["assistant"])
        return ids

    def parse(self, ids) -> list[dict]:
        """Messages from token ids (the inverse of render). A message cut short (no <|end|>, e.g. a
        reply still being generated) is returned if it has text; the empty generation prompt is not.
        Tokens outside any message (BOS, EOS, padding) are ignored."""
        ids = _as_ids(ids)
        if not self.uses_special_tokens:
            return self._parse_plain(self.tokenizer.decode(ids))
        roles = {i: role for role, i in self._role_ids.items()}
        messages: list[dict] = []
        role: str | None = None
        body: list[int] = []
        for i in ids:
            if i in roles:
                if role is not None:  # the previous message was never closed
                    messages.append({"role": role, "content": self.tokenizer.decode(body)})
                role, body = roles[i], []
            elif i == self._end_id:
                if role is not None:
                    messages.append({"role": role, "content": self.tokenizer.decode(body)})
                role, body = None, []
            elif role is not None:
                body.append(i)
        if role is not None:
            content = self.tokenizer.decode(body)
            if content:
                messages.append({"role": role, "content": content})
        return messages

    @staticmethod
    def _parse_plain(text: str) -> list[dict]:
        marks = list(_PLAIN_MARK.finditer(text))
        names = {v: k for k, v in _PLAIN_NAMES.items()}
        messages = []
        for n, mark in enumerate(marks):
            body = text[mark.end(): marks[n + 1].start() if n + 1 < len(marks) else len(text)]
            closed = body.endswith("\n")
            body = body[1:] if body.startswith(" ") else body
            body = body[:-1] if closed else body
            if closed or body:
                messages.append({"role": names[mark[1]], "content": body})
        return messages


class TextTemplate:
    """Messages -> one running text, for a model that is not chat-trained (under ChatTemplate it sees
    role markers it never learned, and answers nothing useful):

        [user "A", assistant " b", user "C"]  ->  "A b C"

    A user or system message is joined to the text before it by one space (none at the start); an
    assistant message is appended as is (it continues the text the model was given). There is no
    generation prompt and no turn marker, so nothing but the model's own stop ids or the caller's
    `stop` / `max_tokens` ends a reply. Rendering a conversation, then appending the reply and the
    next message, gives a prompt whose text starts with the previous one: a server's KV state of the
    earlier turns is reused as for a completions client that grows its prompt.
    """

    uses_special_tokens = False
    stop_strings: tuple[str, ...] = ()

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids: set[int] = tokenizer.stop_ids()

    @staticmethod
    def text(messages: list[dict]) -> str:
        parts: list[str] = []
        for role, content in ChatTemplate._check(messages):
            parts.append(content if role == "assistant" or not parts else " " + content)
        return "".join(parts)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the running text (add_generation_prompt changes nothing: there is no prompt)."""
        text = self.text(messages)
        if not text:  # nothing for the model to continue (a chat template would still give role tokens)
            raise TokenizerError("the conversation is empty text; send a message with some content")
        return self.tokenizer.encode(text)


# "model": the tokenizer's chat template (ChatTemplate); "text": one running text (TextTemplate)
TEMPLATE_STYLES = ("model", "text")


def template_for(tokenizer: Tokenizer, style: str = "model") -> ChatTemplate | TextTemplate:
    if style == "model":
        return ChatTemplate(tokenizer)
    if style == "text":
        return TextTemplate(tokenizer)
    raise ValueError(f"chat template style {style!r} is not one of {', '.join(TEMPLATE_STYLES)}")
