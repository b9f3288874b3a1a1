"""The chat page at `/` in a real browser: Debian's chromium driven by Playwright, against the real
API app (FastAPI over an in-process engine on the tiny export, sink memory with 4 sinks and a
window of 60) served by uvicorn on 127.0.0.1. Requests to any other origin are refused, so the page
is shown to work offline. One server and one browser for the module.

Set CTXMEM_CHAT_SCREENSHOT=path.png (CTXMEM_CHAT_RECALL_SCREENSHOT for the recall test's) to keep a
screenshot elsewhere than the test's tmp folder (the README's pictures are made that way). The recall
test serves bench/models/recall-small as text under retrieve instead of the tiny export."""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from ctxmem.net import free_port
from ctxmem.serving.api import LocalEngineClient, build_api
from ctxmem.serving.config import ServeArgs
from ctxmem.serving.engine import Engine
from ctxmem.serving.events import Delta
from ctxmem.serving.store import MemoryStore
from helpers_serving import API_KEY, AUTH

NAME = "tiny"
BROWSER = shutil.which("chromium")
LOAD_TIMEOUT_MS = 60_000  # the shared CI machine may be slow; nothing asserts on time


class Server:
    """uvicorn in a thread, stoppable and restartable on the same port (the 'stopped server' case)."""

    def __init__(self, app, port: int):
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = self.thread = None

    def start(self) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


class HeldStream(LocalEngineClient):
    """The in-process engine, whose next stream can be held after its first text until released: the
    test sees the page show part of a reply while the rest is still to come, with no timing involved
    (a browser may otherwise read a fast local stream in one go)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.hold, self.release = threading.Event(), threading.Event()

    async def stream(self, request):
        held = self.hold.is_set()
        self.hold.clear()
        if held:  # seeded: unseeded, the random tiny model's reply at temperature 1 is now and then empty
            # (a stop token first), and an empty reply has no text to hold (the page would wait forever)
            request = {**request, "generation": {**(request.get("generation") or {}), "seed": 1}}
        async for chunk in self.engine.generate(request):
            first = next((i for i, ev in enumerate(chunk) if isinstance(ev, Delta) and ev.text), None) if held else None
            if first is None:
                yield chunk
                continue
            # hold right after the first text: a fast engine may coalesce the whole reply and its end
            # into one chunk (one Delta), and a hold after that chunk would hold nothing
            held = False
            delta, rest = chunk[first], chunk[first + 1:]
            if delta.tokens > 1 and len(delta.text) > 1:  # keep some of its text for after the hold
                rest = [Delta(delta.text[1:], delta.tokens - 1, delta.batch), *rest]
                delta = Delta(delta.text[:1], 1, delta.batch)
            yield [*chunk[:first], delta]
            await asyncio.to_thread(self.release.wait)
            if rest:
                yield rest


@pytest.fixture(scope="module")
def server(tiny_export):
    args = ServeArgs(model=str(tiny_export), model_name=NAME, api_keys=[API_KEY]).resolve()
    engine = Engine(args.engine)
    client = HeldStream(engine)
    store = MemoryStore()
    srv = Server(build_api(client, args, store), free_port())
    srv.engine_client, srv.store = client, store
    srv.start()
    yield srv
    if srv.thread.is_alive():
        srv.stop()
    engine.close()


@pytest.fixture(scope="module")
def browser():
    if BROWSER is None:
        pytest.fail("chromium is not installed: run `bash infra/bootstrap.sh` as root (it apt-get installs it)")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])  # root in CI: no user namespaces
        yield b
        b.close()


@pytest.fixture
def context(browser, server):
    ctx = offline_context(browser, server.url)
    yield ctx
    assert ctx.elsewhere == [], f"the page asked another origin: {ctx.elsewhere}"
    ctx.close()


def offline_context(browser, url: str):
    """A browser context where requests to any origin but `url`'s are refused (and remembered)."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    ctx.set_default_timeout(LOAD_TIMEOUT_MS)
    ctx.elsewhere = []

    def offline(route):
        if urlparse(route.request.url).netloc == urlparse(url).netloc or route.request.url.startswith("data:"):
            route.continue_()
        else:
            ctx.elsewhere.append(route.request.url)
            route.abort()

    ctx.route("**/*", offline)
    return ctx


