"""The `ctxmem` command line: help for every option, generate pipes, errors are one clear line.
Only the piping test starts the installed `ctxmem` script; the others call `main` in this process."""
import argparse
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxmem.cli import build_parser, main

CTXMEM = [str(Path(sys.executable).parent / "ctxmem")]


def subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner_name, inner in subcommands(sub):
                    yield f"{name} {inner_name}", inner


def test_every_option_of_every_command_has_help():
    commands = dict(subcommands(build_parser()))
    assert {"generate", "info", "import-hf", "export-hf", "data", "train", "export", "registry", "eval", "serve",
            "demo"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description or sub.format_usage(), name
        for action in sub._actions:
            if action.dest in ("help",) or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"`ctxmem {name}` option {action.option_strings or action.dest} has no help"


def test_generate_prints_only_the_continuation_on_stdout(tiny_checkpoint):
    run = subprocess.run(CTXMEM + ["generate", "--model", str(tiny_checkpoint), "--prompt", "Hello",
                                   "--max-new-tokens", "8", "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from ctxmem.generation import load_generator
    from ctxmem.sampling import GenerationConfig

    expected = load_generator(tiny_checkpoint).generate(["Hello"], GenerationConfig(max_new_tokens=8))[0].text
    assert run.stdout == expected + "\n"
    assert "generated" in run.stderr and "policy=full" in run.stderr


def test_generate_reads_the_prompt_from_stdin_and_slides_with_the_sink_policy(tiny_checkpoint, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ctxmem")
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 300))
    code = main(["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "200",
                 "--policy", "sink", "--window", "32", "--sinks", "4"])
    assert code == 0
    assert "policy=sink window=32 sinks=4 prompt_tokens=300" in caplog.text


def test_overlong_prompt_under_full_policy_is_one_clear_error_line(tiny_checkpoint, capsys):
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "y" * 500])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: prompt (500 tokens)")
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "does/not/exist", "--prompt", "x"], "is not a directory"),
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--policy", "sink", "--window", "500"], "must be between 1 and the model's context"),
])
def test_bad_generate_arguments_fail_with_a_message(tiny_checkpoint, capsys, argv, message):
    code = main([a.replace("{ckpt}", str(tiny_checkpoint)) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_info_lists_presets_and_describes_a_checkpoint(tiny_checkpoint, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gpt-124m" in out and "torch" in out
    assert main(["info", "--model", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert '"kind": "checkpoint"' in out and '"ByteTokenizer"' in out


@pytest.mark.parametrize("argv,message", [
    (["--backend", "torch", "--decode-session"], "--decode-session is an ONNX Runtime option"),
    (["--backend", "onnx", "--device", "cuda"], "--device cuda is for --backend torch"),
])
def test_options_of_the_other_backend_are_refused_naming_the_option(tiny_export, capsys, argv, message):
    code = main(["generate", "--model", str(tiny_export), "--prompt", "x", *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch has no CUDA")
def test_the_device_reaches_the_torch_backend(tiny_checkpoint, capsys):
    # --device used to be accepted and dropped: the model ran on the CPU whatever it said
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 1 and "--device cuda: torch sees no CUDA device here" in err


def test_the_decode_session_generates_the_same_text(small_export, capsys, caplog):
    # greedy, past a 4 + 28 sink window: the decode steps run on the second session, the text is the same
    caplog.set_level(logging.INFO, logger="ctxmem")
    argv = ["generate", "--model", str(small_export), "--backend", "onnx", "--prompt", "the cat " * 6,
            "--max-new-tokens", "48", "--policy", "sink", "--sinks", "4", "--window", "28"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--decode-session"]) == 0
    assert capsys.readouterr().out == plain and len(plain) > 1
    assert "has no effect" not in caplog.text


def test_the_decode_session_says_when_a_graph_has_no_decode_branch(tiny_export, capsys, caplog):
    # the tiny preset's head size (24) takes no GroupQueryAttention branch: one session, and a log line
    caplog.set_level(logging.INFO, logger="ctxmem")
    assert main(["generate", "--model", str(tiny_export), "--backend", "onnx", "--prompt", "x",
                 "--max-new-tokens", "2", "--decode-session"]) == 0
    assert "decode_session=True has no effect here" in caplog.text


def test_the_backend_follows_what_the_model_names(tiny_checkpoint, tiny_export, capsys, caplog):
    # an export folder used to be read as a checkpoint (--backend torch was the default): "config.json does
    # not exist"; now it runs on ONNX Runtime unless the backend is named
    caplog.set_level(logging.INFO, logger="ctxmem")
    argv = ["--prompt", "hello", "--max-new-tokens", "6"]
    assert main(["generate", "--model", str(tiny_export), *argv]) == 0
    assert "backend=onnx" in caplog.text
    chosen = capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_export), "--backend", "onnx", *argv]) == 0
    assert capsys.readouterr().out == chosen  # greedy: the same text as with the backend named
    caplog.clear()
    assert main(["generate", "--model", str(tiny_checkpoint), *argv]) == 0
    assert "backend=torch" in caplog.text
    assert main(["generate", "--model", str(tiny_export), "--backend", "torch", *argv]) == 1  # named: as asked
    assert "a ctxmem checkpoint needs config.json" in capsys.readouterr().err
