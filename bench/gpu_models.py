"""Helpers of bench/gpu.sh: the models, corpus, transcoders, GEMM peak, cuda tests and the final JSON line.

    python bench/gpu_models.py prepare --out .gpu        # here: tokenizers and a corpus slice to carry (xz)
    python bench/gpu_models.py models --out DIR [--smoke] # HF directories: real where AIMRI_GPU_MODELS has them,
                                                          # else random weights with the real config
    python bench/gpu_models.py corpus --out FILE --chars N
    python bench/gpu_models.py transcoders --model DIR --out DIR --width W --k K
    python bench/gpu_models.py peak [--smoke]
    python bench/gpu_models.py pytest -- ARGS...
    python bench/gpu_models.py check-peers
    python bench/gpu_models.py report --work DIR

Every command but `report` prints one JSON line last; `report` prints the run's one JSON line.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHAPES = BENCH / "gpu_models"
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
# what each model's real files are called (the embedded GGUFs, the HF hub ids)
REAL_NAMES = {
    "smollm2-135m-instruct": ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct*.gguf"),
    "gemma3-270m": ("gemma3-270m", "gemma-3-270m", "gemma-3-270m*.gguf"),
}
# the special tokens at the start of each vocabulary (a trained fallback tokenizer puts them at the same ids)
SPECIALS = {
    "smollm2-135m-instruct": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma3-270m": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
}
# peers: the modules each peer script imports (bench/peers/*), checked in the peer's environment
PEER_IMPORTS = {
    "nnsight": "from nnsight import TransformersModel",
    "sparsify": "from sparsify import SparseCoder, SparseCoderConfig; from sparsify.sign_sgd import SignSGD; "
    "from schedulefree import ScheduleFreeWrapper; import sparsify.utils as u; print(u.decoder_impl.__name__)",
    "sae_lens": "from sae_lens.config import SAETrainerConfig; from sae_lens.saes.topk_sae import TopKTrainingSAE; "
    "from sae_lens.training.sae_trainer import SAETrainer",
    "circuit_tracer": "from circuit_tracer import ReplacementModel, attribute; "
    "from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet; "
    "import circuit_tracer.replacement_model.replacement_model_nnsight; import transformers; print(transformers.__version__)",
}


def out(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- prepare (here) --------------------------------------------------------------------------------------------
def _converted(name: str) -> Path:
    """The converted HF directory of an embedded model: one already in an aimri cache, else converted now."""
    from aimri.paths import aimri_home

    pattern = REAL_NAMES[name][2].replace(".gguf", "")
    homes = [aimri_home(), Path.home() / ".cache" / "aimri", Path.home() / ".cache" / "aimri-test"]
    for home in homes:
        for found in sorted((home / "models").glob(pattern)):
            if (found / "tokenizer.json").exists() and (found / "config.json").exists():
                return found
    from aimri.subject.loading import gguf_to_dir
    from aimri.subject.names import EMBEDDED

    return gguf_to_dir(EMBEDDED[name]())


def prepare(args: argparse.Namespace) -> None:
    """Here, before a GPU run: .gpu/tokenizers/<model>/tokenizer.json.xz and .gpu/corpus.jsonl.xz (the first
    `--corpus-chars` characters of the default corpus), both carried with the call."""
    from aimri.data.default_corpus import default_corpus_path

    dest = Path(args.out)
    done: dict[str, object] = {}
    for name in MODELS:
        source = _converted(name)
        config = json.loads((source / "config.json").read_text())
        shape = json.loads((SHAPES / name / "config.json").read_text())
        differs = [
            k
            for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
            if config.get(k) != shape.get(k)
        ]
        if differs:
            raise SystemExit(f"{source}/config.json differs from {SHAPES / name}/config.json in {differs}")
        target = dest / "tokenizers" / name / "tokenizer.json.xz"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(lzma.compress((source / "tokenizer.json").read_bytes(), preset=9))
        done[name] = target.stat().st_size
    lines, chars = [], 0
    with open(default_corpus_path(log=log)) as f:
        for line in f:
            lines.append(line)
            chars += len(json.loads(line)["text"])
            if chars >= args.corpus_chars:
                break
    corpus = dest / "corpus.jsonl.xz"
    corpus.write_bytes(lzma.compress("".join(lines).encode(), preset=9))
    done["corpus"] = corpus.stat().st_size
    out({"prepared": str(dest), "bytes": done, "corpus_chars": chars})


# -- models ----------------------------------------------------------------------------------------------------
def _real(name: str) -> Path | None:
    """A real copy of the model under $AIMRI_GPU_MODELS: an HF directory or a .gguf, by the usual names."""
    root = os.environ.get("AIMRI_GPU_MODELS")
    if not root:
        return None
    for folder in REAL_NAMES[name][:2]:
        if (Path(root) / folder / "config.json").exists():
            return Path(root) / folder
    ggufs = sorted(Path(root).glob(REAL_NAMES[name][2])) + sorted(Path(root).glob(REAL_NAMES[name][2].lower()))
    return ggufs[0] if ggufs else None


def _smoke_config(config: dict) -> dict:
    """The same architecture at toy size (2 layers, width 64), for the CPU smoke run."""
    small = dict(config, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)  # fmt: skip
    if "layer_types" in config:
        small["layer_types"] = [*config["layer_types"][:1], "full_attention"]
    if "query_pre_attn_scalar" in config:
        small["query_pre_attn_scalar"] = 32
    return small


def _trained_tokenizer(name: str, corpus: Path, vocab: int, dest: Path) -> None:
    """A byte-level BPE trained on the corpus, with the model's special tokens at its ids (fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 16384), special_tokens=SPECIALS[name],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip

    def texts():  # type: ignore[no-untyped-def]
        with open(corpus) as f:
            for line in f:
                yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer)
    tok.save(str(dest / "tokenizer.json"))