def open_page(context, url: str):
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: "Content Security Policy" in msg.text and page.errors.append(msg.text))
    page.goto(url)
    return page


def send(page, text: str) -> dict:
    """Type a message, press Enter, wait for the reply to finish; the new turn's memory bar data."""
    before = page.locator("#messages .msg.assistant").count()
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")
    reply = page.locator("#messages .msg.assistant").nth(before)
    reply.locator("figure.memory, .error").first.wait_for()
    bar = reply.locator("figure.memory")
    return dict(bar.evaluate("f => ({...f.dataset})")) if bar.count() else {}


# every memory bar's numbers (and its past-the-window mark) and its text
BARS = "fs => fs.map(f => [{...f.dataset}, f.innerText])"

# true once the page shows exactly these message texts, in order
SHOWS = "want => JSON.stringify([...document.querySelectorAll('#messages .msg .text')].map(e => e.textContent)) " \
        "=== JSON.stringify(want)"


def retry(page, error) -> None:
    """Click the error's Retry and wait for the turn's memory bar (the failed bubbles go first)."""
    bars = page.locator("figure.memory").count()
    error.get_by_role("button", name="Retry").click()
    page.wait_for_function("n => document.querySelectorAll('figure.memory').length > n", arg=bars)
    assert page.locator("#messages .msg.assistant").last.locator("figure.memory").count() == 1


def test_the_page_is_served_from_the_package_with_a_same_origin_policy(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("chat.js", "chat.css"):
        r = httpx.get(f"{server.url}/chat/{asset}")
        assert r.status_code == 200 and r.text and "connect-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in page.text.replace('href="data:,"', "")  # no absolute URL: nothing from elsewhere
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]
    assert models["memory"]["policy"] == "sink" and models["memory"]["window"] == 60 and models["memory"]["sinks"] == 4


