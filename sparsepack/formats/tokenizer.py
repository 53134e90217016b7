"""Tokenizer loading for packs and model directories (local files only, no remote code)."""

from __future__ import annotations

from pathlib import Path

from sparsepack.formats.errors import MissingFileError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip


def load_tokenizer(path: str | Path):
    """The tokenizer stored in a pack / model directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES[:6]):
        raise MissingFileError("no tokenizer files (tokenizer.json / tokenizer_config.json)", path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation config files from ``src`` into ``dst``; returns the names copied."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
