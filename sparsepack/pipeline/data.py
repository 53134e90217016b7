"""Text sources shared by every pipeline stage: calibration, training and evaluation.

A SOURCE string names where the text comes from:

- ``path/to/file.txt`` -- one text file, cut into documents of roughly 4000 characters at blank lines (the
  unit of the split; the token stream keeps the file's text contiguous, see below);
- ``path/to/dir`` -- every file under it, recursively, sorted by relative path; hidden files and folders are
  skipped, and so (with a warning) is a binary file;
- ``path/to/data.jsonl`` -- one document per line; a record holds ``text``, or ``prompt`` + ``completion``;
- ``stdlib:pydoc`` -- the Python documentation topics that ship with every Python (``pydoc_data.topics``).

Any of these may end in ``@train`` or ``@eval`` to pick a deterministic split; without a suffix the source
is used whole. Split rule (also returned by :func:`describe_split`): a document goes to ``eval`` when
``int(sha1(id)[:8], 16) % 10 == 0`` and to ``train`` otherwise. If that leaves ``eval`` empty, the document
with the smallest hash moves to ``eval``; if it leaves ``train`` empty, asking for a split is an error.
Document ids use paths relative to the source (``notes.txt#3``, ``sub/a.jsonl:12``, ``pydoc:for``), so the
split does not depend on where the data lives, on the machine or on the run.

Token layout: :func:`token_stream` concatenates documents into one ``[T]`` stream joined by the tokenizer's
EOS; windows are ``[n, seqlen]`` int64 rows cut from it. EOS goes only between real documents (jsonl records,
separate files, pydoc topics, or chunks of one file that the split left apart): chunks that were adjacent in a
file are joined by the file's own text between them and tokenized as one string, so the windows of a whole file
are those of the tokenized file, as GPTQ's and lm-eval's whole-stream perplexity cut them.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "eval")
CHUNK_CHARS = 4000  # target document size when cutting text files; gives a split enough granularity
_BINARY_PROBE = 8192  # bytes checked for a NUL, as git and grep do
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
IGNORE_INDEX = -100  # label value torch's cross-entropy skips


class DataError(ValueError):
    """A source cannot be read or does not hold enough usable text; the message names the source."""


class NotTextError(DataError):
    """A file is binary or not UTF-8; inside a directory such a file is skipped instead of failing."""


@dataclass(frozen=True)
class Document:
    """One unit of text; the split assigns whole documents.

    Attributes:
        id: stable name, relative to the source (see the module docstring); the split hashes it.
        text: the text, or the completion of a prompt/completion record.
        prompt: the prompt of a prompt/completion record, else None.
        follows: id of the chunk of the same file that this chunk directly continues, else None.
        sep: the file's text between that chunk and this one (whitespace); joins the two instead of EOS.
    """

    id: str
    text: str
    prompt: str | None = None
    follows: str | None = None
    sep: str = ""

    @property
    def full_text(self) -> str:
        """Prompt followed by text: what a language model reads."""
        return (self.prompt or "") + self.text


def describe_split() -> str:
    """The split rule in one paragraph, for CLI help."""
    return (
        "SOURCE@train / SOURCE@eval select a deterministic split of the source's documents: a document "
        "goes to eval when int(sha1(id)[:8], 16) % 10 == 0, else to train (about 10% eval). If eval would "
        "be empty, the document with the smallest hash goes to eval; if train would be empty, that is an "
        "error. "
        "Ids are relative to the source (file#chunk, file:line, pydoc:topic), so the split is the same on "
        "every machine. A plain SOURCE uses all documents."
    )


# ---------------------------------------------------------------- reading


def _chunk_spans(text: str, target: int = CHUNK_CHARS) -> list[tuple[int, int]]:
    """Cut text at blank lines into pieces of at least ``target`` characters (the last may be shorter).

    A stretch with no blank line longer than twice the target is cut again at single newlines, so a file
    without paragraphs still yields several documents.

    Returns:
        ``(start, end)`` offsets of each piece with its surrounding whitespace left out, in text order; the
        text between two consecutive pieces is whitespace only.
    """
    pieces, start = [], 0
    for m in _BLANK_LINE.finditer(text):
        if m.end() - start >= target:
            pieces.append((start, m.end()))
            start = m.end()
    pieces.append((start, len(text)))
    out = []
    for s, e in pieces:
        if e - s > 2 * target and "\n" in text[s:e].strip():
            out.extend(_cut_at_newlines(text, s, e, target))
        else:
            out.append((s, e))
    return [span for s, e in out if (span := _strip_span(text, s, e))]


def _cut_at_newlines(text: str, start: int, end: int, target: int) -> list[tuple[int, int]]:
    """``text[start:end]`` cut at the first line end after each ``target`` characters, as offsets."""
    spans, size = [], 0
    for line in text[start:end].splitlines(keepends=True):  # keepends: the lines add up to the piece exactly
        size += len(line)
        if size >= target:
            spans.append((start, start + size))
            start, size = start + size, 0
    return spans + [(start, start + size)] if size else spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """``(start, end)`` narrowed to leave out surrounding whitespace, as ``str.strip`` does; None if all is."""
    piece = text[start:end]
    stripped = piece.strip()
    if not stripped:
        return None
    start += len(piece) - len(piece.lstrip())
    return start, start + len(stripped)


MAX_LINE_CHARS = 10_000_000  # per line of a text or JSONL file


def _read_text(path: Path, source: str) -> str:
    """Decode a file as UTF-8; DataError when it looks binary (a NUL early on, or invalid UTF-8)."""
    if not path.is_file():  # a FIFO would block forever, /dev/zero would fill memory
        raise DataError(f"{source}: {path} is not a regular file")
    raw = path.read_bytes()
    if b"\x00" in raw[:_BINARY_PROBE]:
        raise NotTextError(f"{source}: {path} is binary or not UTF-8 (NUL byte in the first 8 KiB)")
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop a byte-order mark some editors write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise NotTextError(f"{source}: {path} is binary or not UTF-8 ({e.reason} on line {line})") from e
    start = 0
    for lineno, end in enumerate(_line_ends(text), start=1):
        if end - start > MAX_LINE_CHARS:  # the tokenizer aborts the process on such a line, with no message
            raise DataError(f"{source}: {path} line {lineno} is {end - start:,} characters long (at most "
                            f"{MAX_LINE_CHARS:,}); break it into lines or records")  # fmt: skip
        start = end + 1
    return text


def _line_ends(text: str) -> Iterator[int]:
    """Offsets of every ``\\n`` in ``text``, then its length (without copying the lines)."""
    pos = text.find("\n")
    while pos != -1:
        yield pos
        pos = text.find("\n", pos + 1)
    yield len(text)


def _read_jsonl(path: Path, rel: str, source: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path, source).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}: {path} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # a number over the int digit limit, nesting too deep
            raise DataError(f"{where}: malformed JSON ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in ("text", "prompt", "completion"):
            try:
                if isinstance(rec.get(key), str):
                    rec[key].encode("utf-8")  # a lone surrogate (\ud800) is valid JSON but no text a tokenizer takes
            except UnicodeEncodeError:
                raise DataError(f"{where}: '{key}' holds a lone surrogate escape, which is not text") from None
        if isinstance(rec.get("text"), str):
            docs.append(Document(f"{rel}:{lineno}", rec["text"]))
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            docs.append(Document(f"{rel}:{lineno}", rec["completion"], prompt=rec["prompt"]))
        else:
            raise DataError(
                f"{where}: a record needs a string 'text', or 'prompt' and 'completion'; "
                f"got keys {sorted(rec)}"
            )
    return docs


def _read_file(path: Path, rel: str, source: str) -> list[Document]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, rel, source)
    text = _read_text(path, source)
    docs, prev_end = [], 0
    for i, (start, end) in enumerate(_chunk_spans(text)):
        follows = f"{rel}#{i - 1}" if i else None
        docs.append(Document(f"{rel}#{i}", text[start:end], follows=follows, sep=text[prev_end:start] if i else ""))
        prev_end = end
    return docs


def _read_directory(root: Path, source: str) -> list[Document]:
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    docs = []
    for rel in sorted(files):
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # .git, .DS_Store, editor swap files: never data
        try:
            docs.extend(_read_file(files[rel], rel, source))
        except NotTextError as e:  # other errors (a broken jsonl record) are mistakes to fix, not skip
            warnings.warn(f"skipping {e}", stacklevel=2)
    return docs


def _pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics  # stdlib; imported lazily as it is 0.5 MB of text

    return [Document(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


# Built-in corpora: one registration per name.
STDLIB_SOURCES: dict[str, Callable[[], list[Document]]] = {"pydoc": _pydoc_topics}


def parse_source(source: str) -> tuple[str, str | None]:
    """Split ``SOURCE@split`` into (source, split); an existing path containing '@' is taken as is."""
    if "@" not in source or Path(source).expanduser().exists():
        return source, None
    base, split = source.rsplit("@", 1)
    if split not in SPLITS:
        raise DataError(f"{source}: unknown split suffix '@{split}' (use @train or @eval)")
    return base, split


def source_path(source: str | None) -> Path | None:
    """The file or directory a SOURCE reads, or None for a built-in corpus (what outputs must not overlap)."""
    if not source:
        return None
    try:
        base, _split = parse_source(source)
    except DataError:
        return None  # reported with its context when the source is read
    return None if base.startswith("stdlib:") else Path(base).expanduser()


def _hash(doc: Document) -> int:
    return int(hashlib.sha1(doc.id.encode("utf-8")).hexdigest()[:8], 16)


def split_documents(docs: Sequence[Document], split: str, source: str = "<documents>") -> list[Document]:
    """Select the ``train`` or ``eval`` documents by the rule in :func:`describe_split`, keeping order."""
    if split not in SPLITS:
        raise DataError(f"{source}: unknown split '{split}' (use train or eval)")
    hashes = [_hash(d) for d in docs]
    is_eval = [h % 10 == 0 for h in hashes]
    if docs and not any(is_eval):
        is_eval[min(range(len(docs)), key=lambda i: (hashes[i], docs[i].id))] = True
    if all(is_eval):
        raise DataError(
            f"{source}: only {len(docs)} document(s), too few to split into train and eval; "
            "use the source without @train/@eval or add text"
        )
    return [d for d, e in zip(docs, is_eval, strict=True) if e == (split == "eval")]


def load_documents(source: str) -> list[Document]:
    """Read a SOURCE (see the module docstring) into documents, applying an ``@train``/``@eval`` suffix.

    Raises:
        DataError: missing path, unknown ``stdlib:`` name or split, binary file, malformed jsonl, or no text.
    """
    base, split = parse_source(source)
    if base.startswith("stdlib:"):
        name = base.removeprefix("stdlib:")
        if name not in STDLIB_SOURCES:
            known = ", ".join(f"stdlib:{k}" for k in STDLIB_SOURCES)
            raise DataError(f"{source}: unknown built-in source '{name}' (known: {known})")
        docs = STDLIB_SOURCES[name]()
    else:
        path = Path(base).expanduser()
        if not path.exists():
            raise DataError(f"{source}: no such file or directory")
        docs = _read_directory(path, source) if path.is_dir() else _read_file(path, path.name, source)
    if not any(d.full_text.strip() for d in docs):
        raise DataError(f"{source}: empty source (no text found)")
    return split_documents(docs, split, source) if split else docs


# ---------------------------------------------------------------- tokens


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: a whole document is longer than model_max_length on purpose; windows come later.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def _contiguous_texts(docs: Sequence[Document]) -> list[str]:
    """The documents' texts, each run of chunks that were adjacent in one file rejoined by the file's own text."""
    runs: list[list[str]] = []
    prev: Document | None = None
    for doc in docs:
        if prev is not None and doc.follows == prev.id:
            runs[-1] += [doc.sep, doc.full_text]
        else:
            runs.append([doc.full_text])
        prev = doc
    return ["".join(run) for run in runs]


def token_stream(tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """Tokenize documents (no special tokens) and join them with EOS when the tokenizer has one.

    Chunks that were adjacent in one file are tokenized as one string (see the module docstring): a tokenizer
    may merge or prefix tokens differently at a chunk boundary, and an EOS there is not in the text.

    Returns:
        int64 tensor ``[T]``.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for i, doc_ids in enumerate(_encode(tokenizer, _contiguous_texts(docs))):
        ids.extend((eos if i else []) + doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    tokenizer, source: str, seqlen: int, n_windows: int | None = None, *, min_windows: int = 1, spread: bool = False
) -> torch.Tensor:
    """``n_windows`` non-overlapping windows of a source's token stream (incomplete tail dropped).

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: a SOURCE string (see the module docstring).
        seqlen: tokens per window.
        n_windows: how many windows; None takes all. Fewer available -> all of them and a warning.
        min_windows: fewer full windows than this is an error.
        spread: take the windows evenly spaced over the whole stream instead of the first ``n_windows``. The
            start of a file is often its least typical text (a manual's license and table of contents).

    Returns:
        int64 tensor ``[n, seqlen]``, windows in stream order.
    """
    if seqlen < 1 or (n_windows is not None and n_windows < 1):
        raise ValueError(f"seqlen ({seqlen}) and n_windows ({n_windows}) must be positive")
    stream = token_stream(tokenizer, load_documents(source))
    available = stream.numel() // seqlen
    if available < max(min_windows, 1):
        raise DataError(
            f"{source}: {stream.numel()} tokens give {available} window(s) of seqlen {seqlen}; "
            f"need at least {max(min_windows, 1)}"
        )
    n = available if n_windows is None else min(n_windows, available)
    if n_windows is not None and n_windows > available:
        warnings.warn(
            f"{source}: asked for {n_windows} windows of {seqlen} tokens, using the {n} available",
            stacklevel=2,
        )
    all_windows = stream[: available * seqlen].view(available, seqlen)  # [available, seqlen]
    if not spread:
        return all_windows[:n]
    return all_windows[torch.arange(n) * available // n]  # window i*available/n, i < n: distinct, in order


def sample_windows(tokenizer, source: str, seqlen: int, n: int, seed: int) -> torch.Tensor:
    """``n`` windows at random offsets of the token stream, as GPTQ calibration draws them.

    Returns:
        int64 tensor ``[n, seqlen]``; windows may overlap. Same seed, source and tokenizer -> same windows.
    """
    stream = token_stream(tokenizer, load_documents(source))
    if stream.numel() < seqlen + 1:
        raise DataError(
            f"{source}: {stream.numel()} tokens, need more than seqlen {seqlen} to sample windows"
        )
    distinct = stream.numel() // seqlen
    if distinct < n:
        warnings.warn(
            f"{source}: {stream.numel()} tokens hold only {distinct} non-overlapping window(s) of {seqlen} tokens; "
            f"the {n} windows drawn will overlap",
            stacklevel=2,
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=gen)  # [n]
    return stream[starts[:, None] + torch.arange(seqlen)]  # [n, seqlen]


def completion_examples(tokenizer, source: str, seqlen: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training examples with labels; the loss skips prompt tokens (label -100).

    A prompt/completion record gives one example: prompt tokens, completion tokens and EOS, truncated to
    ``seqlen``. Prompt and completion are tokenized separately so the masked boundary is exact (a joint
    tokenization could merge tokens across it). Plain text documents are streamed and cut into full
    windows whose labels are the inputs. A record whose prompt fills the whole window is dropped, with a
    warning, since it has nothing to learn from.

    Returns:
        list of (input_ids ``[L]``, labels ``[L]``) int64 pairs, ``L <= seqlen``; padding is left to the
        collator.
    """
    docs = load_documents(source)
    prompted = [d for d in docs if d.prompt is not None]
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = _encode(tokenizer, [d.prompt for d in prompted])
    completions = _encode(tokenizer, [d.text for d in prompted])
    dropped = 0
    for p, c in zip(prompts, completions, strict=True):
        ids = (p + c + eos)[:seqlen]
        labels = ([IGNORE_INDEX] * len(p) + c + eos)[:seqlen]
        if all(t == IGNORE_INDEX for t in labels):
            dropped += 1
            continue
        examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    if dropped:
        warnings.warn(
            f"{source}: dropped {dropped} record(s) whose prompt fills all {seqlen} tokens", stacklevel=2
        )
    stream = token_stream(tokenizer, [d for d in docs if d.prompt is None])
    n = stream.numel() // seqlen
    examples.extend((w, w.clone()) for w in stream[: n * seqlen].view(n, seqlen))
    if not examples:
        raise DataError(f"{source}: no training example of up to {seqlen} tokens could be built")
    return examples
