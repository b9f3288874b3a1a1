"""The stream prefix: the tokens every training sample began with (the sink token of sink='token',
then BOS for data.samples=document) begin every stream at inference too - in the core's
ContextMemory, so in PyTorch, ONNX Runtime and the serving engine alike. A crop-trained model's
stream gets no BOS; a config written before the field existed loads unchanged."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctxmem.config import ConfigError, ModelConfig, preset
from ctxmem.generation import Generator
from ctxmem.memory import ContextMemory, ContextOverflowError, MemoryConfig, NumpyCacheOps
from ctxmem.sampling import GenerationConfig
from ctxmem.tokenizer import ByteTokenizer

BOS = ByteTokenizer().bos_id
REPO = Path(__file__).resolve().parents[1]


# ---- the config -------------------------------------------------------------------------------
def test_bos_token_id_is_optional_written_only_when_set_and_validated():
    old = preset("tiny", vocab_size=264).to_dict()
    assert "bos_token_id" not in old  # a crop-trained config is written as before the field existed
    crop = ModelConfig.from_dict(old)
    assert crop.bos_token_id is None and crop.stream_prefix == ()
    doc = crop.replace(bos_token_id=BOS)
    assert doc.stream_prefix == (BOS,) and ModelConfig.from_dict(json.loads(json.dumps(doc.to_dict()))) == doc
    sink_doc = crop.replace(sink="token", bos_token_id=BOS)
    assert sink_doc.stream_prefix == (sink_doc.vocab_size - 1, BOS)
    assert crop.replace(sink="token").stream_prefix == (crop.vocab_size - 1,)
    for bad in (-1, 264, True, "257", 263):  # 263: the sink token of the sink='token' model below
        with pytest.raises(ConfigError, match="bos_token_id"):
            crop.replace(sink="token", bos_token_id=bad)


def test_a_document_run_records_its_bos_and_a_crop_run_does_not():
    from types import SimpleNamespace

    from ctxmem.training.config import TrainConfig
    from ctxmem.training.trainer import model_config

    data = SimpleNamespace(vocab_size=ByteTokenizer().vocab_size, tokenizer=ByteTokenizer)
    doc = model_config(TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["data.samples=document"]), data)
    crop = model_config(TrainConfig.load(REPO / "infra" / "train-tiny.yaml", ["data.samples=crop"]), data)
    assert doc.bos_token_id == BOS and crop.bos_token_id is None
    assert doc.replace(bos_token_id=None) == crop  # nothing else differs


# ---- the memory (a backend that records what it is fed) ------------------------------------------
class Recorder:
    ops = NumpyCacheOps()
    max_seq_len, vocab_size, uses_rope = 64, 300, True

    def __init__(self, sink: int | None, bos: int | None):
        self.sink_token_id = sink
        self.stream_prefix = tuple(t for t in (sink, bos) if t is not None)
        self.fed: list[list[list[int]]] = []  # per call, per row: the valid ids

    def forward(self, ids, layout, past, last_only=True):
        valid = layout.valid[:, -ids.shape[1]:]
        self.fed.append([row[ok].tolist() for row, ok in zip(ids, valid)])
        cache = np.zeros((ids.shape[0], 1, layout.key_positions.shape[1], 2), np.float32)
        logits = np.zeros((ids.shape[0], ids.shape[1], self.vocab_size), np.float32)
        return (logits[:, -1] if last_only else logits), [(cache, cache)]


@pytest.mark.parametrize("sink, bos", [(299, 256), (299, None), (None, 256), (None, None)])
def test_every_stream_starts_with_the_prefix_once(sink, bos):
    backend = Recorder(sink, bos)
    memory = ContextMemory(backend, MemoryConfig("full"))
    state = memory.start(3)
    logits = memory.feed(state, [[5, 6], [7], [256, 8]], all_logits=True)
    assert logits.shape == (3, 2, 300)  # the prefix's logits are not returned
    head = [t for t in (sink, bos) if t is not None]
    # a stream that brings its own BOS gets only the sink token (a model without BOS: the whole prefix)
    own_bos = ([sink] if sink is not None else []) + [256, 8] if bos is not None else head + [256, 8]
    assert backend.fed[0] == [head + [5, 6], head + [7], own_bos]  # a stream's own BOS is not doubled
    memory.feed(state, [[9], [9], [9]])
    assert backend.fed[1] == [[9], [9], [9]]  # only a stream's start gets it
    assert state.seen.tolist() == [len(head) + 3, len(head) + 2, len(own_bos) + 1]


def test_recompute_keeps_the_prefix_first():
    backend = Recorder(299, 256)
    memory = ContextMemory(backend, MemoryConfig("recompute", window=8, chunk=2))
    state = memory.start(1)
    for t in range(20):
        memory.feed(state, [[10 + t]])
        assert state.kept_tokens(0)[:2] == [299, 256]
    assert state.kept_tokens(0)[-1] == 29 and state.evicted[0] > 0


def test_the_full_policy_counts_the_prefix_before_generating():
    backend = Recorder(299, 256)  # 64 slots: prefix 2 + prompt + all but the last new token
    gen = Generator(backend, ByteTokenizer(), MemoryConfig("full"))
    config = GenerationConfig(max_new_tokens=3, temperature=0.0, stop_token_ids=[])
    assert len(gen.generate([[1] * 60], config)[0].token_ids) == 3
    with pytest.raises(ContextOverflowError, match="context of 64"):
        gen.generate([[1] * 61], config)
    # the one count the generator and the serving engine's admission check share
    memory = ContextMemory(backend, MemoryConfig("full"))
    assert memory.full_tokens_needed([1] * 60, 3) == 64  # the second prefix token takes a slot
    assert memory.full_tokens_needed([256] + [1] * 59, 3) == 63  # a prompt with its own BOS: one prefix token


# ---- PyTorch, ONNX Runtime, the serving engine -----------------------------------------------
@pytest.fixture(scope="module")
def document_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as a data.samples=document run would have saved it (BOS recorded)."""
    out = tmp_path_factory.mktemp("doc_ckpt") / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "bos_token_id": BOS}))
    return out