def test_chat_in_a_browser_memory_bar_resume_and_errors(server, context, tmp_path):
    page = open_page(context, server.url + "/")
    # the server requires a key: the page says so in the API's words and asks for one
    missing_key = httpx.get(server.url + "/v1/models").json()["error"]["message"]
    page.get_by_role("alert").filter(has_text=missing_key).wait_for()
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Save").click()
    page.locator("#memory-policy").filter(has_text="60 most recent").wait_for()
    assert page.evaluate("localStorage.getItem('ctxmem.apiKey')") == API_KEY

    page.get_by_label("Temperature").fill("1")  # the random tiny model's greedy tokens are all empty text
    page.get_by_label("Max tokens").fill("64")
    # Shift+Enter breaks the line and sends nothing
    page.get_by_label("Message").fill("Hello")
    page.get_by_label("Message").press("Shift+Enter")
    page.get_by_label("Message").type("there")
    assert page.get_by_label("Message").input_value() == "Hello\nthere"
    assert page.locator("#messages .msg").count() == 0

    # the reply streams in: the server holds the stream after its first text; the page shows that
    # part, still writing, then the rest once released
    server.engine_client.hold.set()
    page.get_by_label("Message").press("Enter")
    writing = page.locator("#messages .msg.assistant.streaming .text")
    page.wait_for_function("el => el.textContent.length > 0", arg=writing.element_handle())
    part = writing.text_content()
    assert page.locator("figure.memory").count() == 0
    server.engine_client.release.set()
    page.locator("#messages .msg.assistant figure.memory").first.wait_for()
    first_reply = page.locator("#messages .msg.assistant .text").first.text_content()
    assert first_reply.startswith(part) and len(first_reply) > len(part)
    assert page.locator("#messages .msg.user .text").first.inner_text() == "Hello\nthere"
    first = page.url.split("#session=")[1]

    # a new conversation, short replies: turns until the prompt no longer fits the window (4 sinks +
    # 60); the bar shows the evictions and the prompt tokens served from the cached KV state
    page.get_by_role("button", name="New").click()
    assert page.locator("#messages .msg").count() == 0 and "#session=" not in page.url
    page.get_by_label("Max tokens").fill("8")
    bars = []
    for i in range(8):
        bars.append(send(page, f"Turn {i}: tell me more."))
        if page.locator("figure.memory[data-past]").count():
            break
    assert page.locator("figure.memory[data-past]").count() == 1, bars
    past = int(page.locator("figure.memory").evaluate_all("fs => fs.findIndex(f => f.dataset.past)"))
    assert int(bars[past]["prompt"]) > 64 and all(int(b["prompt"]) <= 64 for b in bars[:past])
    assert all(int(b["sinks"]) == 4 for b in bars), bars
    assert int(bars[-1]["evicted"]) > 0
    assert any(int(b["cached"]) > 0 for b in bars), bars
    legend = page.locator("figure.memory").last.inner_text()
    assert f"{bars[-1]['evicted']} evicted so far" in legend
    assert f"{bars[-1]['cached']} of {bars[-1]['prompt']} prompt tokens from the cached KV state" in legend
    shot = Path(os.environ.get("CTXMEM_CHAT_SCREENSHOT") or tmp_path / "chat-page.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    # reload: the same conversation comes back from the server, every turn's memory bar with it (the
    # same numbers, the same turn marked past the window); both conversations are in this key's list
    sid = page.url.split("#session=")[1]
    texts = page.locator("#messages .msg .text").all_text_contents()
    shown = page.locator("figure.memory").evaluate_all(BARS)
    stored = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=AUTH).json()["usage"]
    assert [(u["prompt_tokens"], u["total_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["evicted_tokens"])
            for u in stored] == [(int(b["prompt"]), int(b["total"]), int(b["cached"]), int(b["evicted"]))
                                 for b, _ in shown]
    page.reload()
    page.locator("#messages .msg").nth(len(texts) - 1).wait_for()
    assert page.locator("#messages .msg .text").all_text_contents() == texts
    assert page.locator("figure.memory").evaluate_all(BARS) == shown
    current = page.locator("#conversations button[aria-current=true]")
    current.wait_for()
    assert current.get_attribute("data-id") == sid and "Turn 0" in current.inner_text()
    assert page.locator("#conversations button.conversation").count() == 2
    # a fresh tab without the link: pick the first conversation from the list
    other = open_page(context, server.url + "/")
    other.locator(f"#conversations button[data-id='{first}']").click()
    other.locator("#messages .msg.assistant").first.wait_for()
    assert other.url.endswith("#session=" + first)
    assert other.locator("#messages .msg .text").all_text_contents() == ["Hello\nthere", first_reply]
    other.close()
    # the same conversation as if stored before each turn's usage was kept, up to the turn past the
    # window: those turns have no bar, and that turn is not called the first past it (the turn before
    # it is unknown)
    (owner, _), row = next((k, v) for k, v in server.store._data.items() if k[1] == sid)
    server.store._data[(owner, "legacy")] = {**row, "id": "legacy", "usage": row["usage"][past:]}
    legacy = open_page(context, server.url + "/#session=legacy")
    legacy.locator("#messages .msg").nth(len(texts) - 1).wait_for()
    unmarked = [{k: v for k, v in d.items() if k != "past"} for d, _ in shown[past:]]
    assert [d for d, _ in legacy.locator("figure.memory").evaluate_all(BARS)] == unmarked
    assert legacy.locator("figure.memory[data-past]").count() == 0 and past >= 1
    assert f"no memory bar for {past} earlier turn" in legacy.locator("#status").inner_text()
    legacy.close()

    # an API error is shown as the API words it
    page.get_by_label("Max tokens").fill("100000")
    expected = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", headers=AUTH,
                          json={"content": "x", "max_tokens": 100000}).json()["error"]["message"]
    send(page, "too long")
    assert page.locator("#messages .msg.assistant .error").last.inner_text().startswith(expected)
    page.get_by_label("Max tokens").fill("8")

    # a stream cut off midway says so and offers to retry. Here the server kept the turn (the browser
    # got only the first event of its answer): the retry reads the conversation back, sends nothing
    def truncated(route):
        answer = route.fetch().text()
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=answer[:answer.index("\n\n") + 2])

    page.route("**/messages", truncated)
    send(page, "Are you there?")
    error = page.locator("#messages .msg.assistant .error").last
    assert "ended before it was complete" in error.inner_text()
    page.unroute("**/messages")
    failed = page.locator("#messages .msg.assistant").last.element_handle()
    error.get_by_role("button", name="Retry").click()
    page.wait_for_function("li => !li.isConnected", arg=failed)
    kept = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=AUTH).json()["messages"]
    assert [m["content"] for m in kept if m["role"] == "user"].count("Are you there?") == 1
    page.wait_for_function(SHOWS, arg=[m["content"] for m in kept])  # the conversation as the server kept it

    # a stopped server: the page says so and offers to retry; after a restart the retry sends the turn
    server.stop()
    send(page, "Still there?")
    error = page.locator("#messages .msg.assistant .error").last
    assert "cannot be reached" in error.inner_text()
    server.start()
    retry(page, error)
    history = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=AUTH).json()["messages"]
    assert [m["content"] for m in history if m["role"] == "user"][-2:] == ["Are you there?", "Still there?"]
    # the cut stream's retry redrew the conversation from the server: every turn has its bar again,
    # still one marked past the window, the same one
    assert page.locator("figure.memory").count() == len([m for m in history if m["role"] == "assistant"])
    assert page.locator("figure.memory").evaluate_all("fs => fs.findIndex(f => f.dataset.past)") == past
    assert page.locator("figure.memory[data-past]").count() == 1
    assert page.errors == []


