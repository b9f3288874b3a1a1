"""The scheduler gathers a stream's tokens in one `Texts` until their message goes out: the Delta it
becomes must be what `coalesce` makes of the per-token Deltas it replaces."""
from __future__ import annotations

from ctxmem.serving.events import Delta, Started, Texts, coalesce


def test_texts_become_the_delta_coalesce_makes_of_the_same_tokens():
    tokens = [("he", 3), ("", 5), ("llo", 16), ("", 2), (" w", 4)]  # (text, batch): "" is a held-back character
    texts = Texts(*tokens[0])
    for text, batch in tokens[1:]:
        texts.add(text, batch)
    want = coalesce([Started(3, 0, 0.0, None)] + [Delta(t, 1, b) for t, b in tokens])
    assert [Started(3, 0, 0.0, None), texts.delta()] == want
    assert texts.delta() == Delta("hello w", 5, 16)
    assert texts.has_text() and not Texts("", 1).has_text()
