"""Scale-out under torchrun with 2 CPU ranks (gloo): the distributed store holds exactly the single-process
store's rows, data-parallel training matches single-process training, a killed rank leaves a store that
resumes, mismatched world sizes and revisions are refused; accelerate offload keeps taps working."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import FIXTURE_TEXT
from transformers import PreTrainedModel

import aimri
from aimri.data.store import ActivationStore

ARGS = [
    "--site",
    "resid.1",
    "--site",
    "mlp.out.2",
    "--context",
    "32",
    "--batch-size",
    "2",
    "--max-tokens",
    "0",
    "--quiet",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = FIXTURE_TEXT.strip().splitlines()
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": " ".join(lines[i % 5 :] + lines[: i % 5])}) + "\n")
    return path


def _command(args: tuple[str, ...], nproc: int) -> list[str]:
    return [sys.executable, "-m", "aimri.cli", *args] + (["--nproc", str(nproc)] if nproc > 1 else [])


def mri(*args: str, nproc: int = 1) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(_command(args, nproc), env=env, capture_output=True, text=True, timeout=300)


def mri_background(*args: str, nproc: int, tag: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AIMRI_TEST_TAG": tag}
    return subprocess.Popen(_command(args, nproc), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def harvest(
    model: str, corpus: Path, out: Path, nproc: int = 1, per_shard: int = 4
) -> subprocess.CompletedProcess[str]:
    return mri("harvest", model, "--corpus", str(corpus), "--out", str(out), "--windows-per-shard", str(per_shard),
               *ARGS, nproc=nproc)  # fmt: skip


@pytest.fixture(scope="module")
def single_store(tiny_lm_dir: str, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "store"
    done = harvest(tiny_lm_dir, corpus, out)
    assert done.returncode == 0, done.stderr
    return out


def test_distributed_store_holds_exactly_the_single_process_rows(
    tiny_lm_dir: str, corpus: Path, single_store: Path, tmp_path: Path
) -> None:
    done = harvest(tiny_lm_dir, corpus, tmp_path / "store", nproc=2)
    assert done.returncode == 0, done.stderr
    ref, dist = ActivationStore(single_store), ActivationStore(tmp_path / "store")
    assert dist.complete and dist.verify() == [] and dist.manifest["summary"]["ranks"] == 2
    assert len(dist.shards) == len(ref.shards) > 4
    assert [s["files"] for s in dist.shards] == [s["files"] for s in ref.shards]  # byte-identical shards
    assert dist.rows == ref.rows and not (tmp_path / "store" / "ranks").exists()
    for key in ("tokens_forwarded", "sinks_excluded"):
        assert dist.manifest["summary"][key] == ref.manifest["summary"][key]


def test_data_parallel_training_matches_single_process(tiny_lm_dir: str, single_store: Path, tmp_path: Path) -> None:
    common = ["train", str(single_store), "--site", "resid.1", "--width", "64", "--k", "4", "--tokens", "7680",
              "--batch-size", "256", "--quiet"]  # fmt: skip
    one = mri(*common, "--out", str(tmp_path / "one"))
    two = mri(*common, "--out", str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (
        load_file(tmp_path / "one" / "sae_weights.safetensors"),
        load_file(tmp_path / "two" / "sae_weights.safetensors"),
    )
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        scale = float(a[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) < 1e-2 * scale, name  # summation order only
    untrained = torch.nn.init.kaiming_uniform_(torch.empty_like(a["W_dec"]))
    assert float((a["W_dec"] - untrained).abs().max()) > 0.1 * float(a["W_dec"].abs().max())
    info = json.loads((tmp_path / "two" / "training.json").read_text())
    assert info["ranks"] == 2 and info["step"] == 30
    odd = mri(*common[:-3], "--batch-size", "255", "--quiet", "--out", str(tmp_path / "odd"), nproc=2)
    assert odd.returncode != 0 and "multiple of the 2 ranks" in odd.stderr
    streamed = mri("train", tiny_lm_dir, "--site", "resid.1", "--out", str(tmp_path / "streamed"), nproc=2)
    assert streamed.returncode != 0 and "data-parallel training reads an activation store" in streamed.stderr


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among processes started with AIMRI_TEST_TAG=tag."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = f"AIMRI_TEST_TAG={tag}".encode() in environ and f"RANK={rank}".encode() in environ
        if ours and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
            return int(entry.name)
    return None


def test_killed_rank_leaves_a_store_that_resumes(
    tiny_lm_dir: str, corpus: Path, single_store: Path, tmp_path: Path
) -> None:
    out, tag = tmp_path / "store", uuid.uuid4().hex
    small = tmp_path / "small.jsonl"  # ~250 one-window shards: long enough to kill a rank midway
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:40]))
    corpus = small
    proc = mri_background("harvest", tiny_lm_dir, "--corpus", str(corpus), "--out", str(out), "--windows-per-shard",
                          "1", *ARGS, nproc=2, tag=tag)  # fmt: skip
    record, deadline, killed = out / "ranks" / "rank-1.json", time.time() + 120, False
    while time.time() < deadline and proc.poll() is None:
        if record.exists() and len(json.loads(record.read_text() or "{}").get("shards", [])) >= 2:
            pid = _rank_pid(tag, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert killed, "the harvest finished before a rank could be killed"
    assert proc.returncode != 0
    assert "rank 0" in err and "finished work is kept" in err  # the survivor stops with one line
    partial = ActivationStore(out)
    assert not partial.complete and partial.shards == []  # nothing merged: the ranks' records hold the work
    info = json.loads(mri("store", "info", str(out)).stdout)
    assert info["ranks"] == 2 and info["shards_by_rank"]["rank-1"] >= 2
    refused = harvest(tiny_lm_dir, corpus, out, per_shard=1)  # resume with another world size
    assert refused.returncode == 2 and "harvested by 2 rank(s) and this run has 1" in refused.stderr
    resumed = harvest(tiny_lm_dir, corpus, out, nproc=2, per_shard=1)
    assert resumed.returncode == 0, resumed.stderr
    ref = harvest(tiny_lm_dir, corpus, tmp_path / "ref", per_shard=1)
    assert ref.returncode == 0, ref.stderr
    store, full = ActivationStore(out), ActivationStore(tmp_path / "ref")
    assert store.complete and store.verify() == []
    assert [s["files"] for s in store.shards] == [s["files"] for s in full.shards]
    assert not any(p.name.startswith(".shard-") for p in out.iterdir())


def test_ranks_with_different_models_are_refused(tiny_lm_dir: str, corpus: Path, tmp_path: Path) -> None:
    """Rank 1 loads a retrained copy (another revision): refused before anything is written."""
    other = tmp_path / "other"
    subject = aimri.load(tiny_lm_dir)
    layer, model = subject.layer(0), subject.model
    assert isinstance(model, PreTrainedModel)
    with torch.no_grad():
        getattr(layer.mlp, "up_proj").weight.mul_(1.01)  # noqa: B009
    model.save_pretrained(other)
    subject.tokenizer.save_pretrained(other)
    script = (
        "import os, sys; from aimri.cli import main; "
        f"sys.argv[2] = {str(other)!r} if os.environ['RANK'] == '1' else sys.argv[2]; main()"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               sys.executable, "-c", script, "harvest", tiny_lm_dir, "--corpus", str(corpus), "--out",
               str(tmp_path / "store"), *ARGS]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode != 0
    assert "ranks disagree on the harvest" in done.stderr
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_transcoder_layers_placed_on_ranks(tiny_lm_dir: str, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tc"
    done = mri("train-transcoders", tiny_lm_dir, "--corpus", str(corpus), "--out", str(out), "--width", "32",
               "--k", "4", "--tokens", "2048", "--batch-size", "128", "--context", "32", "--quiet", nproc=2)  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["layers"]) == ["0", "1", "2"]
    assert all((out / f"layer-{layer}" / "sae_weights.safetensors").exists() for layer in range(3))
    assert all(m["fvu"] < 1.0 for m in metrics["layers"].values())
    assert sorted(p.name for p in (out / ".checkpoints").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]


def test_offloaded_model_keeps_taps_working(tiny_lm_dir: str, tmp_path: Path) -> None:
    """Half the layers offloaded to disk with accelerate's device_map: reads and edits equal the plain model's."""
    plain = aimri.load(tiny_lm_dir)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    offloaded = aimri.load(tiny_lm_dir, device_map=device_map, offload_folder=tmp_path / "offload")
    assert getattr(offloaded.model, "hf_device_map")["model.layers.2"] == "disk"  # noqa: B009
    ids = torch.tensor([[0, 5, 9, 12, 40, 7, 3, 22]])
    reads = ["resid.0", "mlp.out.1", "resid.2", "attn.out.2"]
    a, b = plain.run(ids, read=reads), offloaded.run(ids, read=reads)
    for site in reads:
        torch.testing.assert_close(a[site], b[site], rtol=1e-5, atol=1e-5)
    edit = {"resid.1": torch.zeros(plain.d_model)}
    edited_a = plain.run(ids, read=["resid.2"], edit=edit, stop=False)
    edited_b = offloaded.run(ids, read=["resid.2"], edit=edit, stop=False)
    torch.testing.assert_close(edited_a["logits"], edited_b["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited_a["resid.2"], a["resid.2"])  # the edit did something


def test_clt_trains_data_parallel(tiny_lm_dir: str, corpus: Path, tmp_path: Path) -> None:
    """`mri train-clt --nproc 2`: each rank streams its half of every batch, gradients are averaged, rank 0 saves
    (metrics.json records the ranks); a batch the ranks cannot split is refused."""
    common = ["train-clt", tiny_lm_dir, "--corpus", str(corpus), "--width", "32", "--k", "4", "--tokens", "2048",
              "--batch-size", "128", "--context", "32", "--quiet"]  # fmt: skip
    two = mri(*common, "--out", str(tmp_path / "clt"), nproc=2)
    assert two.returncode == 0, two.stderr
    record = json.loads((tmp_path / "clt" / "metrics.json").read_text())
    assert record["ranks"] == 2 and record["steps"] == 16 and (tmp_path / "clt" / "clt.json").exists()
    odd = mri(*common[:-3], "--batch-size", "127", "--quiet", "--out", str(tmp_path / "odd"), nproc=2)
    assert odd.returncode != 0 and "multiple of the 2 ranks" in odd.stderr
