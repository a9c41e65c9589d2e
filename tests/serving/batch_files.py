"""Batch input files for tests, and reading OpenAI output/error files back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stack import MODEL_NAME


def chat_line(custom_id: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello world"}],
                     "max_tokens": max_tokens, "ignore_eos": True} | body}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
