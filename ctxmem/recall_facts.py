"""Synthetic key-value facts for recall: "The code of the blue door is 4812." and a question about it.

One seeded generator shared by the memory evaluation (a fact placed a measured distance before its
question) and the `recall` training corpus (documents of facts, filler and answered questions), so
a model trained on the corpus is asked, at evaluation, exactly the kind of question it learnt.

The texts are fixed templates on purpose: the question repeats the fact's key in a fixed form and
the answer is the value alone, so answering is pure retrieval from context, never world knowledge.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

ATTRIBUTES = ("code", "number", "pin", "key", "password", "ticket", "label", "price")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown", "pink",
           "silver", "golden", "violet", "amber", "teal")
THINGS = ("door", "box", "car", "locker", "safe", "gate", "bag", "book", "bike", "lamp", "chair", "boat",
          "house", "phone", "clock", "train", "cup", "drawer", "jar", "kite")

# filler for training documents: short plain sentences of a small grammar (no digits, so the only
# numbers in a recall document are the values to remember)
_FILLER_SUBJECTS = ("the river", "a small bird", "the old man", "my sister", "the wind", "a tired dog", "the teacher",
                    "our neighbour", "the baker", "a quiet child", "the city", "the garden")
_FILLER_VERBS = ("walks past", "looks at", "sings about", "waits near", "thinks of", "talks to", "paints",
                 "follows", "forgets", "remembers", "carries", "finds")
_FILLER_OBJECTS = ("the hill", "a long road", "the morning light", "an empty room", "the market", "a green field",
                   "the station", "a warm fire", "the harbour", "a paper boat", "the tall tree", "the last bus")


@dataclass(frozen=True)
class Fact:
    attribute: str  # "code"
    colour: str  # "blue"
    thing: str  # "door"
    value: str  # "4812"

    @property
    def key(self) -> str:
        return f"the {self.attribute} of the {self.colour} {self.thing}"

    @property
    def prefix(self) -> str:
        """The statement up to (not including) the value: "The code of the blue door is"."""
        return f"The {self.attribute} of the {self.colour} {self.thing} is"

    @property
    def answer(self) -> str:
        """The value as it follows the prefix or the question: " 4812"."""
        return f" {self.value}"

    @property
    def statement(self) -> str:
        return f"{self.prefix}{self.answer}."

    @property
    def question(self) -> str:
        """Ends where the answer starts: "Q: the code of the blue door? A:" (short: with a byte
        tokenizer every character is a token of the distance budget)."""
        return f"Q: {self.key}? A:"

    @property
    def qa(self) -> str:
        return f"{self.question}{self.answer}."


class FactGenerator:
    """Seeded facts; `facts(n)` gives n facts with distinct keys (so one question has one answer)."""

    def __init__(self, seed: int = 0, digits: int = 4):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.rng = random.Random(seed)
        self.digits = digits

    def value(self) -> str:
        # first digit non-zero: every value has exactly `digits` digits
        return str(self.rng.randint(10 ** (self.digits - 1), 10 ** self.digits - 1))

    def fact(self) -> Fact:
        return Fact(self.rng.choice(ATTRIBUTES), self.rng.choice(COLOURS), self.rng.choice(THINGS), self.value())

    def facts(self, n: int) -> list[Fact]:
        limit = len(ATTRIBUTES) * len(COLOURS) * len(THINGS)
        if n > limit:
            raise ValueError(f"at most {limit} facts with distinct keys, asked for {n}")
        out, keys = [], set()
        while len(out) < n:
            fact = self.fact()
            if fact.key not in keys:
                keys.add(fact.key)
                out.append(fact)
        return out

    def filler(self, chars: int) -> str:
        """About `chars` characters (at least one sentence) of plain filler sentences."""
        sentences, size = [], 0
        while not sentences or size < chars:
            words = (self.rng.choice(_FILLER_SUBJECTS), self.rng.choice(_FILLER_VERBS), self.rng.choice(_FILLER_OBJECTS))
            s = " ".join(words) + "."
            sentences.append(s[0].upper() + s[1:])
            size += len(s) + 1
        return " ".join(sentences)

    def document(self, n_facts: int = 8, max_gap_chars: int = 80, filler: Callable[[int], str] | None = None,
                 open_facts: int = 2) -> str:
        """A training document: facts stated among filler, each asked and answered soon after, with
        at most `open_facts` stated and not yet asked at any time - so every question comes within a
        few statements of its fact (value to answer: ~40 characters up to ~(open_facts + 1) x
        (max_gap_chars / 2 + 40)), inside a small model's training context wherever a crop falls.
        The distractors (other open facts) make the key, not recency, pick the answer.
        filler(chars) -> text gives the filler (default: this generator's filler sentences)."""
        if open_facts < 1:
            raise ValueError(f"open_facts must be >= 1, got {open_facts}")
        filler = filler or self.filler
        waiting = self.facts(n_facts)  # to be stated, in order
        stated: list[tuple[Fact, int]] = []  # stated, not yet asked, with the event it was stated at
        parts = []
        for event in range(2 * n_facts):
            parts.append(filler(self.rng.randint(0, max_gap_chars)))
            overdue = stated and event - stated[0][1] > open_facts  # the oldest waits no longer
            if waiting and not overdue and (not stated or (len(stated) < open_facts and self.rng.random() < 0.5)):
                stated.append((waiting.pop(), event))
                parts.append(stated[-1][0].statement)
            else:
                parts.append(stated.pop(0 if overdue else self.rng.randrange(len(stated)))[0].qa)
        return " ".join(p for p in parts if p)
