"""The tokenizer and generation files that make a converted folder usable on its own.

Training outputs carry no tokenizer, yet ``AutoTokenizer.from_pretrained`` and inference servers
look for one beside the weights. These files are copied byte for byte from the folder the user
names (usually the original Hugging Face model), each atomically after the shards;
``config.json`` is never among them, since the run writes its own from the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from ms2hf.errors import Ms2hfError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def find_tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files present in ``folder``; checked before a long run, not after it."""
    if not folder.is_dir():
        raise Ms2hfError(f"--tokenizer-dir {folder}: not a folder")
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not found:
        raise Ms2hfError(
            f"--tokenizer-dir {folder}: holds none of {', '.join(TOKENIZER_FILES)}; "
            "expected the original Hugging Face model's folder"
        )
    return found


VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""Any one of these is a tokenizer ``AutoTokenizer`` can load."""
GENERATION_CONFIG = "generation_config.json"


def same_file(a: Path, b: Path) -> bool:
    """Whether ``b`` exists and is ``a`` (by any path): copying it would copy it onto itself."""
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def usability_notes(folder: Path) -> list[str]:
    """What a model repository made of ``folder`` still lacks for people to use it."""
    notes = []
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        notes.append(
            f"{folder} has no tokenizer ({', '.join(VOCABULARY_FILES)}): AutoTokenizer, vLLM "
            "and chat front ends need one; pass --tokenizer-dir with the original model's folder"
        )
    if not (folder / GENERATION_CONFIG).is_file():
        notes.append(
            f"{folder} has no {GENERATION_CONFIG}: generate() then uses transformers' defaults "
            "(no stop at the chat's end token, no sampling settings); pass --tokenizer-dir with "
            "a folder holding it (the original model's)"
        )
    return notes
