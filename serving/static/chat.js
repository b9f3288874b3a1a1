// ctxmem chat page: a plain client of this server's OpenAI-compatible API. No framework, no build
// step, nothing from another origin. Every path is relative, so the page also works behind a prefix.
//
//   GET  v1/models                      the model's name, its memory policy (sinks, window) and chat template
//   POST v1/sessions                    a new conversation; the server generates its id
//   GET  v1/sessions                    this key's conversations (the list on the side)
//   GET  v1/sessions/{id}               one conversation's messages (resume after a reload)
//   POST v1/sessions/{id}/messages      one turn, streamed as server-sent events over fetch
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "ctxmem.apiKey";
  const state = {
    key: localStorage.getItem(KEY_STORE) || "",
    model: null,      // the served model's id (GET v1/models)
    memory: null,     // {policy, window, sinks[, budget, store]}: the server's memory policy, when it says
    template: null,   // "model" (the tokenizer's chat template) or "text" (the conversation as one running text)
    session: null,    // the open conversation's id (also in the URL: #session=ID)
    turns: 0,         // the turns the server has kept of it, as last seen
    pastMarked: false, // whether a turn of this conversation is already marked as past the window
    busy: false,
  };

  class ApiError extends Error {  // the API answered with an error: shown as the API words it
    constructor(status, message, code) { super(message); this.status = status; this.code = code; }
  }
  class NetworkError extends Error {}  // no answer: the server stopped, or the stream was cut

  // ---- HTTP ------------------------------------------------------------------------------------
  function headers(json) {
    const h = {};
    if (state.key) h.Authorization = "Bearer " + state.key;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async function send(method, path, body) {
    try {
      return await fetch(path, {method, headers: headers(body !== undefined),
                                body: body === undefined ? undefined : JSON.stringify(body)});
    } catch (err) {
      throw new NetworkError("The server cannot be reached; it may have stopped (" + err.message + ").");
    }
  }

  async function failure(response) {
    let text = "";
    try { text = await response.text(); } catch (_) { /* connection dropped */ }
    let error = null;
    try { error = JSON.parse(text).error; } catch (_) { /* not OpenAI's error shape */ }
    if (response.status === 401) showKeyPanel();
    const message = error && error.message ? error.message : `HTTP ${response.status} ${text.slice(0, 200)}`;
    return new ApiError(response.status, message, error && error.code);
  }

  async function api(method, path, body) {
    const response = await send(method, path, body);
    if (!response.ok) throw await failure(response);
    try {
      return await response.json();
    } catch (err) {
      throw new NetworkError("The answer was cut off (" + err.message + ").");
    }
  }

  // One turn as server-sent events: `data: {chunk}` blocks, an error event, then `data: [DONE]`.
  async function streamTurn(sid, content, onText) {
    const body = {content, stream: true, stream_options: {include_usage: true}};
    const maxTokens = $("max-tokens").value.trim();
    const temperature = $("temperature").value.trim();
    if (maxTokens !== "") body.max_tokens = Number(maxTokens);  // the API checks the range and says so
    if (temperature !== "") body.temperature = Number(temperature);
    const response = await send("POST", `v1/sessions/${encodeURIComponent(sid)}/messages`, body);
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false, usage = null;
    try {
      for (;;) {
        const {value, done: end} = await reader.read();
        if (end) break;
        buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (!data) continue;
          if (data === "[DONE]") { done = true; continue; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(chunk.error.code === "session_conflict" ? 409 : 500,
                                              chunk.error.message, chunk.error.code);
          const choice = (chunk.choices || [])[0];
          if (choice && choice.delta && choice.delta.content) onText(choice.delta.content);
          if (chunk.usage) usage = chunk.usage;
          if (chunk.session) state.turns = chunk.session.turns;
        }
      }
    } catch (err) {
      if (err instanceof ApiError) throw err;
      throw new NetworkError("The reply stream was cut off (" + err.message + ").");
    }
    if (!done) throw new NetworkError("The reply stream ended before it was complete: the server stopped or the connection dropped.");
    return usage;
  }

  // ---- the memory bar --------------------------------------------------------------------------
  function hasSinks(memory) { return Boolean(memory) && (memory.policy === "sink" || memory.policy === "retrieve"); }

  function capacity(memory) {  // tokens of the conversation kept in place at most (retrieve's put-back copies aside)
    if (!memory || !memory.window) return null;
    return hasSinks(memory) ? memory.sinks + memory.window : memory.window;
  }

  function segment(cls, tokens, total, title) {
    const seg = document.createElement("span");
    seg.className = "seg " + cls;
    seg.style.width = (total > 0 ? (100 * tokens) / total : 0) + "%";
    seg.title = `${title}: ${tokens}`;
    return seg;
  }

  // Two bars on one scale, the whole conversation after this turn (total_tokens):
  //   [sinks | put back | evicted | window]  what the model still attends to, and what it no longer holds
  //   [cached | prefilled | reply]   this turn's prompt from the KV cache or computed now, then the reply
  // "put back" (retrieve only, usage.recalled_tokens): evicted tokens the store put back while the
  // reply was generated, listed with their text under the bar (usage.recalled).
  // `markable`: whether this turn, if past the window, can be called the first one (false when the
  // turn before it is unknown: that one may have been past already).
  function memoryBar(usage, markable = true) {
    const prompt = usage.prompt_tokens || 0;
    const completion = usage.completion_tokens || 0;
    const total = usage.total_tokens || prompt + completion;
    const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
    const evicted = usage.evicted_tokens || 0;
    const retrieve = usage.recalled_tokens !== undefined;  // the reply ran under the retrieve policy
    const recalled = Math.min(usage.recalled_tokens || 0, evicted);
    const held = Math.max(0, total - evicted);
    const sinks = hasSinks(state.memory) ? Math.min(state.memory.sinks, held) : 0;
    const cap = capacity(state.memory);
    // the reply's last token is sampled but not yet fed to the model (the next token would feed it
    // and evict one more): once memory is full it is the one token beyond what memory holds
    const pending = cap !== null ? Math.max(0, held - cap) : 0;
    const window = held - sinks - pending;

    const fig = document.createElement("figure");
    fig.className = "memory";
    Object.assign(fig.dataset, {sinks, window, pending, cached, evicted, prompt, total});
    if (retrieve) fig.dataset.recalled = recalled;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.append(segment("sink", sinks, total, "sink tokens (always kept)"),
               segment("recalled", recalled, total, "evicted tokens put back for this reply"),
               segment("evicted", evicted - recalled, total, "evicted tokens"),
               segment("window", window + pending, total, "window tokens (most recent)"));
    const turn = document.createElement("div");
    turn.className = "bar thin";
    turn.append(segment("cached", cached, total, "prompt tokens from the cached KV state"),
                segment("prefill", prompt - cached, total, "prompt tokens computed now"),
                segment("gen", completion, total, "tokens generated"));
    const legend = document.createElement("figcaption");
    legend.className = "legend";
    legend.textContent = `memory: ${sinks} sink + ${window} window tokens` + (cap ? ` (holds ${cap})` : "") +
      (pending ? ` + the reply's last token, not yet attended` : "") +
      ` · ${evicted} evicted so far` + (retrieve ? ` (${recalled} put back for this reply)` : "") +
      ` · ${cached} of ${prompt} prompt tokens from the cached KV state · ${completion} generated`;
    bar.setAttribute("aria-label", legend.textContent);
    fig.append(bar, turn, legend);
    if (retrieve && (usage.recalled || []).length) fig.append(recalledList(usage.recalled));
    if (cap !== null && prompt > cap && !state.pastMarked) {
      state.pastMarked = true;
      if (!markable) return fig;
      fig.dataset.past = "true";
      const mark = document.createElement("span");
      mark.className = "past";
      mark.textContent = `first turn past the window: its prompt (${prompt} tokens) no longer fits the ` +
        `${cap} the model holds; the oldest tokens leave memory and the conversation goes on`;
      fig.append(mark);
    }
    return fig;
  }

  // What retrieve put back: each run of evicted tokens, where it was in the conversation, its text.
  function recalledList(parts) {
    const list = document.createElement("ul");
    list.className = "recalled";
    list.setAttribute("aria-label", "evicted tokens put back for this reply");
    for (const p of parts) {
      const li = document.createElement("li");
      const where = document.createElement("span");
      where.className = "where";
      where.textContent = `put back: tokens ${p.start}–${p.start + p.tokens - 1}`;
      const text = document.createElement("q");
      text.textContent = p.text;
      li.append(where, " ", text);
      list.append(li);
    }
    return list;
  }

  // ---- messages --------------------------------------------------------------------------------
  function bubble(role, text) {
    const li = document.createElement("li");
    li.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "you" : role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    $("messages").append(li);
    toBottom();
    return li;
  }

  // An alert with the error's own words, and a Retry button when `retry` is given.
  function errorBox(err, retry) {
    const box = document.createElement("div");
    box.className = "error";
    box.setAttribute("role", "alert");
    box.textContent = err.message;
    if (retry) {
      const again = document.createElement("button");
      again.type = "button";
      again.className = "retry";
      again.textContent = "Retry";
      again.addEventListener("click", retry);
      box.append(again);
    }
    return box;
  }

  function showError(li, err, retry) {
    li.append(errorBox(err, retry));
    toBottom();
  }

  // the newest message sits just above the composer (which sticks to the bottom of the window)
  function toBottom() { window.scrollTo(0, document.documentElement.scrollHeight); }

  function status(text) { $("status").textContent = text || ""; }

  // ---- conversations ---------------------------------------------------------------------------
  async function refreshList() {
    const note = $("conversations-note");
    let list;
    try {
      list = await api("GET", "v1/sessions");
    } catch (err) {
      note.hidden = false;
      note.textContent = err.message;
      return;
    }
    note.hidden = true;
    const ul = $("conversations");
    ul.replaceChildren();
    for (const s of list.data || []) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "conversation";
      b.dataset.id = s.id;
      b.textContent = s.title || s.id;
      if (s.id === state.session) b.setAttribute("aria-current", "true");
      const meta = document.createElement("span");
      meta.className = "meta";
      const when = s.last_used || s.updated || s.created;
      const turns = s.turns || 0;
      meta.textContent = `${turns} turn${turns === 1 ? "" : "s"}` + (when ? " · " + new Date(when * 1000).toLocaleString() : "");
      b.append(meta);
      b.addEventListener("click", () => openSession(s.id));
      li.append(b);
      ul.append(li);
    }
    if (!ul.children.length) { note.hidden = false; note.textContent = "No conversations yet."; }
  }

  function setSession(id, turns = 0) {
    state.session = id;
    state.turns = turns;
    state.pastMarked = false;
    history.replaceState(null, "", id ? "#session=" + encodeURIComponent(id) : location.pathname);
  }

  async function openSession(id) {
    if (state.busy) return;
    let data;
    try {
      data = await api("GET", `v1/sessions/${encodeURIComponent(id)}`);
    } catch (err) {
      status(err.message);
      if (err instanceof ApiError && err.status === 404) setSession(null);
      return;
    }
    setSession(id, data.turns || 0);
    $("messages").replaceChildren();
    // every turn's bar from its usage (one entry per assistant message; null for a turn the server
    // kept without it). A turn's prompt holds the whole history before it, so prompts only grow: a
    // turn is the first past the window when its prompt exceeds it and the previous turn's did not.
    const usages = data.usage || [];
    let turn = 0, unknown = 0, previousKnown = true;
    for (const m of data.messages || []) {
      const li = bubble(m.role, m.content);
      if (m.role !== "assistant") continue;
      const u = usages[turn++];
      if (u) li.append(memoryBar(u, previousKnown));
      else unknown++;
      previousKnown = Boolean(u);
    }
    if (!previousKnown) {
      // the last turn's prompt is unknown: if the conversation already holds more than the window,
      // that turn may have been the first past it, so the next one is not marked (none rather than a wrong one)
      const cap = capacity(state.memory);
      state.pastMarked = state.pastMarked || (cap !== null && (data.tokens || 0) > cap);
    }
    status(unknown ? `Resumed; no memory bar for ${unknown} earlier turn${unknown === 1 ? "" : "s"}: ` +
                     "the server kept no usage for them." : "");
    refreshList();
  }

  // ---- one turn --------------------------------------------------------------------------------
  async function turn(content) {
    state.busy = true;
    $("send").disabled = true;
    const kept = state.turns;
    const user = bubble("user", content);
    const reply = bubble("assistant", "");
    reply.classList.add("streaming");
    const text = reply.querySelector(".text");
    try {
      if (!state.session) setSession((await api("POST", "v1/sessions", {})).id);
      const usage = await streamTurn(state.session, content, (t) => { text.textContent += t; });
      reply.classList.remove("streaming");
      if (usage) reply.append(memoryBar(usage));
      toBottom();
      status("");
      refreshList();
    } catch (err) {
      reply.classList.remove("streaming");
      user.classList.add("failed");
      reply.classList.add("failed");
      showError(reply, err, () => retryTurn(content, user, reply, kept));
    } finally {
      state.busy = false;
      $("send").disabled = false;
    }
  }

  // A turn that failed may still have been kept (the stream dropped after the server recorded it):
  // read the conversation back first, and send again only if it has no more turns than before.
  async function retryTurn(content, user, reply, kept) {
    if (state.busy) return;
    user.remove();
    reply.remove();
    if (state.session) {
      let data = null;
      try { data = await api("GET", `v1/sessions/${encodeURIComponent(state.session)}`); } catch (_) { /* send */ }
      if (data && data.turns > kept) return openSession(state.session);
    }
    return turn(content);
  }

  // ---- the API key -----------------------------------------------------------------------------
  function showKeyPanel() {
    $("key-panel").hidden = false;
    $("api-key").value = state.key;
  }

  // ---- start -----------------------------------------------------------------------------------
  async function start() {
    status("Connecting...");
    try {
      const models = await api("GET", "v1/models");
      const model = (models.data || [])[0] || {};
      state.model = model.id || null;
      state.memory = model.memory || null;
      state.template = model.chat_template || null;
    } catch (err) {
      $("status").replaceChildren(errorBox(err, err instanceof NetworkError ? start : null));
      if (err instanceof ApiError && err.status === 401) $("api-key").focus();
      return;
    }
    $("model-name").textContent = state.model ? "· " + state.model : "";
    const m = state.memory;
    $("memory-policy").textContent = !m ? "" : m.policy === "sink"
      ? `Memory: the first ${m.sinks} tokens (sinks) + the ${m.window} most recent; a conversation of any length goes on.`
      : m.policy === "retrieve"
      ? `Memory: the first ${m.sinks} tokens (sinks) + the ${m.window} most recent, and up to ${m.budget} evicted ` +
        `tokens put back ${m.every > 1 ? `(chosen every ${m.every} tokens)` : "before each token"}, the most ` +
        `relevant of the last ${m.store} evicted (kept per conversation).`
      : m.policy === "recompute" ? `Memory: the ${m.window} most recent tokens, recomputed when the window is full.`
      : `Memory: the whole context (${m.window} tokens); nothing is evicted.`;
    // a model that was never chat-trained is served as text (`ctxmem serve --chat-template text`): say so,
    // since what it answers reads as a continuation, not as a reply
    $("chat-template").hidden = state.template !== "text";
    $("chat-template").textContent = state.template !== "text" ? "" :
      "This model is not chat-trained: the conversation is one running text. Each message is added to it " +
      "after a space and the model continues it; a question it can answer is one phrased as the text it learned.";
    status("");
    await refreshList();
    const wanted = new URLSearchParams(location.hash.slice(1)).get("session");
    if (wanted) await openSession(wanted);
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (state.key) showKeyPanel();
    $("key-panel").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.key = $("api-key").value.trim();
      if (state.key) localStorage.setItem(KEY_STORE, state.key); else localStorage.removeItem(KEY_STORE);
      start();
    });
    $("new-chat").addEventListener("click", () => {
      if (state.busy) return;
      setSession(null);
      $("messages").replaceChildren();
      status("");
      refreshList();
      $("input").focus();
    });
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const content = $("input").value;
      if (state.busy || !content.trim()) return;
      $("input").value = "";
      turn(content);
    });
    $("input").addEventListener("keydown", (ev) => {  // Enter sends, Shift+Enter breaks the line
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer").requestSubmit();
      }
    });
    start();
  });
})();
