"""Corpora: documents from files, tokenized and packed into fixed-length windows.

Each window starts with an explicit BOS token; documents are joined by a separator token; a document
longer than a window continues in the next window (split, never truncated). Every token carries its
document index and its position inside that document, and a `valid` flag saying whether it should be
harvested: BOS, separators, padding, special tokens and chat-template headers are not (position 0 of
Llama-family models is an attention sink whose residual norm is ~100x the rest, and would swamp every
statistic).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aimri.errors import CorpusError

TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Document:
    text: str
    source: str = ""


def _read_file(path: Path, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield Document(path.read_text(encoding="utf-8", errors="replace"), source=path.name)
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(
                        f"{path}:{lineno} is not valid JSON ({err.msg}); one JSON object per line"
                    ) from err
                if not isinstance(row, dict) or text_field not in row:
                    raise CorpusError(f"{path}:{lineno} has no {text_field!r} field; pass --text-field NAME")
                yield Document(str(row[text_field]), source=str(row.get("source", path.name)))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise CorpusError(f"{path} has no {text_field!r} column (columns: {table.schema_arrow.names})")
        has_source = "source" in table.schema_arrow.names
        for batch in table.iter_batches(columns=[text_field, "source"] if has_source else [text_field]):
            texts = batch.column(0).to_pylist()
            sources = batch.column(1).to_pylist() if has_source else [path.name] * len(texts)
            for text, source in zip(texts, sources, strict=True):
                yield Document(str(text or ""), source=str(source))
    else:
        raise CorpusError(
            f"{path}: unsupported corpus file type {suffix!r}; use .txt, .jsonl, .parquet or a datasets dir"
        )


def _is_datasets_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _read_datasets_dir(path: Path, text_field: str) -> Iterator[Document]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for split in splits:
        if text_field not in split.column_names:
            raise CorpusError(f"{path} has no {text_field!r} column (columns: {split.column_names})")
        for row in split:
            yield Document(str(row[text_field]), source=str(row.get("source", path.name)))  # type: ignore[union-attr]


def _expand(paths: Sequence[Path]) -> list[Path | tuple[str, Path]]:
    out: list[Path | tuple[str, Path]] = []
    for path in paths:
        if not path.exists():
            raise CorpusError(f"corpus path {path} does not exist")
        if path.is_dir() and _is_datasets_dir(path):
            out.append(("datasets", path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            out += [p for p in files if p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl", ".parquet")]
        else:
            out.append(path)
    return out


@dataclass
class Corpus:
    """Documents from files (.txt, .jsonl, .parquet, HF `datasets` dirs) or from memory."""

    paths: list[Path] = field(default_factory=list)
    texts: list[Document] | None = None
    text_field: str = "text"

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], text_field: str = "text") -> Corpus:
        return cls(paths=[Path(p) for p in paths], text_field=text_field)

    @classmethod
    def from_texts(cls, texts: Iterable[str | Document]) -> Corpus:
        return cls(texts=[t if isinstance(t, Document) else Document(t, "memory") for t in texts])

    def documents(self) -> Iterator[Document]:
        if self.texts is not None:
            yield from self.texts
            return
        for item in _expand(self.paths):
            if isinstance(item, tuple):
                yield from _read_datasets_dir(item[1], self.text_field)
            else:
                yield from _read_file(item, self.text_field)

    def fingerprint(self) -> str:
        """Content hash recorded in stores so a resume sees the same text: the raw bytes of the corpus
        files (fast: no parsing), or the texts themselves for in-memory corpora. Raises CorpusError
        when there is no text at all, before anything is written."""
        digest = hashlib.sha256(self.text_field.encode())
        if self.texts is not None:
            for doc in self.texts:
                digest.update(doc.source.encode() + b"\0" + doc.text.encode() + b"\1")
        else:
            for item in _expand(self.paths):
                path = item[1] if isinstance(item, tuple) else item
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                for file in files:
                    digest.update(str(file.relative_to(path.parent)).encode() + b"\0")
                    with open(file, "rb") as f:
                        for block in iter(lambda f=f: f.read(1 << 22), b""):
                            digest.update(block)
        if not any(doc.text.strip() for doc in self.documents()):  # stops at the first non-empty document
            where = ", ".join(map(str, self.paths)) or "the given texts"
            raise CorpusError(f"the corpus ({where}) has no text; check the paths and `text_field`")
        return digest.hexdigest()


@dataclass
class Window:
    """One packed window; arrays of length `context`."""

    ids: np.ndarray  # int64 token ids
    attention: np.ndarray  # bool, False on padding
    valid: np.ndarray  # bool, True where activations should be harvested
    doc: np.ndarray  # int64 document index, -1 for BOS / separator / padding
    pos: np.ndarray  # int32 position inside the document, -1 for BOS / separator / padding


@dataclass
class Packing:
    """How documents become windows; everything here is part of a store's identity."""

    context: int = 256
    bos_id: int | None = None
    sep_id: int | None = None
    pad_id: int = 0
    exclude_ids: frozenset[int] = frozenset()
    chat_start_ids: frozenset[int] = frozenset()  # a chat header runs from one of these to the next newline
    newline_ids: frozenset[int] = frozenset()

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, context: int, exclude_special: bool = True, exclude_chat: bool = True
    ) -> Packing:
        """Prefer `<|endoftext|>` as BOS and separator where the tokenizer has it and does not add its
        own BOS (GPT-2, SmolLM2, Qwen: it is what separated pretraining documents); otherwise use the
        tokenizer's BOS to open windows and its EOS between documents (Llama, Gemma)."""
        vocab = tokenizer.get_vocab()
        eot = vocab.get("<|endoftext|>")
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        if eot is not None and not adds_bos:
            bos = sep = eot
        else:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep or 0)
        special: set[int] = set()
        if exclude_special:
            special |= set(tokenizer.all_special_ids)
            special |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
        starts = {i for i in special if "start" in tokenizer.convert_ids_to_tokens(i)} if exclude_chat else set()
        newlines = {i for t, i in vocab.items() if "\n" in t or "Ċ" in t} if exclude_chat else set()
        return cls(context, bos, sep, int(pad), frozenset(special), frozenset(starts), frozenset(newlines))

    def describe(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "bos_id": self.bos_id,
            "sep_id": self.sep_id,
            "pad_id": self.pad_id,
            "exclude_ids": sorted(self.exclude_ids),
            "chat_start_ids": sorted(self.chat_start_ids),
            "n_newline_ids": len(self.newline_ids),
        }