def test_the_page_is_readable_at_phone_width(server, context):
    page = open_page(context, server.url + "/")
    page.set_viewport_size({"width": 375, "height": 740})
    page.get_by_label("API key").wait_for(state="attached")
    # nothing wider than the screen, and every control is reachable by its label
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    for label in ("Message", "Temperature", "Max tokens"):
        box = page.get_by_label(label).bounding_box()
        assert box and 0 <= box["x"] and box["x"] + box["width"] <= 375, label
    assert page.errors == []


@pytest.fixture(scope="module")
def retrieve_server(tiny_export):
    """The same export served under the retrieve policy (ONNX Runtime, contract v4 gives the queries):
    4 sinks, a window of 60, up to 32 evicted tokens put back from a store of 256 per conversation."""
    memory = {"policy": "retrieve", "window": 60, "sinks": 4, "budget": 32, "store": 256}
    args = ServeArgs(model=str(tiny_export), model_name=NAME, engine={"model": str(tiny_export), "memory": memory})
    engine = Engine(args.resolve().engine)
    srv = Server(build_api(LocalEngineClient(engine), args.resolve(), MemoryStore()), free_port())
    srv.start()
    yield srv
    srv.stop()
    engine.close()


def test_the_memory_bar_shows_what_retrieve_put_back(retrieve_server, browser, tmp_path):
    """Past the window, each reply's bar counts the evicted tokens put back for it and lists them with
    their text, as the API's usage says (recalled_tokens, recalled); a reload shows them again. The
    random tiny model recalls nothing meaningful: tests/test_serving_retrieve.py checks real recall."""
    url = retrieve_server.url
    ctx = offline_context(browser, url)
    page = open_page(ctx, url + "/")  # no API keys on this server
    page.locator("#memory-policy").filter(has_text="up to 32 evicted tokens put back").wait_for()
    page.get_by_label("Temperature").fill("1")
    page.get_by_label("Max tokens").fill("8")
    bars = []
    for i in range(10):
        bars.append(send(page, f"Turn {i}: tell me more."))
        if int(bars[-1]["evicted"]) > 0 and int(bars[-1]["recalled"]) > 0:
            break
    assert all("recalled" in b for b in bars), bars  # every retrieve reply says how many, 0 before evictions
    assert int(bars[0]["recalled"]) == 0 and int(bars[-1]["recalled"]) > 0, bars
    sid = page.url.split("#session=")[1]
    stored = httpx.get(f"{url}/v1/sessions/{sid}").json()["usage"]
    assert [u["recalled_tokens"] for u in stored] == [int(b["recalled"]) for b in bars]
    last = page.locator("figure.memory").last
    assert f"{bars[-1]['evicted']} evicted so far ({bars[-1]['recalled']} put back for this reply)" in last.inner_text()
    shown = last.locator("ul.recalled li")
    assert shown.count() == len(stored[-1]["recalled"]) > 0
    assert last.locator("ul.recalled q").all_text_contents() == [p["text"] for p in stored[-1]["recalled"]]
    first = stored[-1]["recalled"][0]
    assert f"put back: tokens {first['start']}–{first['start'] + first['tokens'] - 1}" in shown.first.inner_text()
    last.screenshot(path=str(tmp_path / "retrieve-bar.png"))
    assert (tmp_path / "retrieve-bar.png").stat().st_size > 2_000
    before = page.locator("figure.memory").evaluate_all(BARS)
    page.reload()
    page.locator("figure.memory").nth(len(bars) - 1).wait_for()
    assert page.locator("figure.memory").evaluate_all(BARS) == before  # the numbers and the lists come back
    assert page.errors == [] and ctx.elsewhere == []
    ctx.close()


