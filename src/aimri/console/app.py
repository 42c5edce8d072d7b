"""What the console shows, read from a run directory: atlases, attribution graphs, the checkup, and the
model + dictionaries for steering and graph interventions. Every path served comes from discovery here,
never from a request; a request names things by index or by the names listed in `status()`.

The run directory's layout (where atlases, transcoders, graphs, directions and the checkup are) is
`aimri.run.Run`'s; the console only asks it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimri.console.index import ensure_index, search
from aimri.errors import AimriError
from aimri.run import Run

GRAPH_SCHEMA = 1
Progress = Callable[[str, int, int], None]


class RequestError(AimriError):
    """A request the console refuses (HTTP 400/404): its message is shown to the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AtlasEntry:
    name: str
    path: Path
    dictionary: Path | None  # the atlas's folder, when it holds the dictionary (steering needs it)


def _is_graph(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return '"metadata"' in head or '"nodes"' in head


class Console:
    def __init__(
        self,
        run_dir: Path,
        atlases: list[Path] | None = None,
        model: str | None = None,
        transcoders: Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.device, self.dtype = device, dtype  # the model's, when one is loaded (aimri.load's rules)
        self.run = Run(self.run_dir)
        self.atlases = [
            AtlasEntry(
                p.parent.name if p.parent != self.run_dir else p.stem,
                p.resolve(),
                p.parent.resolve() if (p.parent / "cfg.json").exists() else None,
            )
            for p in [*(atlases or []), *self.run.atlas_files()]
        ]
        self.graphs = {p.stem: p.resolve() for p in self.run.graph_files() if _is_graph(p)}
        self.directions = {p.stem: p.resolve() for p in self.run.direction_files()}
        self.findings = Run.findings_of(self.run.scan)
        self.transcoders = transcoders or self.run.transcoders_or_clt
        self.model_name = model
        self._lock = threading.Lock()  # one model in memory, one generation at a time
        self._subject: Any = None
        self._graph_cache: dict[str, tuple[tuple[str, int, int], bytes]] = {}
        self._tcs: Any = None  # per-layer transcoders or a CLT (aimri.circuits.replacement.Transcoders), on first use
        self._dictionaries: dict[Path, Any] = {}  # loaded once per dictionary folder, for steering

    # -- what is here -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        from aimri.atlas.db import Atlas

        missing = []
        if not self.run_dir.is_dir():
            missing.append({"what": f"the run directory {self.run_dir}", "command": "mri harvest / mri scan"})
        model = self._model_name() or "MODEL"
        if not self.atlases:
            missing.append({"what": "a feature atlas (dictionaries/NAME/atlas.sqlite)",
                            "command": f"mri features {model} (the default labelled set: about 3 min on a 2-core CPU, "
                                       "once per model; `mri scan` builds it too)"})  # fmt: skip
        if not self.graphs:
            missing.append({"what": "an attribution graph (graphs/NAME.json)",
                            "command": (f"mri train-transcoders {model} --tokens 600000 (once: 1 h 35 min for SmolLM2's 30 "
                                        "layers on a 2-core CPU; time scales with --tokens), then mri trace "
                                        f"{model} 'The capital of the state containing Dallas is' (about 10 s; "
                                        "writes graphs/), or trace from the Graphs page once transcoders exist")})  # fmt: skip
        if not self.findings.is_file():
            missing.append({"what": "a checkup (scan/findings.json)", "command": "mri scan MODEL --out RUN/scan"})
        atlases = []
        for i, entry in enumerate(self.atlases):
            try:
                atlas = Atlas(entry.path)
                meta = atlas.meta
                atlases.append({"id": i, "name": entry.name, "features": atlas.n_features, "site": meta.get("site"),
                                "model": meta.get("model"), "steerable": entry.dictionary is not None})  # fmt: skip
            except AimriError as err:
                atlases.append({"id": i, "name": entry.name, "error": str(err)})
        return {
            "run_dir": str(self.run_dir),
            "atlases": atlases,
            "graphs": sorted(self.graphs),
            "directions": sorted(self.directions),
            "checkup": self.findings.is_file(),
            "model": self._model_name(),
            "transcoders": self.transcoders.is_dir(),
            "missing": missing,
        }

    def _model_name(self) -> str | None:
        if self.model_name:
            return self.model_name
        from aimri.atlas.db import Atlas

        for entry in self.atlases:
            try:
                model = Atlas(entry.path).meta.get("model")
            except AimriError:
                continue
            if model:
                return str(model)
        if self.findings.is_file():  # the checked-up model
            try:
                model = json.loads(self.findings.read_text()).get("model")
            except (OSError, json.JSONDecodeError):
                model = None
            if model:
                return str(model)
        from aimri.subject.names import EMBEDDED

        name = self.run_dir.resolve().name
        return name if name in EMBEDDED else None  # runs/<embedded model>

    # -- atlases ----------------------------------------------------------------------------------
    def _entry(self, atlas: int) -> AtlasEntry:
        if not 0 <= atlas < len(self.atlases):
            raise RequestError(f"no atlas {atlas}: this run has {len(self.atlases)}", 404)
        return self.atlases[atlas]

    def prepare(self, progress: Callable[[str], None] = lambda m: None) -> None:
        """Build each atlas's search index now (once; later starts reuse it)."""
        for entry in self.atlases:
            progress(f"indexing {entry.name}")
            ensure_index(entry.path)

    def search(self, atlas: int, query: str, by: str, limit: int) -> list[dict[str, Any]]:
        from aimri.atlas.db import Atlas

        if by not in ("label", "token", "text"):
            raise RequestError(f"search by {by!r}: use label, token or text")
        if not query.strip():
            raise RequestError("the search is empty: type a label word, a token or some example text")
        entry = self._entry(atlas)
        hits = search(ensure_index(entry.path), query, by, limit)
        db = Atlas(entry.path)
        for hit in hits:
            row = db.db.execute("SELECT density, max_act FROM features WHERE id = ?", (hit["feature"],)).fetchone()
            label = db.db.execute(
                "SELECT label FROM labels WHERE feature = ? ORDER BY created DESC LIMIT 1", (hit["feature"],)
            ).fetchone()
            hit.update(density=row[0] if row else None, max_act=row[1] if row else None,
                       label=label[0] if label else "")  # fmt: skip
        return hits

    def feature(self, atlas: int, feature: int) -> dict[str, Any]:
        from aimri.atlas.db import Atlas

        entry = self._entry(atlas)
        db = Atlas(entry.path)
        if not 0 <= feature < db.n_features:
            raise RequestError(
                f"feature {feature} does not exist: {entry.name} has features 0..{db.n_features - 1}", 404
            )
        card = db.card(feature, n_top=12)
        card["sample_examples"] = db.examples(feature, "sample")[:12]
        card["atlas"] = {"id": atlas, "name": entry.name, "steerable": entry.dictionary is not None}
        return card

    # -- graphs -----------------------------------------------------------------------------------
    def graph_bytes(self, name: str) -> bytes:
        """The graph file as stored, checked once per version of the file (a 20k-link graph is ~2 MB:
        re-parsing and re-encoding it per request would cost ~50 ms)."""
        if name not in self.graphs:
            raise RequestError(f"no graph named {name!r}; this run has: {', '.join(self.graphs) or 'none'}", 404)
        path = self.graphs[name]
        try:
            st = path.stat()
        except OSError as err:
            raise RequestError(f"graph {name!r} is unreadable ({err}); rerun `mri trace`", 422) from err
        key = (str(path), st.st_size, st.st_mtime_ns)
        cached = self._graph_cache.get(name)
        if cached is None or cached[0] != key:
            self.graph(name)  # validates, or raises a RequestError naming the problem
            self._graph_cache[name] = (key, path.read_bytes())
        return self._graph_cache[name][1]

    def graph(self, name: str) -> dict[str, Any]:
        if name not in self.graphs:
            raise RequestError(f"no graph named {name!r}; this run has: {', '.join(self.graphs) or 'none'}", 404)
        try:
            data = json.loads(self.graphs[name].read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"graph {name!r} is unreadable ({err}); rerun `mri trace`", 422) from err
        if not isinstance(data, dict) or not {"metadata", "nodes", "links"} <= set(data):
            raise RequestError(f"graph {name!r} is not a graph JSON (metadata, nodes, links)", 422)
        version = data["metadata"].get("schema_version", 1)
        if not isinstance(version, int) or version > GRAPH_SCHEMA:
            raise RequestError(
                f"graph {name!r} has schema version {version}; this console reads up to {GRAPH_SCHEMA}: "
                "upgrade AI MRI (pip install -U aimri) or re-export the graph", 422
            )  # fmt: skip
        return data

    # -- model work (long: reported through `progress`) ----------------------------------------------
    def _subject_for(self, model: str | None, progress: Progress) -> Any:
        import aimri

        name = model or self._model_name()
        if name is None:
            raise RequestError(
                "no model known for this run: start the console with a model (`mri serve RUN --model MODEL`)"
            )
        from aimri.subject.names import model_name

        if self._subject is None or self._subject.name != model_name(name):
            progress(f"loading {name}", 0, 1)
            self._subject = aimri.load(name, device=self.device, dtype=self.dtype)
            self._tcs = None
        return self._subject

    def steer(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from aimri.steering.generate import compare
        from aimri.steering.interventions import DirectionEdit
        from aimri.steering.specs import FeatureSpec, load_vector, resolve_feature, vector_model

        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("steer: give a non-empty prompt")
        tokens = request.get("max_tokens", 24)
        if not isinstance(tokens, int) or not 1 <= tokens <= 128:
            raise RequestError("steer: max_tokens must be an integer in 1..128")
        choices = request.get("features") or []
        vectors = request.get("directions") or []
        if not isinstance(choices, list) or not isinstance(vectors, list) or not 1 <= len(choices) + len(vectors) <= 16:
            raise RequestError(
                "steer: give 1 to 16 features {atlas, feature, strength} and directions {name, site, strength}"
            )
        with self._lock:
            subject = self._subject_for(request.get("model"), progress)
            edits: list[Any] = []
            described = []
            for choice in choices:
                if not isinstance(choice, dict):
                    raise RequestError("steer: each feature is {atlas, feature, strength}")
                atlas, feature, strength = choice.get("atlas", 0), choice.get("feature"), choice.get("strength")
                if not isinstance(atlas, int) or not isinstance(feature, int) or isinstance(feature, bool):
                    raise RequestError("steer: atlas and feature must be integers")
                if not isinstance(strength, (int, float)) or not -1000 <= strength <= 1000:
                    raise RequestError(
                        "steer: strength must be a number in -1000..1000 (× the feature's max activation)"
                    )
                entry = self._entry(atlas)
                if entry.dictionary is None:
                    raise RequestError(f"steer: {entry.name}'s folder holds no dictionary (cfg.json) to steer with")
                chosen = resolve_feature(FeatureSpec(entry.dictionary, feature, "times_max", float(strength)),
                                         atlas=entry.path, cache=self._dictionaries)  # fmt: skip
                edits.append(chosen.edit)
                described.append({"atlas": atlas, "feature": feature, "strength": strength,
                                  "clamp": chosen.edit.value, "label": chosen.label})  # fmt: skip
            for vector in vectors:
                name, site, strength = (vector.get(k) for k in ("name", "site", "strength")) if isinstance(
                    vector, dict) else (None, None, None)  # fmt: skip
                if name not in self.directions:
                    raise RequestError(
                        f"steer: no direction {name!r}; this run has: {', '.join(self.directions) or 'none'}"
                    )
                if not isinstance(site, str) or not isinstance(strength, (int, float)) or not -1e4 <= strength <= 1e4:
                    raise RequestError(
                        "steer: a direction needs a site (e.g. resid.15) and a strength in -10000..10000"
                    )
                site = subject.site(site).name  # unknown sites: the nearest valid names, as an error
                path = self.directions[name]
                found_in, revision = vector_model(path)
                vector = load_vector(path)
                edits.append(
                    DirectionEdit(
                        site, vector, float(strength), where="all", model_name=found_in, model_revision=revision
                    )
                )
                described.append({"direction": name, "site": site, "strength": strength})
            progress("generating", 0, 2)
            plain, steered = compare(subject, [prompt], edits, max_new_tokens=tokens)[0]
            progress("generating", 2, 2)
        return {"prompt": prompt, "unsteered": plain.text, "steered": steered.text, "features": described}

    def intervene(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from aimri.circuits.intervene import Change, intervene
        from aimri.circuits.replacement import load_transcoders

        data = self.graph(str(request.get("graph", "")))
        changes_in = request.get("changes")
        if not isinstance(changes_in, list) or not changes_in or len(changes_in) > 64:
            raise RequestError("intervene: give 1 to 64 changes as {layer, feature, positions, mode, value}")
        changes = []
        for c in changes_in:
            if not isinstance(c, dict):
                raise RequestError("intervene: each change is {layer, feature, positions, mode, value}")
            layer, feature, mode, value = c.get("layer"), c.get("feature"), c.get("mode", "scale"), c.get("value")
            positions = c.get("positions")
            if not isinstance(layer, int) or not isinstance(feature, int) or mode not in ("scale", "set"):
                raise RequestError("intervene: layer and feature must be integers and mode 'scale' or 'set'")
            if not isinstance(value, (int, float)) or not -1e4 <= value <= 1e4:
                raise RequestError("intervene: value must be a number in -10000..10000")
            if positions is not None and (
                not isinstance(positions, list) or not all(isinstance(p, int) for p in positions)
            ):
                raise RequestError("intervene: positions must be a list of integers, or null for every position")
            changes.append(Change(layer, feature, positions, mode, float(value)))
        with self._lock:
            subject = self._subject_for(request.get("model") or data["metadata"].get("scan"), progress)
            if self._tcs is None:
                progress("loading transcoders", 0, 1)
                self._tcs = load_transcoders(self.transcoders, subject)
            ids = data["metadata"].get("prompt_ids")  # the graph's own tokens
            if not ids:  # a graph written before they were recorded: it tokenized the bare prompt
                ids = list(subject.tokenizer(data["metadata"]["prompt"])["input_ids"])
                if len(ids) != len(data["metadata"].get("prompt_tokens", ids)):
                    raise RequestError("intervene: this graph's tokens cannot be recovered; trace the prompt again")
            progress("running", 0, 1)
            result = intervene(subject, self._tcs, ids, changes)
            progress("running", 1, 1)
        return {"graph": request["graph"], **result}

    def trace(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """A new attribution graph of a prompt, written to RUN/graphs/NAME.json (then listed like the others)."""
        import time

        from aimri.circuits.config import TraceConfig
        from aimri.circuits.pipeline import trace_prompt
        from aimri.circuits.replacement import load_transcoders
        from aimri.run import prompt_slug

        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 2000:
            raise RequestError("trace: give a prompt of 1 to 2,000 characters")
        features = request.get("max_feature_nodes", 256)
        if not isinstance(features, int) or not 1 <= features <= 4096:
            raise RequestError("trace: max_feature_nodes must be an integer in 1..4096")
        name = f"{prompt_slug(prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"
        with self._lock:
            subject = self._subject_for(request.get("model"), progress)
            if self._tcs is None:
                progress("loading transcoders", 0, 1)
                self._tcs = load_transcoders(self.transcoders, subject)
            traced = trace_prompt(subject, self._tcs, prompt, self.run.graph(name), TraceConfig(max_feature_nodes=features),
                                  html=False, clerps_from=self.transcoders, progress=False, step=progress)  # fmt: skip
            self.graphs[name] = traced.path.resolve()
        return {"name": name, "nodes": len(traced.data["nodes"]), "links": len(traced.data["links"])}

    def checkup(self) -> dict[str, Any]:
        if not self.findings.is_file():
            raise RequestError("this run has no checkup: run `mri scan MODEL --out RUN/scan`", 404)
        try:
            return json.loads(self.findings.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RequestError(f"{self.findings} is unreadable ({err}); rerun `mri scan`", 422) from err