def models(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found: dict[str, dict] = {}
    for name in args.names.split(","):
        shape = json.loads((SHAPES / name / "config.json").read_text())
        real = None if args.smoke else _real(name)
        if real is not None:
            if real.is_file():  # a GGUF: aimri converts it (once, cached under $AIMRI_HOME)
                from aimri.subject.loading import gguf_to_dir

                real = gguf_to_dir(real)
            config = json.loads((real / "config.json").read_text())
            found[name] = {"path": str(real), "weights": "real", "tokenizer": "real"}
        else:
            config = _smoke_config(shape) if args.smoke else shape
            folder = dest / f"{name}-random"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            torch.manual_seed(0)
            start = time.perf_counter()
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            with torch.device(device):  # initialise where it is fast
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
            model.save_pretrained(folder)
            del model
            shutil.copy(SHAPES / name / "tokenizer_config.json", folder / "tokenizer_config.json")
            packed = Path(args.tokenizers) / name / "tokenizer.json.xz"
            if packed.exists():
                (folder / "tokenizer.json").write_bytes(lzma.decompress(packed.read_bytes()))
                tokenizer = "real"
            else:
                _trained_tokenizer(name, Path(args.corpus), config["vocab_size"], folder)
                tokenizer = "trained-bpe"
            found[name] = {"path": str(folder), "weights": "random", "tokenizer": tokenizer,
                           "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        found[name].update(layers=config["num_hidden_layers"], d_model=config["hidden_size"],
                           site=f"resid.{config['num_hidden_layers'] // 2}")  # fmt: skip
    out(found)


# -- corpus ----------------------------------------------------------------------------------------------------
def corpus(args: argparse.Namespace) -> None:
    """A JSONL corpus of at least --chars characters: the carried slice of the default corpus where there is
    one, else this repository's own text (docs, code); repeated with shuffled paragraphs when short (so the
    repeats are new contexts, not the same windows again)."""
    packed = Path(args.slice)
    if packed.exists():
        docs = [json.loads(line)["text"] for line in lzma.decompress(packed.read_bytes()).decode().splitlines()]
        source = "default-corpus-slice"
    else:
        docs = []
        for path in sorted(ROOT.glob("**/*")):
            if (
                path.suffix in (".md", ".py")
                and path.is_file()
                and not any(p.startswith(".") for p in path.relative_to(ROOT).parts)
            ):
                text = path.read_text(errors="ignore")
                docs += [text[i : i + 2000] for i in range(0, len(text), 2000)]
        source = "repository-text"
    rng = random.Random(0)
    written, rounds = [], 0
    total = 0
    while total < args.chars and docs:
        batch = list(docs)
        if rounds:  # later rounds: paragraphs shuffled within and across documents
            paragraphs = [p for d in batch for p in re.split(r"\n\s*\n", d) if p.strip()]
            rng.shuffle(paragraphs)
            batch = ["\n\n".join(paragraphs[i : i + 6]) for i in range(0, len(paragraphs), 6)]
        for text in batch:
            written.append(json.dumps({"text": text}))
            total += len(text)
        rounds += 1
    Path(args.out).write_text("\n".join(written) + "\n")
    out({"corpus": args.out, "source": source, "chars": total, "documents": len(written), "rounds": rounds})


# -- transcoders -----------------------------------------------------------------------------------------------
def make_transcoders(model_dir: Path, folder: Path, width: int, k: int) -> dict:
    """Random TopK transcoders mlp.in.L -> mlp.out.L for every layer of the HF model at `model_dir`, recorded
    as trained on it (so aimri's load_transcoders accepts them, and circuit-tracer reads the same files).
    Attribution's cost depends on the shapes and k, not on what the features mean."""
    import torch

    from aimri.dictionaries import DictionaryConfig
    from aimri.dictionaries.base import build
    from aimri.dictionaries.formats import save_dictionary
    from aimri.run import Run
    from aimri.subject.loading import dir_revision
    from aimri.subject.names import model_name

    config = json.loads((model_dir / "config.json").read_text())
    d, n_layers = config["hidden_size"], config["num_hidden_layers"]
    revision, name = dir_revision(model_dir), model_name(str(model_dir))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for layer in range(n_layers):
        cfg = DictionaryConfig("topk", d, width, d_out=d, k=k, site=f"mlp.in.{layer}",
                               site_out=f"mlp.out.{layer}", model_name=name, model_revision=revision)  # fmt: skip
        tc = build(cfg)
        tc.reset_parameters(generator)
        save_dictionary(tc, Run.transcoder_layer(folder, layer))
    return {"transcoders": str(folder), "layers": n_layers, "width": width, "k": k,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def transcoders(args: argparse.Namespace) -> None:
    out(make_transcoders(Path(args.model), Path(args.out), args.width, args.k))


# -- peak ------------------------------------------------------------------------------------------------------
def peak(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(BENCH))
    from common import device_label, gemm_gflops, peak_gflops

    if torch.cuda.is_available():
        device = torch.device("cuda")
        rates = [peak_gflops(device, torch.bfloat16) for _ in range(2)]  # the better of two: clocks ramp up
        out({"peak_gflops": round(max(rates), 1), "dtype": "bfloat16", "n": 8192, "device": device_label(device)})
    else:  # the CPU: the fp32 rate (bf16 is emulated on most CPUs), as bench/common.py's gemm_gflops
        sizes = (256, 512) if args.smoke else (1024, 2048, 3072)
        out(
            {
                "peak_gflops": round(gemm_gflops(sizes), 1),
                "dtype": "float32",
                "device": device_label(torch.device("cpu")),
            }
        )


# -- cuda tests ------------------------------------------------------------------------------------------------
def pytest(args: argparse.Namespace) -> None:
    """pytest ARGS; the counts from its summary line as JSON (its output goes to stderr)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", *args.rest], capture_output=True, text=True, cwd=ROOT)
    sys.stderr.write(done.stdout[-20000:] + done.stderr[-5000:])
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped", "deselected")}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", tail):
        counts["errors" if word.startswith("error") else word] += int(number)
    failed = [
        line.split(" ", 1)[1].split(" - ")[0]
        for line in done.stdout.splitlines()
        if line.startswith(("FAILED ", "ERROR "))
    ]
    out({**counts, "returncode": done.returncode, "summary": tail[-300:], "failures": failed[:20],
         "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip


# -- peers -----------------------------------------------------------------------------------------------------
def check_peers(args: argparse.Namespace) -> None:
    """Import each peer's modules in its own environment (bench/common.py's peer_env): 'ok' or why not."""
    sys.path.insert(0, str(BENCH))
    from common import peer_env, peer_python

    found: dict[str, str] = {}
    running = {}
    for peer, statement in PEER_IMPORTS.items():  # all at once: each is a cold Python importing torch
        try:
            python = peer_python(peer)
        except RuntimeError as err:
            found[peer] = f"not installed: {err}"
            continue
        running[peer] = subprocess.Popen([str(python), "-c", statement], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=peer_env(peer), cwd=BENCH / "peers")  # fmt: skip
    for peer, proc in running.items():
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            found[peer] = f"import did not finish in {args.timeout:.0f} s"
            continue
        lines = (stdout.strip() or "ok").splitlines()
        err = [line for line in stderr.strip().splitlines() if line.strip()]
        found[peer] = (
            f"ok ({lines[-1]})"
            if proc.returncode == 0
            else f"import failed: {err[-1][:300] if err else proc.returncode}"
        )
    out(found)


# -- report ----------------------------------------------------------------------------------------------------
def _load(path: Path) -> dict | None:
    """The last line of a section's stdout that parses as a JSON object."""
    if not path.exists():
        return None
    for line in reversed(path.read_text().strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def report(args: argparse.Namespace) -> None:
    """The run's one JSON line. Ratios: harvest_ratio = our harvest tok/s / nnsight's; train_ratio_X = our
    training tok/s / X's; attribution_ratio = circuit-tracer's seconds / ours (each > 1 means we are faster).

    roofline_ratio (top level and per model): our TopK training's useful FLOP/s over the bf16 GEMM peak
    measured in this run (an 8192^3 bf16 torch.mm on random data, best of two means of ten; on the CPU smoke,
    the fp32 GEMM rate). Useful FLOPs per token are bench/train.py's count: the dense encoder GEMM
    (2 d width) plus the k-row sparse work (8 k d: decode, and the three sparse backward products), so the
    ratio is the share of the chip's matrix peak the trainer turns into that work; harvest_roofline_ratio is
    the same for the harvest (bench/harvest.py: the blocks' Linear and attention FLOPs up to the site)."""
    work = Path(args.work)
    sec = work / "out"
    skipped = {p.name: p.read_text().strip() for p in sorted((work / "skipped").glob("*"))}
    timings = {p.name: float(p.read_text()) for p in sorted((work / "seconds").glob("*"))}
    peak_info = _load(sec / "peak.json") or {}
    models_info = _load(sec / "models.json") or {}
    tests = _load(sec / "cuda_tests.json")
    peers = _load(sec / "peers.json") or {}
    per_model: dict[str, dict] = {}
    for name in MODELS:
        h, t, a = (_load(sec / f"{name}-{s}.json") or {} for s in ("harvest", "train", "trace"))
        info = models_info.get(name, {})
        row = {
            "weights": info.get("weights"), "tokenizer": info.get("tokenizer"), "site": info.get("site"),
            "harvest_tok_s_ours": h.get("tokens_per_s"), "harvest_tok_s_ours_forward_only": h.get("tokens_per_s_forward_only"),
            "harvest_tok_s_nnsight": h.get("nnsight_tokens_per_s"),
            "harvest_ratio": _ratio(h.get("tokens_per_s"), h.get("nnsight_tokens_per_s")),
            "harvest_nnsight_checksum_rel_diff": h.get("nnsight_checksum_rel_diff"),
            "harvest_roofline_ratio": h.get("roofline_ratio"), "harvest_tokens": h.get("tokens"),
            "train_tok_s_ours": t.get("tokens_per_s"), "train_tok_s_sparsify": t.get("sparsify_tokens_per_s"),
            "train_tok_s_sae_lens": t.get("sae_lens_tokens_per_s"),
            "train_fvu_ours": t.get("fvu"), "train_fvu_sparsify": t.get("fvu_sparsify"), "train_fvu_sae_lens": t.get("fvu_sae_lens"),
            "train_ratio_sparsify": _ratio(t.get("tokens_per_s"), t.get("sparsify_tokens_per_s")),
            "train_ratio_sae_lens": _ratio(t.get("tokens_per_s"), t.get("sae_lens_tokens_per_s")),
            "roofline_ratio": t.get("roofline_ratio"), "train_select_dtype": t.get("select_dtype"),
            "train_width": t.get("width"), "train_k": t.get("k"), "train_tokens": t.get("train_tokens"),
            "attribution_s_ours": a.get("attribution_s_ours"), "attribution_s_circuit_tracer": a.get("attribution_s_circuit_tracer"),
            "attribution_ratio": _ratio(a.get("attribution_s_circuit_tracer"), a.get("attribution_s_ours")),
            "attribution_edge_agreement": a.get("circuit_tracer_edge_agreement"), "attribution_prompt_tokens": a.get("peer_length"),
            "attribution_max_feature_nodes": a.get("max_feature_nodes"),
            "attribution_peak_mb_ours": a.get("attribution_peak_mb_ours"), "attribution_peak_mb_circuit_tracer": a.get("circuit_tracer_peak_mb"),
        }  # fmt: skip
        errors = {f"{section}_{k.removeprefix('error_')}": v for section, d in (("harvest", h), ("train", t), ("attribution", a))
                  for k, v in d.items() if k.startswith("error_") and v}  # fmt: skip
        for key, why in errors.items():
            skipped[f"{name}-{key}"] = str(why)[-400:]
        per_model[name] = row
    smol = per_model[MODELS[0]]

    def goal(value: float | None, at_least: float, extra: bool = True) -> bool | None:
        return None if value is None else bool(value >= at_least and extra)

    fvu_ok = (
        None
        if smol["train_fvu_ours"] is None or smol["train_fvu_sparsify"] is None
        else smol["train_fvu_ours"] <= smol["train_fvu_sparsify"]
    )
    result = {
        "roofline_ratio": smol["roofline_ratio"],
        **{k: v for k, v in smol.items() if k.startswith(("harvest_", "train_", "attribution_"))},
        "weights": smol["weights"],
        "goals": {
            "train_ge_2x_sparsify_at_le_fvu": goal(smol["train_ratio_sparsify"], 2.0, bool(fvu_ok)),
            "harvest_ge_1x_nnsight": goal(smol["harvest_ratio"], 1.0),
            "attribution_ge_2x_circuit_tracer": goal(smol["attribution_ratio"], 2.0),
        },
        "models": per_model,
        "cuda_tests": tests and {k: tests.get(k) for k in ("passed", "failed", "errors", "skipped", "deselected", "failures", "seconds")},
        "peers": peers,
        "peak_gflops": peak_info.get("peak_gflops"), "peak_dtype": peak_info.get("dtype"), "device": peak_info.get("device"),
        "smoke": args.smoke, "budget_s": args.budget, "wall_s": round(time.time() - args.start, 1) if args.start else None,
        "section_s": timings, "skipped": skipped,
    }  # fmt: skip
    print(json.dumps(result, separators=(",", ":")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    p.add_argument("--corpus-chars", type=int, default=4_000_000)
    p = sub.add_parser("models")
    p.add_argument("--out", required=True)
    p.add_argument("--names", default=",".join(MODELS))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--tokenizers", default=str(ROOT / ".gpu" / "tokenizers"))
    p.add_argument("--corpus", default="", help="the corpus a fallback tokenizer is trained on")
    p = sub.add_parser("corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--chars", type=int, default=3_000_000)
    p.add_argument("--slice", default=str(ROOT / ".gpu" / "corpus.jsonl.xz"))
    p = sub.add_parser("transcoders")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p = sub.add_parser("peak")
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("pytest")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("check-peers")
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--budget", type=float, default=0)
    p.add_argument("--start", type=float, default=0)
    p.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.command == "pytest" and args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    {"prepare": prepare, "models": models, "corpus": corpus, "transcoders": transcoders, "peak": peak,
     "pytest": pytest, "check-peers": check_peers, "report": report}[args.command](args)  # fmt: skip


if __name__ == "__main__":
    main()
