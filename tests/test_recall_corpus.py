"""`ctxmem data prepare --corpus recall`: synthetic key-value recall documents, alone or mixed into
another corpus at a chosen fraction, built from the same fact generator as the memory evaluation."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ctxmem.cli import main
from ctxmem.recall_facts import FactGenerator
from ctxmem.training import corpora
from ctxmem.training.data import TokenData, prepare
from ctxmem.training.errors import DataError
from helpers_training import write_text_corpus

STATEMENT = re.compile(r"The (\w+) of the (\w+) (\w+) is (\d{4})\.")
QA = re.compile(r"Q: the (\w+) of the (\w+) (\w+)\? A: (\d{4})\.")


def test_facts_have_distinct_keys_and_questions_answer_them():
    gen = FactGenerator(seed=7)
    facts = gen.facts(50)
    assert len({f.key for f in facts}) == 50
    assert FactGenerator(seed=7).facts(50) == facts  # seeded
    doc = FactGenerator(seed=1).document(n_facts=8, max_gap_chars=50, open_facts=2)
    stated = {m.groups()[:3]: m.group(4) for m in STATEMENT.finditer(doc)}
    asked = {m.groups()[:3]: m.group(4) for m in QA.finditer(doc)}
    assert len(stated) == 8 and asked == stated
    # in document order: each question comes after its fact, and at most 2 facts wait for theirs
    events = sorted([(m.start(), "fact", m.groups()[:3]) for m in STATEMENT.finditer(doc)]
                    + [(m.start(), "question", m.groups()[:3]) for m in QA.finditer(doc)])
    waiting, most = set(), 0
    for _, kind, key in events:
        if kind == "fact":
            waiting.add(key)
        else:
            assert key in waiting
            waiting.remove(key)
        most = max(most, len(waiting))
    assert most == 2


def test_recall_questions_come_within_a_small_models_context_of_their_facts():
    """With the corpus's settings every value is asked within 500 characters (median ~90: the
    distances the memory evaluation asks at), so a 256-token crop holds most facts with their question."""
    gen = FactGenerator(seed=2)
    distances = []
    for _ in range(50):
        doc = gen.document(corpora.RECALL_FACTS, max_gap_chars=corpora.RECALL_GAP_CHARS,
                           open_facts=corpora.RECALL_OPEN_FACTS)
        values = {m.groups()[:3]: m.start(4) for m in STATEMENT.finditer(doc)}
        distances += [m.start(4) - values[m.groups()[:3]] for m in QA.finditer(doc)]
    assert len(distances) == 50 * corpora.RECALL_FACTS
    assert max(distances) <= 500 and 60 <= float(np.median(distances)) <= 200


def test_recall_specs_resolve_and_bad_ones_are_clear():
    assert corpora.resolve("recall").name == "recall"
    assert corpora.resolve("recall:0.25").fraction == 0.25
    assert corpora.resolve("recall:40").documents == 40
    for bad in ("recall:1.5", "recall:zero", "recall:0", "recall:2.0"):
        with pytest.raises(DataError, match="recall takes a fraction"):
            corpora.resolve(bad)


def test_recall_alone_writes_documents_of_facts_and_answered_questions(tmp_path, capsys):
    out = tmp_path / "recall"
    assert main(["data", "prepare", "--corpus", "recall:40", "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpora"] == [{"spec": "recall:40", "kind": "recall", "license": "synthetic (ctxmem)", "files": 0,
                                "documents": 40}]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    data = TokenData(out)
    shards = meta["splits"]["train"]["shards"]
    text = data.tokenizer().decode(np.memmap(out / shards[0]["file"], dtype=np.uint16, mode="r").tolist())
    assert len(STATEMENT.findall(text)) >= 3 * 30 and len(QA.findall(text)) >= 3 * 30
    with pytest.raises(DataError, match="a fraction needs other corpora"):
        prepare(["recall:0.3"], tmp_path / "alone", progress=False)


def test_recall_mixes_into_another_corpus_at_the_fraction_with_its_filler(tmp_path):
    src = write_text_corpus(tmp_path / "src")
    out = tmp_path / "mixed"
    prepare([str(src), "recall:0.3"], out, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    kinds = {c["kind"]: c for c in meta["corpora"]}
    assert set(kinds) == {"path", "recall"} and kinds["recall"]["documents"] > 0
    # the recall share of the characters is the asked fraction (up to one document)
    others = [d for p in corpora.resolve(str(src)).files for d in corpora.read_file(p)]
    docs = corpora.recall_documents(corpora.resolve("recall:0.3"), others, seed=0)
    other_chars = sum(corpora._chars(d) for d in others)
    recall_chars = sum(len(d) for d in docs)
    assert len(docs) == kinds["recall"]["documents"]
    assert 0.3 <= recall_chars / (recall_chars + other_chars) <= 0.3 + max(len(d) for d in docs) / other_chars
    # filler comes from the corpus it is mixed into, not the synthetic grammar
    pool = corpora._filler_pool(others, seed=0)
    fillers = [part for d in docs for part in STATEMENT.split(QA.sub("|", d)) if len(part) > 20]
    assert fillers and all(any(piece.strip() in pool for piece in part.split("|") if piece.strip())
                           for part in fillers[:20])
