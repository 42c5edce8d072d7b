"""Devices, dtypes and memory planning (aimri.devices): every device branch that can run on a CPU runs here —
the choice of device and dtype and their one-line refusals, the model in bf16 through harvest -> store ->
training -> evaluation, the CUDA weight-gradient kernel against the CPU one, refusal before work when a job
will not fit, and an out-of-memory error mid-harvest that keeps the finished shards and resumes. Tests marked
`cuda` compare a GPU run with the CPU reference and run only where torch sees CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import FIXTURE_TEXT

import aimri
import aimri.devices as devices
from aimri.data.corpus import Corpus
from aimri.data.harvest import harvest, harvest_plan
from aimri.data.store import ActivationStore
from aimri.devices import DeviceError, Plan, out_of_memory, resolve_device, resolve_dtype
from aimri.dictionaries import sparse
from aimri.dictionaries.config import DictionarySettings
from aimri.dictionaries.match import check_dtype
from aimri.dictionaries.sparse import topk_autoencode
from aimri.dictionaries.train import train_from_store
from aimri.errors import AimriError

SITE = "resid.1"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    lines = FIXTURE_TEXT.strip().splitlines()
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(lines[i % 5 :] + lines[: i % 5])}) + "\n" for i in range(60)))
    return Corpus.from_paths([path])


def _harvest(subject, corpus: Corpus, out: Path, **kw) -> ActivationStore:
    kw = {"context": 32, "batch_size": 4, "windows_per_shard": 8, "progress": False, **kw}
    return harvest(subject, corpus, [SITE], out, **kw)


# -- choosing the device and the dtype ------------------------------------------------------------------------------
def test_auto_device_and_dtype_follow_what_torch_sees() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32  # bf16 matmul is emulated on most CPUs
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("half", torch.device("cpu")) is torch.float16
    assert resolve_dtype(torch.float32, torch.device("cpu")) is torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_saying_what_was_found() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=r"no CUDA device found \(torch .* sees cpu\); use --device cpu"):
            resolve_device(name)


@pytest.mark.parametrize(
    ("device", "dtype", "says"),
    [
        ("tpu", None, "device 'tpu' is not one AI MRI knows"),
        ("cpu", "int8", "dtype 'int8' is not one a model runs in"),
        ("cpu", torch.int32, "dtype torch.int32 is not one a model runs in"),
    ],
)
def test_unknown_device_or_dtype_is_refused(device, dtype, says) -> None:
    with pytest.raises(DeviceError, match=says):
        resolve_dtype(dtype, resolve_device(device))


def test_a_dtype_the_device_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.ones

    def no_half(*args, **kw):  # a device without float16 kernels, as torch reports one
        if kw.get("dtype") is torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real(*args, **kw)

    monkeypatch.setattr(torch, "ones", no_half)
    with pytest.raises(DeviceError, match=r"--dtype float16 cannot run on cpu \(.*Half.*\); use --dtype float32"):
        resolve_dtype("float16", torch.device("cpu"))


def test_cli_device_and_dtype_errors_are_one_line(tiny_lm_dir: str) -> None:
    mri = str(Path(sys.executable).with_name("mri"))
    cases = [(["--dtype", "int8"], "dtype 'int8' is not one a model runs in")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device found"))
    for args, says in cases:
        done = subprocess.run(
            [mri, "harvest", tiny_lm_dir, *args, "--quiet"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- the model in bf16 through the pipeline (the dtype plumbing, on the CPU) ---------------------------------------------
def test_bf16_model_harvest_records_its_dtype_and_trains(tiny_lm_dir: str, corpus: Corpus, tmp_path: Path) -> None:
    fp32 = aimri.load(tiny_lm_dir, device="cpu")
    bf16 = aimri.load(tiny_lm_dir, device="cpu", dtype="bfloat16")
    assert bf16.dtype is torch.bfloat16 and bf16.device == torch.device("cpu")
    ref = _harvest(fp32, corpus, tmp_path / "fp32", max_tokens=512)
    low = _harvest(bf16, corpus, tmp_path / "bf16", max_tokens=512)
    assert ref.spec["model"]["dtype"] == "float32" and low.spec["model"]["dtype"] == "bfloat16"
    a, b = (np.concatenate(list(s.activations(SITE))) for s in (ref, low))
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 1e-4 < rel < 0.05, rel  # bf16's rounding: there, and small

    settings = DictionarySettings(width=32, k=4, tokens=2048, batch_size=128, heldout_shards=1)
    path, last = train_from_store(low.path, SITE, tmp_path / "sae", settings, progress=False, device="cpu")
    cfg = json.loads((path / "cfg.json").read_text())["aimri"]
    assert cfg["model_dtype"] == "bfloat16" and np.isfinite(last["fvu"])
    from aimri.dictionaries import load_dictionary

    sae = load_dictionary(path)
    # a store at least as precise: read as fp32, with a note; a less precise one than the training rows: refused
    assert "read as float32" in check_dtype(ref, sae)
    sae.cfg.model_dtype = "float32"
    with pytest.raises(AimriError, match=r"rounded to bfloat16, but the dictionary was trained on float32 ones"):
        check_dtype(low, sae)
    half_on_disk = _harvest(fp32, corpus, tmp_path / "fp16-disk", max_tokens=512, dtype="float16")
    with pytest.raises(AimriError, match=r"rounded to float16, .* `--dtype float32 --store-dtype float32`"):
        check_dtype(half_on_disk, sae)  # an fp32 model's rows written in fp16 are fp16's rounding too
    sae.cfg.model_dtype = "float16"
    with pytest.raises(AimriError, match="rounded to bfloat16, but the dictionary was trained on float16"):
        check_dtype(low, sae)  # bf16 keeps 7 mantissa bits, fp16 10
    sae.cfg.model_dtype = ""  # not recorded (an older or a foreign file): nothing to compare
    assert check_dtype(low, sae) == ""


def test_store_from_before_the_dtype_was_recorded_resumes_with_its_batch_size(
    tiny_lm_dir: str, corpus: Corpus, tmp_path: Path
) -> None:
    subject = aimri.load(tiny_lm_dir, device="cpu")
    store = _harvest(subject, corpus, tmp_path / "store", max_tokens=512)
    manifest = json.loads((store.path / "manifest.json").read_text())
    del manifest["spec"]["model"]["dtype"]
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]  # interrupted after one shard
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    again = _harvest(subject, corpus, tmp_path / "store", max_tokens=512, batch_size=None)  # the recorded 4
    assert again.complete and [s["files"] for s in again.shards] == [s["files"] for s in store.shards]
    with pytest.raises(AimriError, match="batch_size: store has 4, this run has 2"):  # it decides the sinks
        _harvest(subject, corpus, tmp_path / "store", max_tokens=512, batch_size=2)
    with pytest.raises(AimriError, match="model.dtype: store has float32, this run has bfloat16"):
        _harvest(aimri.load(tiny_lm_dir, device="cpu", dtype="bf16"), corpus, tmp_path / "store", max_tokens=512)


# -- the training kernels: the CUDA path's gradients equal the CPU path's ----------------------------------------------
@pytest.mark.parametrize("centre", [True, False])
def test_index_add_kernel_matches_csr_kernel(centre: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_sae, k, n = 24, 96, 6, 300
    x = torch.randn(n, d_in, generator=g)
    weights = {
        "W_enc": torch.randn(d_sae, d_in, generator=g).t() * 0.3,  # stored latent-major, as the Trainer keeps it
        "b_enc": torch.randn(d_sae, generator=g) * 0.1 + 0.2,
        "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    target = torch.randn(n, d_in, generator=g)
    results = {}
    for kernel in sparse.KERNELS:
        monkeypatch.setattr(sparse, "FORCE_KERNEL", kernel)
        params = {name: w.clone().requires_grad_(True) for name, w in weights.items()}
        xi = x.clone().requires_grad_(True)
        recon, _vals, idx, _ = topk_autoencode(
            xi, params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], k, centre
        )
        (recon - target).pow(2).sum().backward()
        results[kernel] = (recon.detach(), idx, {n_: p.grad for n_, p in params.items()}, xi.grad)
    (r1, i1, g1, x1), (r2, i2, g2, x2) = results.values()
    assert torch.equal(i1, i2) and torch.allclose(r1, r2)
    for name in weights:  # the same sums in another order: equal to fp32 rounding
        assert (g1[name] - g2[name]).norm() <= 1e-5 * g1[name].norm(), name
    assert (x1 - x2).norm() <= 1e-5 * x1.norm()
    assert sparse.kernel_for(torch.device("cuda")) == sparse.FORCE_KERNEL  # forced here; unforced: by device
    monkeypatch.setattr(sparse, "FORCE_KERNEL", None)
    assert sparse.kernel_for(torch.device("cpu")) == "csr" and sparse.kernel_for(torch.device("cuda")) == "index_add"


# -- memory planning -------------------------------------------------------------------------------------------------
def test_plan_refuses_with_the_numbers_and_the_setting_that_fits() -> None:
    plan = Plan("training", torch.device("cpu"), "`batch_size`", 4096, per_unit=1 << 20, fixed={"weights": 1 << 30})
    plan.check(free=8 << 30)  # fits
    with pytest.raises(DeviceError) as err:
        plan.check(free=3 << 30)
    text = str(err.value)
    assert "training needs about 5.00 GiB on cpu but 3.00 GiB is free" in text
    assert "lower `batch_size` to 1740 or less" in text and "\n" not in text
    with pytest.raises(DeviceError, match="even one unit does not fit"):
        plan.check(free=1 << 30)
    assert (
        plan.default_units(cap=64, free=8 << 30) == 64 and plan.default_units(cap=64, free=(2 << 30) + (40 << 20)) == 20
    )


def test_out_of_memory_becomes_one_line_and_other_errors_pass() -> None:
    plan = Plan("the harvest", torch.device("cpu"), "`batch_size`", 8, per_unit=1e6)
    for oom in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
                RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")):  # fmt: skip
        with (
            pytest.raises(
                DeviceError, match=r"ran out of memory on cpu .*lower `batch_size` \(e.g. to 4\); shards kept"
            ),
            out_of_memory(plan, "shards kept"),
        ):
            raise oom
    with pytest.raises(RuntimeError, match="shape mismatch"), out_of_memory(plan):
        raise RuntimeError("shape mismatch")


def test_harvest_that_will_not_fit_is_refused_before_work(
    tiny_lm_dir: str, corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = aimri.load(tiny_lm_dir, device="cpu")
    need = harvest_plan(subject, 32, 4).peak
    monkeypatch.setattr(devices, "free_memory", lambda device: int(need * 0.6))  # 0.9 x free: 2 windows, not 4
    with pytest.raises(DeviceError, match=r"the harvest needs about .* lower `batch_size` to 2 or less"):
        _harvest(subject, corpus, tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()
    store = _harvest(subject, corpus, tmp_path / "auto", batch_size=None, max_tokens=256)  # default: what fits
    assert store.complete


def test_out_of_memory_mid_harvest_keeps_shards_and_resumes(
    tiny_lm_dir: str, corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = aimri.load(tiny_lm_dir, device="cpu")
    ref = _harvest(subject, corpus, tmp_path / "ref")
    real, calls = subject.run, [0]

    def run_then_fail(*args, **kw):
        calls[0] += 1
        if calls[0] == 5:  # the third shard's first batch (two batches a shard)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(subject, "run", run_then_fail)
    with pytest.raises(DeviceError, match="the harvest ran out of memory on cpu.*finished shards are kept"):
        _harvest(subject, corpus, tmp_path / "store")
    kept = ActivationStore(tmp_path / "store")
    assert not kept.complete and len(kept.shards) == 2
    monkeypatch.setattr(subject, "run", real)
    resumed = _harvest(subject, corpus, tmp_path / "store")
    assert [s["files"] for s in resumed.shards] == [s["files"] for s in ref.shards]  # identical checksums


def test_training_that_will_not_fit_is_refused_before_work(
    tiny_lm_dir: str, corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _harvest(aimri.load(tiny_lm_dir, device="cpu"), corpus, tmp_path / "store", max_tokens=512)
    monkeypatch.setattr(devices, "free_memory", lambda device: 1 << 20)
    settings = DictionarySettings(width=4096, k=4, tokens=2048, batch_size=128)
    with pytest.raises(
        DeviceError, match=r"training needs about .* but 0.00 GiB is free .*weights, gradients and Adam"
    ):
        train_from_store(store.path, SITE, tmp_path / "sae", settings, progress=False, device="cpu")
    assert not (tmp_path / "sae").exists()


# -- on a GPU: the same results as the CPU reference ------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_cuda_taps_and_harvest_equal_the_cpu_reference(tiny_lm_dir: str, corpus: Corpus, tmp_path: Path) -> None:
    cpu = aimri.load(tiny_lm_dir, device="cpu")
    gpu = aimri.load(tiny_lm_dir, device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _harvest(cpu, corpus, tmp_path / "cpu", max_tokens=512)
    got = _harvest(gpu, corpus, tmp_path / "gpu", max_tokens=512)
    a, b = (np.concatenate(list(s.activations(SITE))) for s in (ref, got))
    assert a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@cuda
def test_cuda_training_matches_the_cpu_reference(tiny_lm_dir: str, corpus: Corpus, tmp_path: Path) -> None:
    store = _harvest(aimri.load(tiny_lm_dir, device="cpu"), corpus, tmp_path / "store", max_tokens=1024)
    settings = DictionarySettings(width=64, k=4, tokens=4096, batch_size=128, heldout_shards=1)
    _, on_cpu = train_from_store(store.path, SITE, tmp_path / "cpu", settings, progress=False, device="cpu")
    _, on_gpu = train_from_store(store.path, SITE, tmp_path / "gpu", settings, progress=False, device="cuda")
    assert abs(on_cpu["fvu"] - on_gpu["fvu"]) < 0.05 and abs(on_cpu["l0"] - on_gpu["l0"]) < 0.5


@pytest.mark.cuda
@cuda
def test_cuda_attribution_matches_the_cpu_reference(tiny_lm_dir: str) -> None:
    from tests.helpers import random_transcoders

    from aimri.circuits.attribution import attribute
    from aimri.circuits.replacement import ReplacementModel

    graphs = []
    for device in ("cpu", "cuda"):
        subject = aimri.load(tiny_lm_dir, device=device, dtype="float32")
        tcs = {layer: tc.to(subject.device) for layer, tc in random_transcoders(subject).items()}
        graphs.append(attribute(ReplacementModel(subject, tcs), "The keeper climbed the stairs", 32, progress=False))
    a, b = graphs
    assert torch.equal(a.features, b.features)
    assert torch.allclose(a.edge_weights.sum(), b.edge_weights.sum(), rtol=1e-3)


@pytest.mark.cuda
@cuda
def test_cuda_taps_are_bitwise_the_models_own_pass(tiny_lm_dir: str) -> None:
    gpu = aimri.load(tiny_lm_dir, device="cuda", dtype="float32")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = gpu.model(input_ids=ids.cuda(), output_hidden_states=True)
        with gpu.tap(read=["resid.0", "resid.1"], edit={"resid.0": lambda x: x}) as t:
            tapped = gpu.model(input_ids=ids.cuda()).logits
    assert torch.equal(plain.logits, tapped)  # reading and an identity edit change no bit
    assert torch.equal(t.acts["resid.0"], plain.hidden_states[1]) and torch.equal(
        t.acts["resid.1"], plain.hidden_states[2]
    )


def test_checkpoint_from_before_devices_resumes(tmp_path: Path) -> None:
    """A checkpoint written before the Trainer had a device and dictionaries a model dtype resumes, on any device."""
    from aimri.dictionaries import DictionaryConfig, TrainConfig, Trainer
    from aimri.dictionaries.train import fit

    rows = torch.randn(40 * 64, 16, generator=torch.Generator().manual_seed(1))
    batches = list(rows.split(64))
    old = Trainer(DictionaryConfig("topk", 16, 48, k=3), TrainConfig(40 * 64, 64, checkpoint_every=10, device="auto"))
    fit([old], batches[:20], checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "dictionary-0.pt", weights_only=True)
    del state["dictionary_config"]["model_dtype"], state["train_config"]["device"]
    torch.save(state, tmp_path / "dictionary-0.pt")
    new = Trainer(
        DictionaryConfig("topk", 16, 48, k=3, model_dtype="float32"),
        TrainConfig(40 * 64, 64, checkpoint_every=10, device="cpu"),
    )
    new.load_checkpoint(tmp_path / "dictionary-0.pt")
    assert new.step_index == 20 and new.device == torch.device("cpu")