@pytest.fixture(scope="module")
def document_export(document_checkpoint, tmp_path_factory):
    from ctxmem.export.onnx_export import export_onnx

    return export_onnx(document_checkpoint, tmp_path_factory.mktemp("doc_export") / "export", verify_tokens=8)


def _first_fed(backend, run) -> list[list[int]]:
    """The valid ids of the backend's first forward while `run()` runs."""
    seen, forward = [], backend.forward

    def spy(ids, layout, past, last_only=True):
        seen.append([row[ok].tolist() for row, ok in zip(ids, layout.valid[:, -ids.shape[1]:])])
        return forward(ids, layout, past, last_only)
    backend.forward = spy
    try:
        run()
    finally:
        del backend.forward
    return seen[0]


def test_a_document_trained_model_starts_its_stream_with_bos_in_torch_ort_and_serving(
        document_checkpoint, document_export, tiny_checkpoint):
    from ctxmem.export.runtime import RuntimeConfig, load_onnx_generator
    from ctxmem.generation import load_generator
    from ctxmem.serving.config import EngineConfig
    from ctxmem.serving.engine import Engine

    prompt = [104, 105]  # "hi"
    config = GenerationConfig(max_new_tokens=4, temperature=0.0, stop_token_ids=[])
    assert RuntimeConfig.load(document_export).model_config.stream_prefix == (BOS,)  # carried by the export
    torch_gen, ort_gen = load_generator(document_checkpoint), load_onnx_generator(document_export)
    outs = {}
    for name, gen in (("torch", torch_gen), ("ort", ort_gen)):
        fed = _first_fed(gen.backend, lambda: outs.setdefault(name, gen.generate([prompt], config)))
        assert fed == [[BOS] + prompt], name
    assert outs["torch"][0].token_ids == outs["ort"][0].token_ids
    crop = load_generator(tiny_checkpoint)  # a crop-trained checkpoint (no field): no BOS
    assert _first_fed(crop.backend, lambda: crop.generate([prompt], config)) == [prompt]

    engine = Engine(EngineConfig(model=str(document_export)))
    fresh = Engine(EngineConfig(model=str(document_export), kv_reuse=False))
    try:
        async def serve():
            request = {"kind": "completion", "prompt": prompt,
                       "generation": {"max_new_tokens": 4, "temperature": 0.0}}
            return [ev async for chunk in engine.generate(request) for ev in chunk]
        assert _first_fed(engine.model.generator.backend, lambda: asyncio.run(serve())) == [[BOS] + prompt]
        # a conversation's next turn reuses its KV state (the prefix is in the state, not the history)
        messages = [{"role": "user", "content": "hi"}]
        for turn in range(2):
            request = {"kind": "chat", "messages": messages, "session_id": "doc",
                       "generation": {"max_new_tokens": 4, "temperature": 0.0}}
            events = asyncio.run(_collect(engine, request))
            text = "".join(getattr(ev, "text", "") for ev in events[:-1])
            assert events[-1].cache == ("hit" if turn else "miss"), turn
            plain = asyncio.run(_collect(fresh, {**request, "session_id": None}))
            assert text == "".join(getattr(ev, "text", "") for ev in plain[:-1])  # reuse changes no token
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    finally:
        engine.close()
        fresh.close()


async def _collect(engine, request):
    return [ev async for chunk in engine.generate(request) for ev in chunk]