@pytest.fixture(scope="module")
def recall_server():
    """bench/models/recall-small (recall-trained, not chat-trained) from its checkpoint, served as text
    (`--chat-template text`) under retrieve: the `ctxmem demo` memory segment's settings."""
    from ctxmem.serving.demo_memory import MEMORY, RECALL_MODEL

    args = ServeArgs(model=str(RECALL_MODEL), model_name="recall-small",
                     engine={"model": str(RECALL_MODEL), "memory": MEMORY, "chat_template": "text"}).resolve()
    engine = Engine(args.engine)
    srv = Server(build_api(LocalEngineClient(engine), args, MemoryStore()), free_port())
    srv.start()
    yield srv
    srv.stop()
    engine.close()


@pytest.mark.slow
def test_a_fact_typed_in_turn_1_is_recalled_at_turn_20_on_the_page(recall_server, browser, tmp_path):
    """Issue 14 in the browser: a fact typed in turn 1 is answered at turn 20, hundreds of tokens and
    several windows later, and the last bar counts what was evicted and lists what was put back -
    the fact among it. Greedy replies of the recall-trained model (a short filler reply per turn, as
    the demo's segment); the same conversation under sink forgets it (tests/test_serving_retrieve.py)."""
    from ctxmem.serving.demo_memory import MEMORY, conversation

    texts, fact = conversation(seed=0, turns=20)
    url = recall_server.url
    ctx = offline_context(browser, url)
    page = open_page(ctx, url + "/")
    page.locator("#chat-template").filter(has_text="not chat-trained").wait_for()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("3")
    bars = []
    for i, text in enumerate(texts):
        if i == len(texts) - 1:
            page.get_by_label("Max tokens").fill(str(len(fact.answer)))  # bytes = tokens
        bars.append(send(page, text))
    reply = page.locator("#messages .msg.assistant .text").last.text_content()
    assert reply == fact.answer, (reply, fact.answer)
    last = bars[-1]
    window = MEMORY["sinks"] + MEMORY["window"]
    assert int(last["prompt"]) > 8 * window and int(last["evicted"]) > 7 * window, last
    assert 0 < int(last["recalled"]) <= 2 * MEMORY["budget"], last
    assert int(last["cached"]) > int(last["prompt"]) - 48, last  # the running text reuses the KV state of the turns before
    # the run that holds the fact's value is listed under the last bar, with its text
    bar = page.locator("figure.memory").last
    put_back = bar.locator("ul.recalled q").all_text_contents()
    assert any(fact.answer.strip() in text for text in put_back), put_back
    assert f"{last['evicted']} evicted so far ({last['recalled']} put back for this reply)" in bar.inner_text()
    # memory is full: sinks + window as configured, and the reply's last token (sampled, not yet fed) beside them
    assert (last["sinks"], last["window"], last["pending"]) == (str(MEMORY["sinks"]), str(MEMORY["window"]), "1")
    assert f"memory: 4 sink + 64 window tokens (holds 68) + the reply's last token, not yet attended" in bar.inner_text()
    assert page.locator("figure.memory[data-past=true]").count() == 1  # the first turn past the window is marked
    sid = page.url.split("#session=")[1]
    stored = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert stored["turns"] == len(texts) and stored["messages"][-1]["content"] == fact.answer
    # the question and its answer with the bar (the README's picture: CTXMEM_CHAT_RECALL_SCREENSHOT=path.png)
    shot = Path(os.environ.get("CTXMEM_CHAT_RECALL_SCREENSHOT") or tmp_path / "recalled-at-turn-20.png")
    question, answer = (page.locator("#messages .msg").nth(i).bounding_box() for i in (-2, -1))
    column = page.locator("#messages").bounding_box()
    page.screenshot(path=str(shot), clip={"x": column["x"], "y": question["y"] - 8, "width": column["width"],
                                          "height": answer["y"] + answer["height"] - question["y"] + 16})
    assert shot.stat().st_size > 5_000
    assert page.errors == [] and ctx.elsewhere == []
    ctx.close()
