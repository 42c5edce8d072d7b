"""ActivationStore: sharded, memory-mapped, checksummed activations with a JSON manifest.

Layout of a store directory:

    manifest.json            spec (model, revision, sites, dtype, packing, corpus fingerprint) + shards
    shard-000000/            one directory per shard, renamed into place only once complete
        resid.15.npy         [rows, d] activations per site (float32 or float16)
        tokens.npy           [rows] int64 token ids
        doc.npy              [rows] int64 document index in the corpus
        pos.npy              [rows] int32 position inside the document
        window.npy           [rows] int64 window index; offset.npy [rows] int32 position in the window

A shard is written to `.shard-NNNNNN.tmp`, each file fsynced, then renamed; the manifest is rewritten
atomically after each shard. A crash therefore leaves only finished shards behind, and a rerun with the
same spec resumes after the last one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimri.errors import StoreError
from aimri.paths import atomic_write_text, fsync_dir

FORMAT = "aimri.activation_store"
VERSION = 1
INDEX_FILES = ("tokens", "doc", "pos", "window", "offset")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass
class ShardData:
    """What one shard holds before it is written."""

    acts: dict[str, np.ndarray]
    index: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.index["tokens"])


class ActivationStore:
    """A store on disk. Open with `ActivationStore(path)`; create through `StoreWriter`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    # -- description -------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["spec"]

    @property
    def sites(self) -> list[str]:
        return list(self.spec["sites"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def d(self, site: str) -> int:
        return int(self.spec["d"][self._check_site(site)])

    def _check_site(self, site: str) -> str:
        if site not in self.spec["sites"]:
            raise StoreError(f"site {site!r} is not in the store {self.path} (it holds {', '.join(self.sites)})")
        return site

    def __repr__(self) -> str:
        model = self.spec["model"]
        return f"ActivationStore({str(self.path)!r}, model={model['name']}, sites={self.sites}, rows={self.rows}, shards={len(self.shards)}, complete={self.complete})"

    # -- reading -----------------------------------------------------------------------------
    def _open(self, shard: dict[str, Any], name: str) -> np.ndarray:
        path = self.path / shard["name"] / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError as err:
            raise StoreError(f"{path} is missing; run `mri store verify {self.path}` and re-harvest") from err
        except (ValueError, OSError) as err:
            raise StoreError(f"{path} is truncated or corrupted ({err}); run `mri store verify {self.path}`") from err
        if len(arr) != shard["rows"]:
            raise StoreError(f"{path} has {len(arr)} rows, the manifest says {shard['rows']}: the file is truncated")
        return arr

    def array(self, shard: int, name: str) -> np.ndarray:
        """Memory-mapped [rows, d] activations of a site (or an index: tokens, doc, pos, window, offset)."""
        if name not in INDEX_FILES:
            self._check_site(name)
        return self._open(self.shards[shard], name)

    def activations(self, site: str) -> Iterator[np.ndarray]:
        """Each shard's memory-mapped activations for `site`, in order."""
        for i in range(len(self.shards)):
            yield self.array(i, site)

    def batches(
        self,
        site: str | Sequence[str],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        shards_per_buffer: int = 8,
        with_tokens: bool = False,
        drop_last: bool = False,
        shards: Sequence[int] | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[Any]:
        """Batches of activations as fp32 tensors, read from memory-mapped shards: one tensor for one
        site; a tuple for several sites (the same rows: e.g. mlp.in and mlp.out for a transcoder), with
        the token ids last when `with_tokens`.

        With `shuffle`, shards are visited in random order in groups of `shards_per_buffer`, and rows are
        permuted within each group: memory holds one batch, not the store. Each group's last batch may be
        short unless `drop_last`. `shards` restricts reading to those shard indices (e.g. a held-out tail).
        `part=(rank, world)` yields only that rank's contiguous 1/world of every batch (data-parallel
        training: the ranks' parts, concatenated in rank order, are the single-process batch)."""
        sites = [site] if isinstance(site, str) else list(site)
        for name in sites:
            self._check_site(name)
        names = sites + (["tokens"] if with_tokens else [])
        rng = np.random.default_rng(seed)
        chosen = np.arange(len(self.shards)) if shards is None else np.asarray(list(shards), dtype=np.int64)
        order = rng.permutation(chosen) if shuffle else chosen
        for start in range(0, len(order), shards_per_buffer):
            group = [int(i) for i in order[start : start + shards_per_buffer]]
            arrays = [[self.array(i, name) for name in names] for i in group]
            bounds = np.concatenate([[0], np.cumsum([self.shards[i]["rows"] for i in group])])
            flat = rng.permutation(int(bounds[-1])) if shuffle else np.arange(int(bounds[-1]))
            for b in range(0, len(flat), batch_size):
                idx = flat[b : b + batch_size]
                if drop_last and len(idx) < batch_size:
                    continue
                rank, world = part
                if world > 1:
                    step = -(-len(idx) // world)
                    idx = idx[rank * step : (rank + 1) * step]
                which = np.searchsorted(bounds, idx, side="right") - 1
                parts: list[list[np.ndarray]] = [[] for _ in names]
                for s in np.unique(which):  # read each shard's rows in ascending order
                    local = np.sort(idx[which == s] - bounds[s])
                    for j, arr in enumerate(arrays[s]):
                        parts[j].append(np.asarray(arr[local]))
                out = tuple(
                    torch.from_numpy(np.concatenate(p).astype(np.float32 if n != "tokens" else np.int64, copy=False))
                    for p, n in zip(parts, names, strict=True)
                )
                yield out[0] if len(out) == 1 else out

    # -- integrity ---------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Recompute every checksum; return the problems found (empty when the store is intact)."""
        problems = []
        for shard in self.shards:
            for fname, meta in shard["files"].items():
                path = self.path / shard["name"] / fname
                if not path.exists():
                    problems.append(f"{path}: missing")
                elif path.stat().st_size != meta["bytes"]:
                    problems.append(f"{path}: {path.stat().st_size} bytes, expected {meta['bytes']} (truncated)")
                elif _file_sha256(path) != meta["sha256"]:
                    problems.append(f"{path}: checksum mismatch (corrupted)")
        return problems


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / "manifest.json"
    if not path.exists():
        raise StoreError(f"no activation store at {path}; create one with `mri harvest --out {path}`")
    if not file.exists():
        raise StoreError(f"{file} is missing: {path} is not an activation store (or its manifest was deleted)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{file} is truncated or corrupted ({err}); delete the store and re-harvest") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not an AI MRI activation-store manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(f"{file} has store version {manifest.get('version')}; this AI MRI reads version {VERSION}")
    for key in ("spec", "shards"):
        if key not in manifest:
            raise StoreError(f"{file} lacks {key!r}: the manifest is corrupted; delete the store and re-harvest")
    return manifest


def _short(value: Any) -> str:
    text = str(value)
    return text[:40] + "..." if len(text) > 40 else text


def _spec_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _spec_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: store has {_short(a)}, this run has {_short(b)}")
    return diffs


class StoreWriter:
    """Creates or resumes a store with a fixed spec; one process per rank (an flock on the directory).

    With `world` > 1 (torchrun), rank r writes the shards whose index is r modulo `world`, records them in
    ranks/rank-r.json, and `finish` (called by every rank, after a barrier) has rank 0 merge the records
    into the one manifest. A crashed rank's finished shards stay; a rerun with the same world size resumes."""

    def __init__(self, path: str | Path, spec: dict[str, Any], rank: int = 0, world: int = 1) -> None:
        self.path = Path(path)
        self.spec = json.loads(json.dumps(spec))  # normalise tuples etc. as they will be read back
        self.rank, self.world = rank, world
        self._lock_fd: int | None = None
        if self.path.exists() and (self.path / "manifest.json").exists():
            self.manifest = read_manifest(self.path)
            recorded = json.loads(json.dumps(self.manifest["spec"]))
            recorded.get("model", {}).setdefault("dtype", "float32")  # stores from before it was recorded: fp32
            diffs = _spec_diff(recorded, self.spec)
            if diffs:
                raise StoreError(
                    f"{self.path} was harvested with different settings ({'; '.join(diffs[:3])}); "
                    "rerun with the original arguments to resume, or choose a new `out` directory"
                )
            was = int(self.manifest.get("world_size", 1))
            if not self.manifest.get("complete") and was != world and self._has_progress():
                raise StoreError(
                    f"{self.path} was being harvested by {was} rank(s) and this run has {world}; resume with "
                    f"{'torchrun --nproc_per_node ' + str(was) if was > 1 else 'a single process'}, or choose a new `out` directory"
                )
        elif self.path.exists() and any(p.name != "ranks" for p in self.path.iterdir()):
            raise StoreError(
                f"{self.path} exists and is not an activation store; choose an empty or new `out` directory"
            )
        else:
            self.manifest = {"format": FORMAT, "version": VERSION, "spec": self.spec, "shards": [], "complete": False}
        if world > 1:
            self.manifest["world_size"] = world
        self.mine: list[dict[str, Any]] = self._read_rank_record() if world > 1 else self.manifest["shards"]

    def _has_progress(self) -> bool:
        return bool(self.manifest["shards"]) or any((self.path / "ranks").glob("rank-*.json"))

    def _rank_file(self) -> Path:
        return self.path / "ranks" / f"rank-{self.rank}.json"

    def _read_rank_record(self) -> list[dict[str, Any]]:
        file = self._rank_file()
        if not file.exists():
            return []
        try:
            record = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{file} is corrupted ({err}); delete {self.path} and re-harvest") from err
        if record.get("world_size") != self.world:
            raise StoreError(f"{file} was written by a {record.get('world_size')}-rank run; this run has {self.world}")
        return list(record["shards"])

    @contextmanager
    def locked(self) -> Iterator[StoreWriter]:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = ".lock" if self.world == 1 else f".lock.rank-{self.rank}"
        fd = os.open(self.path / lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise StoreError(
                f"{self.path} is being written by another process; wait for it or choose another `out` directory"
            ) from err
        try:
            self._cleanup()
            if not (self.path / "manifest.json").exists():  # (a distributed run's rank 0 wrote it first)
                self.write_manifest()
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def done_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def done_indices(self) -> set[int]:
        """Shard indices this rank has finished (all of them, for a single process)."""
        return {int(s["name"].split("-")[1]) for s in self.mine}

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def _cleanup(self) -> None:
        """Drop what a crash left of this rank's work: temp shards, and shard dirs renamed but not recorded."""
        known = {s["name"] for s in self.mine}
        for entry in self.path.iterdir():
            stem = entry.name.removeprefix(".").removesuffix(".tmp")
            if not stem.startswith("shard-") or not stem[6:].isdigit() or not self.owns(int(stem[6:])):
                if self.rank == 0 and entry.name.startswith(".manifest.json.tmp"):
                    entry.unlink(missing_ok=True)
                continue
            if entry.name.startswith(".shard-") or entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)

    def write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=1))

    def _record(self) -> None:
        if self.world == 1:
            self.write_manifest()
        else:
            self._rank_file().parent.mkdir(exist_ok=True)
            atomic_write_text(self._rank_file(), json.dumps({"world_size": self.world, "shards": self.mine}, indent=1))

    def write_shard(self, data: ShardData, extra: dict[str, Any] | None = None, index: int | None = None) -> None:
        """Write shard `index` (default: the next one of a single-process store) and record it."""
        index = self.done_shards if index is None else index
        name = shard_name(index)
        tmp = self.path / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        files: dict[str, dict[str, Any]] = {}
        recorded = len(self.mine)
        try:
            tmp.mkdir()
            for key, arr in [*data.acts.items(), *data.index.items()]:
                file = tmp / f"{key}.npy"
                with open(file, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr))
                    f.flush()
                    os.fsync(f.fileno())
                files[file.name] = {"sha256": _file_sha256(file), "bytes": file.stat().st_size}
            fsync_dir(tmp)
            os.rename(tmp, self.path / name)
            fsync_dir(self.path)
            self.mine.append({"name": name, "rows": data.rows, "files": files, **(extra or {})})
            self._record()
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if (self.path / name).exists() and len(self.mine) == recorded:
                shutil.rmtree(self.path / name, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise StoreError(
                    f"disk full while writing {name} in {self.path}; free space (or use another `out` directory) and rerun: "
                    f"the {recorded} finished shards are kept"
                ) from err
            raise StoreError(f"could not write {name} in {self.path} ({err.strerror or err})") from err

    def merge_ranks(self) -> None:
        """Rank 0, once every rank has finished: the ranks' records become the manifest's shard list."""
        shards: list[dict[str, Any]] = []
        for r in range(self.world):
            file = self.path / "ranks" / f"rank-{r}.json"
            if file.exists():
                shards += json.loads(file.read_text())["shards"]
        shards.sort(key=lambda s: s["name"])
        names = [s["name"] for s in shards]
        if names != [shard_name(i) for i in range(len(names))]:
            missing = sorted({shard_name(i) for i in range(len(names))} - set(names))[:3]
            raise StoreError(f"{self.path}: the ranks' shards are not contiguous (missing {missing}); rerun to resume")
        self.manifest["shards"] = shards

    def finish(self, **summary: Any) -> ActivationStore:
        """Mark the store complete (rank 0 of a distributed run, after every rank has finished)."""
        if self.world > 1:
            self.merge_ranks()
        self.manifest["complete"] = True
        self.manifest["summary"] = summary
        self.write_manifest()
        if self.world > 1:
            shutil.rmtree(self.path / "ranks", ignore_errors=True)
        return ActivationStore(self.path)
