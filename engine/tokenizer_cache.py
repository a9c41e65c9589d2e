"""Tokenizers converted from GGUF files, kept on disk so that the conversion runs once per file.

transformers builds a GGUF's tokenizer by parsing the whole file's metadata and converting the
vocabulary and merges: 5-9 s for SmolLM2's 49k tokens on 2 cores, paid by every worker start. The
converted tokenizer saved as tokenizer.json loads in well under a second."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from engine.cache_dir import cache_root

log = logging.getLogger(__name__)

# Part of every entry's key: bump it when what is saved changes.
_FORMAT = 1


def cached_gguf_tokenizer(path: Path, convert: Callable[[], Any]) -> Any:
    """The Hugging Face tokenizer of the GGUF file at path: from the cache when it holds one for this
    very file (same path, size and modification time, same transformers), else convert() written to it."""
    from transformers import AutoTokenizer, __version__ as transformers_version

    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers_version}|{_FORMAT}"
    root = cache_root() / "tokenizers"
    entry = root / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if (entry / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable tokenizer cache %s (%s); converting again", entry, exc)
    hf = convert()
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Written beside the entry and renamed into place, so a reader (another worker starting at the
        # same moment) never sees half a tokenizer.
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        hf.save_pretrained(str(staging))
        try:
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(staging, entry)
        except OSError:  # another process won the race: its entry is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        log.warning("could not cache the tokenizer of %s (%s)", path, exc)
    return hf
