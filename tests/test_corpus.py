"""Corpus readers and packing, with known answers on a tiny real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import FIXTURE_TEXT

from aimri.data.corpus import Corpus, Packing, pack
from aimri.errors import CorpusError


def _packing(tok, context: int = 16, **kw) -> Packing:
    return Packing.for_tokenizer(tok, context, **kw)


def test_bos_and_separator_choice(tiny_tokenizer) -> None:
    p = _packing(tiny_tokenizer)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert p.bos_id == eot and p.sep_id == eot  # tokenizer adds no BOS of its own and has <|endoftext|>


def test_long_document_is_split_not_truncated(tiny_tokenizer) -> None:
    text = FIXTURE_TEXT * 3
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    windows = list(pack(Corpus.from_texts([text]), tiny_tokenizer, _packing(tiny_tokenizer, 16)))
    assert len(windows) == -(-len(ids) // 15)
    body = np.concatenate([w.ids[1:][w.attention[1:]] for w in windows])
    assert body.tolist() == ids  # every token, in order, nothing dropped
    pos = np.concatenate([w.pos[1:][w.attention[1:]] for w in windows])
    assert pos.tolist() == list(range(len(ids)))
    assert all(w.ids[0] == _packing(tiny_tokenizer).bos_id and not w.valid[0] for w in windows)
    last = windows[-1]
    assert (~last.attention).sum() == 16 * len(windows) - len(windows) - len(ids)


def test_documents_are_separated_and_indexed(tiny_tokenizer) -> None:
    docs = ["The keeper wrote letters.", "", "Ships relied on the beam."]
    windows = list(pack(Corpus.from_texts(docs), tiny_tokenizer, _packing(tiny_tokenizer, 64)))
    (w,) = windows
    real = w.attention
    sep = _packing(tiny_tokenizer).sep_id
    assert (w.ids[real] == sep).sum() == 2  # BOS + one separator between the two non-empty documents
    assert set(w.doc[w.valid].tolist()) == {0, 1}
    assert not w.valid[w.ids == sep].any()


def test_special_and_chat_tokens_excluded(tiny_tokenizer) -> None:
    chat = "<|im_start|>user\nWhere is the lighthouse?<|im_end|>\n<|im_start|>assistant\nOn the rocky coast.<|im_end|>"
    (w,) = pack(Corpus.from_texts([chat]), tiny_tokenizer, _packing(tiny_tokenizer, 64))
    kept = tiny_tokenizer.decode(w.ids[w.valid].tolist())
    assert "im_start" not in kept and "im_end" not in kept and "user" not in kept and "assistant" not in kept
    assert "Where is the lighthouse?" in kept and "On the rocky coast." in kept
    (w2,) = pack(
        Corpus.from_texts([chat]),
        tiny_tokenizer,
        _packing(tiny_tokenizer, 64, exclude_special=False, exclude_chat=False),
    )
    assert w2.valid[1:][w2.attention[1:]].all()


def test_readers(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one", "source": "mine"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"text": ["from datasets"]}).save_to_disk(str(tmp_path / "ds"))
    texts = [
        d.text
        for d in Corpus.from_paths(
            [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet", tmp_path / "ds"]
        ).documents()
    ]
    assert texts == ["plain text document", "json one", "json two", "parquet row", "from datasets"]
    sources = [d.source for d in Corpus.from_paths([tmp_path / "b.jsonl"]).documents()]
    assert sources == ["mine", "b.jsonl"]


def test_bad_corpora(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="has no text"):
        Corpus.from_paths([tmp_path / "empty.txt"]).fingerprint()
    with pytest.raises(CorpusError, match="has no text"):
        list(pack(Corpus.from_paths([tmp_path / "empty.txt"]), tiny_tokenizer, _packing(tiny_tokenizer)))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2 is not valid JSON"):
        list(Corpus.from_paths([tmp_path / "bad.jsonl"]).documents())
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="no 'text' field; pass --text-field"):
        list(Corpus.from_paths([tmp_path / "nofield.jsonl"]).documents())
    with pytest.raises(CorpusError, match="does not exist"):
        list(Corpus.from_paths([tmp_path / "missing.txt"]).documents())
