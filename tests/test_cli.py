"""The `conserve chat` command: argument checking, and one real answer from the bundled model."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers.cli import main


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


@pytest.mark.parametrize("bad_args", [
    ["--dtype", "float16"],
    ["--max-tokens", "0"],
    ["--max-tokens", "ten"],
    ["--temperature", "-1"],
    ["--temperature", "nan"],
    ["--top-p", "0"],
    ["--top-p", "1.5"],
    ["--seed", "x"],
    ["--model", "/no/such/model.gguf"],
])
def test_chat_rejects_bad_arguments_with_exit_code_2(bad_args, capsys):
    assert _exit_code(["chat", "hello", *bad_args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error" in captured.err


def test_chat_rejects_an_empty_prompt(capsys):
    assert _exit_code(["chat", "   "]) == 2
    assert "must not be empty" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "chat" in capsys.readouterr().err


def test_argument_errors_do_not_import_torch():
    # The CLI must stay quick to fail; torch is only imported once a model is actually loaded.
    code = ("import sys\nfrom workers.cli import main\n"
            "try:\n    main(['chat', 'hi', '--dtype', 'float16'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'workers.cli imported torch eagerly'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def _conserve_command() -> list[str]:
    # Prefer the installed console script, which also checks the entry point in pyproject.toml.
    script = os.path.join(os.path.dirname(sys.executable), "conserve")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "workers.cli"]


def test_chat_prints_only_the_answer():
    question = "What is the capital of France?"
    result = subprocess.run([*_conserve_command(), "chat", question, "--max-tokens", "16", "--device", "cpu"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout

    # "Only the answer": stdout is exactly what the engine generates for that chat, greedy, and a newline.
    from engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(model=None, dtype="float32", device="cpu"))  # the CLI's default dtype
    try:
        [expected] = engine.generate([[{"role": "user", "content": question}]],
                                     SamplingParams(max_tokens=16, temperature=0.0))
    finally:
        engine.shutdown()
    assert result.stdout == expected.text + "\n"
