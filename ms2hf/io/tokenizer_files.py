"""The tokenizer and generation files that make a converted folder usable on its own.

Training outputs carry no tokenizer, yet ``AutoTokenizer.from_pretrained`` and inference servers
look for one beside the weights. These files are copied byte for byte from the folder the user
names (usually the original Hugging Face model), each atomically after the shards;
``config.json`` is never among them, since the run writes its own from the weights.
"""

from __future__ import annotations

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
