"""The Run: one model's run directory, and the only place a run's paths are derived.

Every stage that writes into a run (harvest, training, atlases, tracing, steering sweeps, the checkup, the
console's discovery) asks a `Run` where its files go, so a model is filed under one name everywhere:

    runs/<model>/                     Run.for_model(name)   (<model>: the Subject's name, "/" -> "--")
        store/                        harvested activations (`mri harvest`)
        dictionaries/NAME/            SAEs, transcoders, crosscoders (`mri train`, `mri train-crosscoder`)
            atlas.sqlite              the dictionary's atlas (`mri atlas`)
        dictionaries/neurons-L/atlas.sqlite   layer L's MLP neurons as features (`mri atlas --neurons L`)
        transcoders/layer-L/          per-layer transcoders for attribution graphs (`mri train-transcoders`)
            atlas.sqlite              their atlases (graph node labels)
        graphs/NAME.json (+ .html)    attribution graphs (`mri trace`)
        directions/NAME.npy|.safetensors   steering vectors (probes, differences of means, ...)
        scan/                         the checkup: findings.json, stage-results.json, report.html, stages/ (`mri scan`)
        treatments/NAME/              treated models (HF directories + treatment.json; `mri treat` without --out)

Organisms are not per run: they are model directories cached under $AIMRI_HOME/organisms (`organisms_dir()`).

A model's name is what `aimri.subject.model_name(spec)` gives without loading it (and `Subject.name` after
loading): the embedded name, a .gguf file's stem, a directory's name, an organism directory's name or a hub id
("org/name"). The run directory replaces "/" with "--", as the Hugging Face cache does, so a hub id is one
folder, not two.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aimri.paths import aimri_home

RUNS_ENV = "AIMRI_RUNS"  # where run directories go (default: ./runs)


def runs_root() -> Path:
    """$AIMRI_RUNS, default `runs` under the current directory."""
    return Path(os.environ.get(RUNS_ENV, "runs")).expanduser()


def organisms_dir() -> Path:
    """Where `mri organism build` caches organisms: $AIMRI_HOME/organisms."""
    return aimri_home() / "organisms"


def slug(model_name: str) -> str:
    """A model name as one folder name: "org/name" -> "org--name"; other path separators likewise."""
    name = model_name.strip().replace("\\", "/").strip("/")
    if not name:
        raise ValueError("a model name is needed to name its run directory")
    return name.replace("/", "--")


def prompt_slug(prompt: str, limit: int = 40) -> str:
    """A prompt as a file name: lower-case words joined by "-", at most `limit` characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "graph"


@dataclass(frozen=True)
class Run:
    """A run directory. Paths only: nothing is created until a stage writes there."""

    root: Path

    @classmethod
    def for_model(cls, model_name: str, runs: Path | None = None) -> Run:
        """The run of a model, by its name (see the module docstring), under `runs` (default: runs_root())."""
        return cls((runs or runs_root()) / slug(model_name))

    # -- stores and dictionaries ----------------------------------------------------------------------
    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def dictionaries(self) -> Path:
        return self.root / "dictionaries"

    def dictionary(self, name: str) -> Path:
        return self.dictionaries / name

    @staticmethod
    def atlas_of(dictionary: Path) -> Path:
        """A dictionary folder's atlas (the console finds it there; steering reads its max activations)."""
        return Path(dictionary) / "atlas.sqlite"

    def neuron_atlas(self, layer: int) -> Path:
        return self.atlas_of(self.dictionary(f"neurons-{layer}"))

    @staticmethod
    def dictionary_beside(store: Path, name: str) -> Path:
        """A dictionary trained from a store goes into the store's run: STORE/../dictionaries/NAME."""
        return Path(store).parent / "dictionaries" / name

    @property
    def transcoders(self) -> Path:
        return self.root / "transcoders"

    @property
    def clt(self) -> Path:
        """The cross-layer transcoder `mri train-clt` writes (a folder; `mri trace --transcoders` takes it)."""
        return self.root / "clt"

    @property
    def transcoders_or_clt(self) -> Path:
        """What a graph is traced through by default: the per-layer transcoders, else the CLT when only it exists."""
        return self.clt if not self.transcoders.is_dir() and self.clt.is_dir() else self.transcoders

    @staticmethod
    def transcoder_layer(transcoders: Path, layer: int) -> Path:
        return Path(transcoders) / f"layer-{layer}"

    # -- graphs and directions -------------------------------------------------------------------
    @property
    def graphs(self) -> Path:
        return self.root / "graphs"

    def graph(self, name: str) -> Path:
        return self.graphs / f"{name}.json"

    @property
    def directions(self) -> Path:
        return self.root / "directions"

    # -- the checkup and treatments --------------------------------------------------------------------
    @property
    def scan(self) -> Path:
        return self.root / "scan"

    @staticmethod
    def findings_of(scan: Path) -> Path:
        return Path(scan) / "findings.json"

    @staticmethod
    def report_of(scan: Path) -> Path:
        return Path(scan) / "report.html"

    @staticmethod
    def stages_of(scan: Path) -> Path:
        """The checkup's per-stage cache (one JSON + optional tensors per finished stage)."""
        return Path(scan) / "stages"

    @staticmethod
    def stage_results_of(scan: Path) -> Path:
        """The finished checkup's stage results the report draws (written with findings.json)."""
        return Path(scan) / "stage-results.json"

    @property
    def treatments(self) -> Path:
        return self.root / "treatments"

    # -- discovery (what the console lists) ---------------------------------------------------------
    def atlas_files(self) -> list[Path]:
        """Every dictionary's and transcoder layer's atlas in this run, dictionaries first, sorted."""
        found = sorted(self.dictionaries.glob("*/atlas.sqlite")) + sorted(self.transcoders.glob("layer-*/atlas.sqlite"))
        return [p for p in found if not p.parent.name.startswith(".")]  # a copy being installed is hidden

    def graph_files(self) -> list[Path]:
        return sorted(self.graphs.glob("*.json"))

    def direction_files(self) -> list[Path]:
        return [p for p in sorted(self.directions.glob("*")) if p.suffix in (".npy", ".safetensors")]