def _token_stream(
    corpus: Corpus, tokenizer: Any, packing: Packing, batch_docs: int = 64
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (token ids, doc index) per non-empty document, tokenizing in batches."""
    pending: list[str] = []
    index = 0

    def flush() -> Iterator[tuple[np.ndarray, int]]:
        nonlocal index
        encoded = tokenizer(pending, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if ids:
                yield np.asarray(ids, dtype=np.int64), index
                index += 1
        pending.clear()

    for doc in corpus.documents():
        if doc.text.strip():
            pending.append(doc.text)
        if len(pending) >= batch_docs:
            yield from flush()
    if pending:
        yield from flush()


def _valid_mask(ids: np.ndarray, packing: Packing) -> np.ndarray:
    valid = ~np.isin(ids, list(packing.exclude_ids)) if packing.exclude_ids else np.ones(len(ids), bool)
    if packing.chat_start_ids:
        in_header = False
        starts, newlines = packing.chat_start_ids, packing.newline_ids
        for i, tok in enumerate(ids.tolist()):
            if tok in starts:
                in_header = True
            elif in_header:
                valid[i] = False
                if tok in newlines:
                    in_header = False
    return valid


def pack(corpus: Corpus, tokenizer: Any, packing: Packing) -> Iterator[Window]:
    """Pack documents into windows of `packing.context` tokens; the last window is padded."""
    ctx = packing.context
    if ctx < 2:
        raise CorpusError(f"context {ctx} is too short; use at least 2 tokens")
    body = ctx - (1 if packing.bos_id is not None else 0)
    buf_ids: list[np.ndarray] = []
    buf_doc: list[np.ndarray] = []
    buf_pos: list[np.ndarray] = []
    buf_valid: list[np.ndarray] = []
    buffered = 0
    any_doc = False

    def take(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        nonlocal buffered
        ids, doc, pos, valid = (np.concatenate(b) for b in (buf_ids, buf_doc, buf_pos, buf_valid))
        for b, arr in ((buf_ids, ids), (buf_doc, doc), (buf_pos, pos), (buf_valid, valid)):
            b.clear()
            if len(arr) > n:
                b.append(arr[n:])
        buffered = max(0, buffered - n)
        return ids[:n], doc[:n], pos[:n], valid[:n]

    def window(ids: np.ndarray, doc: np.ndarray, pos: np.ndarray, valid: np.ndarray) -> Window:
        n_pad = body - len(ids)
        attention = np.concatenate([np.ones(len(ids), bool), np.zeros(n_pad, bool)])
        ids = np.concatenate([ids, np.full(n_pad, packing.pad_id, np.int64)])
        doc = np.concatenate([doc, np.full(n_pad, -1, np.int64)])
        pos = np.concatenate([pos, np.full(n_pad, -1, np.int32)])
        valid = np.concatenate([valid, np.zeros(n_pad, bool)])
        if packing.bos_id is not None:
            ids = np.concatenate([[packing.bos_id], ids])
            attention = np.concatenate([[True], attention])
            valid = np.concatenate([[False], valid])
            doc = np.concatenate([[-1], doc])
            pos = np.concatenate([np.array([-1], np.int32), pos])
        return Window(ids, attention, valid, doc, pos)

    for ids, index in _token_stream(corpus, tokenizer, packing):
        if any_doc and packing.sep_id is not None:
            buf_ids.append(np.array([packing.sep_id], np.int64))
            buf_doc.append(np.array([-1], np.int64))
            buf_pos.append(np.array([-1], np.int32))
            buf_valid.append(np.array([False]))
            buffered += 1
        any_doc = True
        buf_ids.append(ids)
        buf_doc.append(np.full(len(ids), index, np.int64))
        buf_pos.append(np.arange(len(ids), dtype=np.int32))
        buf_valid.append(_valid_mask(ids, packing))
        buffered += len(ids)
        while buffered >= body:
            yield window(*take(body))
    if not any_doc:
        raise CorpusError("the corpus has no text (every document is empty); check the paths and `text_field`")
    if buffered:
        yield window(*take(buffered))
