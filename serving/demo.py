"""`ctxmem demo`: the whole pipeline, end to end, on embedded defaults.

    data prepare (chatterbot corpus, offline) -> train (DeepSpeed ZeRO, MLflow on SQLite)
    -> export (ONNX + verification) -> registry (challenger, its memory evaluation, -> champion, gated)
    -> serve (Ray Serve on 127.0.0.1, ONNX Runtime) -> a multi-turn chat through the OpenAI client
    -> memory past the window: a fact given in turn 1 asked for at turn 20, under `retrieve` and `sink`
       (the repository's recall-trained model, served in process; serving/demo_memory.py)
    -> the chat page's URL (`--keep-serving`: the server stays up until Ctrl-C)

Every stage runs as its own `ctxmem` command, exactly as a user would type it; the commands are
printed so they can be re-run one by one.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ctxmem.net import free_port
from ctxmem.proc import default_sigint

REPO_INFRA = Path(__file__).resolve().parents[1] / "infra"
MODEL_NAME = "ctxmem-demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline end to end on embedded defaults",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, exports and the MLflow store go")
    p.add_argument("--config", default=None, help="training config (default: infra/train-cpu-demo.yaml)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps (fewer = faster, worse text)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (ZeRO ranks) on this machine")
    p.add_argument("--no-serve", action="store_true", help="stop after the registry (no Ray Serve)")
    p.add_argument("--port", type=int, default=0, help="HTTP port for the server (0 = a free one)")
    p.add_argument("--keep-serving", action="store_true",
                   help="after the chat, keep the server (and its chat page) up until Ctrl-C")
    p.add_argument("--fresh", action="store_true", help="start over: train again even if a final checkpoint exists")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory segment (a fact recalled 20 turns later under retrieve, beside sink)")
    p.set_defaults(func=cmd_demo)


def _say(msg: str) -> None:
    print(f"\n\033[1m[demo] {msg}\033[0m", file=sys.stderr, flush=True)


def _ctxmem(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "ctxmem", *args]
    print("  $ ctxmem " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise DemoError(f"`ctxmem {args[0]}` failed with exit code {result.returncode}; its messages are above. "
                        "Fix the cause and re-run `ctxmem demo` (finished stages are reused).")


class DemoError(RuntimeError):
    pass


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"`ctxmem serve` exited with code {proc.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise DemoError(f"the server at {url} was not healthy after {timeout:.0f}s")


def _chat(base_url: str) -> list[dict]:
    import logging

    from openai import OpenAI

    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=2, timeout=120)
    turns = ["Hello! What is your name?", "Do you like science?", "Tell me something about computers.",
             "What did I ask you first?"]
    history, report = [], []
    for i, text in enumerate(turns, 1):
        history.append({"role": "user", "content": text})
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=history, max_tokens=48, temperature=0.7, top_p=0.9, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Session-Id": "demo-conversation"})
        reply, usage = "", None
        print(f"  user: {text}\n  assistant: ", end="", file=sys.stderr, flush=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply += chunk.choices[0].delta.content
                print(chunk.choices[0].delta.content, end="", file=sys.stderr, flush=True)
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        print(file=sys.stderr)
        history.append({"role": "assistant", "content": reply})
        report.append({"turn": i, "user": text, "assistant": reply, "usage": usage})
    print("\n  turn  prompt_tokens  cached (KV reuse)  completion  evicted by the window", file=sys.stderr)
    for r in report:
        u = r["usage"] or {}
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        print(f"  {r['turn']:4d}  {u.get('prompt_tokens', 0):13d}  {cached:16d}  {u.get('completion_tokens', 0):10d}"
              f"  {u.get('evicted_tokens', 0):21d}", file=sys.stderr)
    return report


def cmd_demo(args) -> int:
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # single machine: Ray stays on 127.0.0.1
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ctxmem" / "torch_extensions"))
    started = time.monotonic()
    data, train_out, export = work / "data", work / "train", work / "export"
    final = train_out / "final"

    _say(f"1/5 data: the embedded chatterbot corpus (installed with the package, no network) -> {data}")
    if (data / "meta.json").exists() and not args.fresh:
        print(f"  reusing {data}", file=sys.stderr)
    else:
        _ctxmem("data", "prepare", "--corpus", "chatterbot", "--tokenizer", "byte", "--out", str(data), env=env)

    _say(f"2/5 train: DeepSpeed ZeRO on {'GPU' if _has_cuda() else 'CPU (gloo)'}, tracked in {env['MLFLOW_TRACKING_URI']}")
    config = args.config or str(REPO_INFRA / "train-cpu-demo.yaml")
    if (final / "model.safetensors").exists() and not args.fresh:
        print(f"  reusing {final} (pass --fresh to train again)", file=sys.stderr)
    else:
        overrides = [f"data.path={data}", f"out={train_out}"] + ([f"steps={args.steps}"] if args.steps else [])
        _ctxmem("train", "--config", config, *overrides, "--overwrite", *(["--nproc", str(args.nproc)] if args.nproc > 1 else []),
                env=env)

    _say("3/5 export: ONNX graph with the KV cache, verified against PyTorch (names, shapes, values, greedy tokens), "
         "served under the sink policy so conversations outlive the window")
    _ctxmem("export", "--model", str(final), "--out", str(export), "--policy", "sink", "--sinks", "4", env=env)

    _say(f"4/5 registry: register {MODEL_NAME} as challenger, measure its memory past the window (the table: "
         "perplexity per policy far past the window, recall by distance), then promote it to champion through "
         "the gate")
    _ctxmem("registry", "register", "--export", str(export), "--name", MODEL_NAME, "--alias", "challenger", env=env)
    # a short memory evaluation on the validation split (a stream of 20 windows; ~seconds): the gate reads it
    _ctxmem("registry", "evaluate-memory", "--name", MODEL_NAME, "--from-alias", "challenger", "--data", str(data),
            "--window", "64", "--length", "1280", "--trials", "8", env=env)
    _ctxmem("registry", "promote", "--name", MODEL_NAME, "--from-alias", "challenger", "--alias", "champion", env=env)
    _ctxmem("registry", "list", "--name", MODEL_NAME, env=env)

    report: dict = {"workdir": str(work), "checkpoint": str(final), "export": str(export),
                    "tracking_uri": env["MLFLOW_TRACKING_URI"], "model_uri": f"models:/{MODEL_NAME}@champion"}
    if not args.no_serve:
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        _say(f"5/5 serve: Ray Serve + ONNX Runtime from models:/{MODEL_NAME}@champion on {url}")
        cmd = [sys.executable, "-m", "ctxmem", "serve", "--model", f"models:/{MODEL_NAME}@champion",
               "--host", "127.0.0.1", "--port", str(port), "--model-name", MODEL_NAME,
               "--session-store", f"sqlite:///{work / 'sessions.db'}"]
        print("  $ ctxmem " + " ".join(shlex.quote(a) for a in cmd[3:]), file=sys.stderr)
        # its own session: Ctrl-C in this terminal reaches the demo, which then stops the server itself
        # with a SIGINT it must not ignore (default_sigint: a demo started with `&` would pass it on ignored)
        server = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=default_sigint)
        try:
            _wait_healthy(url, server)
            report["chat"] = _chat(url)
            if not args.no_memory:
                _say("memory past the window: a fact given in turn 1, asked for at turn 20 - the retrieve policy "
                     "(sink + a bounded store of evicted KV, its best blocks put back) beside sink, on the "
                     "recall-trained small model (the demo's own model is too small to recall)")
                report["memory"] = _memory_segment(work / "recall-export", args.fresh, env)
            report["chat_page"] = url + "/"
            _finish(report, work, export, env, started)
            if args.keep_serving:
                print(f"chat page: {url}/  (serving until Ctrl-C)", file=sys.stderr, flush=True)
                _keep_serving(server)
            else:
                print(f"chat page: {url}/ (up while the demo ran; `ctxmem demo --keep-serving` keeps it up, as does "
                      f"`ctxmem serve --model models:/{MODEL_NAME}@champion`)", file=sys.stderr, flush=True)
        finally:
            _stop(server)
    else:
        _finish(report, work, export, env, started)
    return 0


def _memory_segment(export: Path, fresh: bool, env: dict) -> dict:
    """The recall-trained model exported (once; reused like the other stages), then the segment."""
    from .demo_memory import MEMORY, RECALL_MODEL, run_memory_demo

    if not (RECALL_MODEL / "model.safetensors").exists():
        print(f"  skipped: the recall-trained model is not at {RECALL_MODEL} (it ships in the repository's bench/)",
              file=sys.stderr)
        return {"skipped": f"no model at {RECALL_MODEL}"}
    if (export / "model.onnx").exists() and not fresh:
        print(f"  reusing {export}", file=sys.stderr)
    else:
        # the export carries the segment's policy (its runtime config), as `ctxmem serve` would read it
        flags = [a for k, v in MEMORY.items() for a in (f"--{k}", str(v))]
        _ctxmem("export", "--model", str(RECALL_MODEL), "--out", str(export), *flags, env=env)
    try:
        return run_memory_demo(_say, export)
    except Exception as err:  # noqa: BLE001 - say which stage failed, in words, as for the other stages
        raise DemoError(f"the memory segment failed ({type(err).__name__}: {err}); the server's messages are "
                        f"above. `ctxmem demo --no-memory` skips it.") from err


def _finish(report: dict, work: Path, export: Path, env: dict, started: float) -> None:
    report["seconds"] = round(time.monotonic() - started, 1)
    (work / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _say(f"done in {report['seconds']}s; report: {work / 'demo_report.json'}")
    print(f"""
next steps:
  .venv/bin/ctxmem generate --model {export} --backend onnx --chat --prompt "Hi there"
  .venv/bin/ctxmem serve --model models:/{MODEL_NAME}@champion       # then point any OpenAI client at /v1
  .venv/bin/mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}   # runs, metrics, loss curve, model versions
""", file=sys.stderr)


def _keep_serving(server: subprocess.Popen) -> None:
    """Block until Ctrl-C (or SIGTERM), or until the server exits on its own (an error: say so)."""
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop is a Ctrl-C too
    try:
        code = server.wait()
    except KeyboardInterrupt:
        _say("stopping the server")
        return
    raise DemoError(f"`ctxmem serve` exited with code {code} while the demo kept it serving; its messages are above")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
