"""Where a dictionary meets a model (issue 19, items 3 and 6): prompts open as the dictionary's training windows
did (its recorded BOS), and a dictionary trained on another model is refused unless the transfer is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import FIXTURE_TEXT, random_transcoders

import aimri
from aimri.circuits.attribution import attribute
from aimri.circuits.replacement import ReplacementModel
from aimri.data.corpus import Corpus, Packing, pack
from aimri.dictionaries.base import DictionaryConfig, build
from aimri.dictionaries.formats import load_dictionary, save_dictionary
from aimri.dictionaries.match import check_model, opening, prompt_ids
from aimri.errors import AimriError
from aimri.steering.generate import compare, generate
from aimri.steering.interventions import FeatureEdit
from aimri.steering.tradeoff import diff_of_means


@pytest.fixture(scope="module")
def subject(tiny_lm_dir: str) -> aimri.Subject:
    return aimri.load(tiny_lm_dir)


def _sae(subject: aimri.Subject, **recorded: object):
    cfg = DictionaryConfig("relu", subject.d_model, 16, site="resid.1", **recorded)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return build(cfg)


def test_a_prompt_opens_like_the_training_windows(subject: aimri.Subject) -> None:
    tok = subject.tokenizer
    eot, im_start = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_start|>")
    window = next(iter(pack(Corpus.from_texts([FIXTURE_TEXT]), tok, Packing.for_tokenizer(tok, 16))))
    # the harvest's windows open with <|endoftext|> (the tokenizer adds no BOS of its own) ...
    assert int(window.ids[0]) == eot and tok("The")["input_ids"][0] != eot
    text_ids = tok("The lighthouse", add_special_tokens=False)["input_ids"]
    # ... so a prompt opens the same way: from the recorded BOS, from the packing rule when none is recorded
    assert prompt_ids(tok, "The lighthouse", _sae(subject, bos_id=eot)) == [eot, *text_ids]
    assert prompt_ids(tok, "The lighthouse", _sae(subject)) == [eot, *text_ids]
    assert prompt_ids(tok, "The lighthouse", _sae(subject, bos_id=im_start)) == [im_start, *text_ids]
    assert prompt_ids(tok, "The lighthouse", _sae(subject, prepend_bos=False)) == text_ids
    with pytest.raises(AimriError, match="different opening tokens"):
        opening([_sae(subject, bos_id=eot), _sae(subject, prepend_bos=False)], tok)


def test_training_records_the_opening_and_files_keep_it(subject: aimri.Subject, tmp_path: Path) -> None:
    from aimri.dictionaries.config import DictionarySettings
    from aimri.dictionaries.train import train_from_subject

    settings = DictionarySettings(architecture="topk", width=16, k=2, tokens=256, batch_size=64, context=16)
    out, _ = train_from_subject(subject, Corpus.from_texts([FIXTURE_TEXT]), "resid.1", tmp_path / "sae", settings,
                                progress=False)  # fmt: skip
    eot = subject.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = load_dictionary(out).cfg
    assert (cfg.prepend_bos, cfg.bos_id) == (True, eot)
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["metadata"]["prepend_bos"] is True  # SAELens' field, for SAELens / TransformerLens users
    sae = _sae(subject, prepend_bos=False, bos_id=None)
    save_dictionary(sae, tmp_path / "no-bos")
    assert json.loads((tmp_path / "no-bos" / "cfg.json").read_text())["metadata"]["prepend_bos"] is False
    assert load_dictionary(tmp_path / "no-bos").cfg.prepend_bos is False


def test_the_trace_holds_the_bos_and_gives_the_first_word_nodes(subject: aimri.Subject) -> None:
    model = ReplacementModel(subject, random_transcoders(subject, width=24))
    graph = attribute(model, "The lighthouse keeper climbed the", max_feature_nodes=32, batch_size=8, progress=False)
    eot = subject.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert graph.tokens[0] == eot and graph.token_strings[1] == "The"
    # position 0 (the BOS) is held constant; the prompt's first word has error nodes with edges out of them
    s = graph.edge_sources
    errors = (s >= graph.error_start) & (s < graph.embed_start)
    positions = set(((s[errors] - graph.error_start) % graph.n_pos).tolist())
    assert 0 not in positions and 1 in positions
    assert not bool((graph.features[:, 1] == 0).any())


def test_steering_opens_prompts_for_the_dictionary_in_both_runs(subject: aimri.Subject) -> None:
    eot = subject.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sae = _sae(subject, bos_id=eot)
    edit = FeatureEdit(sae, 3, 4.0, "add")
    for plain, steered in compare(subject, ["The lighthouse keeper"], [edit], max_new_tokens=3, chat=False):
        assert plain.prompt_ids == steered.prompt_ids and plain.prompt_ids[0] == eot
    chat = generate(subject, ["The lighthouse keeper"], [edit], max_new_tokens=2, chat=True)[0]
    assert chat.prompt_ids[0] == eot  # before the template's own opening
    assert generate(subject, ["The lighthouse"], [], max_new_tokens=2, chat=False)[0].prompt_ids[0] != eot
    seen: list[int] = []
    run = subject.run

    def recording(ids: torch.Tensor, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        seen.append(int(ids[0, 0]))
        return run(ids, *args, **kwargs)  # type: ignore[arg-type]

    subject.run = recording  # type: ignore[method-assign]
    try:
        with pytest.raises(AimriError, match="never fires"):
            diff_of_means(subject, sae, 0, [FIXTURE_TEXT[:80]])
    finally:
        del subject.run
    assert seen == [eot]  # the texts it reads are opened for the dictionary too


def test_a_dictionary_from_another_model_is_refused(subject: aimri.Subject, tiny_lm_dir: str, tmp_path: Path) -> None:
    foreign = _sae(subject, model_name="other-model", model_revision="f" * 64)
    with pytest.raises(AimriError, match=r"trained on other-model .*--allow-other-model"):
        check_model(foreign, subject)
    check_model(foreign, subject, allow_other_model=True)
    check_model(_sae(subject, model_revision=subject.revision), subject)
    narrow = DictionaryConfig("relu", subject.d_model + 1, 8, site="resid.1")
    with pytest.raises(AimriError, match="wide"):
        check_model(narrow, subject, allow_other_model=True)  # the override never lets a wrong width through
    edit = FeatureEdit(foreign, 3, 4.0, "add")
    with pytest.raises(AimriError, match="other-model"):
        compare(subject, ["The lighthouse"], [edit], max_new_tokens=2, chat=False)
    assert compare(subject, ["The lighthouse"], [edit], max_new_tokens=2, chat=False, allow_other_model=True)

    save_dictionary(foreign, tmp_path / "foreign")
    spec = f"resid.1/{tmp_path / 'foreign'}#3=+4"
    cli = [sys.executable, "-m", "aimri.cli", "steer", tiny_lm_dir, "Hi", "--feature", spec, "--raw",
           "--max-new-tokens", "2", "--json"]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "other-model" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    allowed = subprocess.run([*cli, "--allow-other-model"], capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr


def test_eval_atlas_and_trace_refuse_another_models_dictionary(
    subject: aimri.Subject, tiny_lm_dir: str, tmp_path: Path
) -> None:
    from aimri.atlas.build import build_atlas
    from aimri.circuits.replacement import load_transcoders
    from aimri.data.harvest import harvest
    from aimri.dictionaries.evaluate import evaluate_dictionary

    store = harvest(subject, Corpus.from_texts([FIXTURE_TEXT] * 4), ["resid.1"], tmp_path / "s", context=32,
                    progress=False)  # fmt: skip
    foreign = _sae(subject, model_name="other-model", model_revision="f" * 64)
    save_dictionary(foreign, tmp_path / "foreign")
    with pytest.raises(AimriError, match=r"harvested from .* other-model .*--allow-other-model"):
        evaluate_dictionary(tmp_path / "foreign", store.path, windows=0)
    assert evaluate_dictionary(tmp_path / "foreign", store.path, windows=0, allow_other_model=True)["l0"] >= 0
    own = _sae(subject, model_name=subject.name, model_revision=subject.revision)
    save_dictionary(own, tmp_path / "own")
    # the store is this model's, the model asked for downstream is another one: refused before any window runs
    other = str(tmp_path / "other-model")
    tf_model = aimri.load(tiny_lm_dir).model
    with torch.no_grad():
        tf_model.model.layers[0].mlp.down_proj.weight.mul_(2)  # type: ignore[union-attr]
    tf_model.save_pretrained(other)
    subject.tokenizer.save_pretrained(other)
    cli = [sys.executable, "-m", "aimri.cli", "eval", str(tmp_path / "own"), "--store", str(store.path), "--model",
           other, "--corpus", str(write_corpus(tmp_path)), "--windows", "2", "--json"]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "--allow-other-model" in refused.stderr
    allowed = subprocess.run([*cli, "--allow-other-model"], capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr
    assert "ce_loss_recovered" in json.loads(allowed.stdout.strip().splitlines()[-1])

    with pytest.raises(AimriError, match="other-model"):
        build_atlas(foreign, subject, Corpus.from_texts([FIXTURE_TEXT]), tmp_path / "a.sqlite", tokens=64,
                    context=16, progress=False)  # fmt: skip
    for layer, tc in random_transcoders(subject, width=8).items():
        tc.cfg.model_name, tc.cfg.model_revision = "other-model", "f" * 64
        save_dictionary(tc, tmp_path / "tcs" / f"layer-{layer}")
    with pytest.raises(AimriError, match="other-model"):
        load_transcoders(tmp_path / "tcs", subject)
    assert len(load_transcoders(tmp_path / "tcs", subject, allow_other_model=True)) == subject.n_layers


def write_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(FIXTURE_TEXT * 8)
    return path


def test_a_direction_found_in_another_model_is_refused(subject: aimri.Subject, tmp_path: Path) -> None:
    from aimri.steering import save_vector
    from aimri.steering.specs import parse_direction

    class Other:
        name, revision = "other-model", "f" * 64

    save_vector(torch.ones(subject.d_model), tmp_path / "theirs.safetensors", Other())
    save_vector(torch.ones(subject.d_model), tmp_path / "ours.safetensors", subject)
    theirs = parse_direction(f"resid.1={tmp_path / 'theirs.safetensors'}@2")
    with pytest.raises(AimriError, match="found in other-model"):
        generate(subject, ["The lighthouse"], [theirs], max_new_tokens=2, chat=False)
    assert generate(subject, ["The lighthouse"], [theirs], max_new_tokens=2, chat=False, allow_other_model=True)
    ours = parse_direction(f"resid.1={tmp_path / 'ours.safetensors'}@2")
    assert ours.model_revision == subject.revision
    assert generate(subject, ["The lighthouse"], [ours], max_new_tokens=2, chat=False)


def test_a_normalising_sae_is_steered_in_the_activations_scale(subject: aimri.Subject) -> None:
    """constant_norm_rescale: codes come from x·sqrt(d)/||x|| and a code's decoder row adds W_dec[i]·||x||/sqrt(d)
    in x's space; clamping a feature then re-encoding the edited activation gives the clamped value back."""
    from aimri.steering.interventions import to_edits

    cfg = DictionaryConfig("relu", subject.d_model, subject.d_model, site="resid.1",
                           normalize_activations="constant_norm_rescale", apply_b_dec_to_input=False)  # fmt: skip
    sae = build(cfg)
    q, _ = torch.linalg.qr(torch.randn(subject.d_model, subject.d_model, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        sae.W_enc.copy_(q)
        sae.W_dec.copy_(q.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    ids = torch.tensor([subject.tokenizer("The lighthouse keeper", add_special_tokens=False)["input_ids"]])
    x = subject.run(ids, read=["resid.1"])["resid.1"][0].detach()
    assert not 0.8 < float(x[-1].norm()) / subject.d_model**0.5 < 1.25  # the scale matters here
    feature = int(sae.encode(x)[-1].argmax())
    target = 2.0 * float(sae.encode(x)[-1, feature])
    edited = subject.run(ids, read=["resid.1"], edit=to_edits(subject, [FeatureEdit(sae, feature, target)]))
    y = edited["resid.1"][0]
    # exact in x's space: the edit moved x along the feature's decoder row by (target - a)·||x||/sqrt(d)
    a = sae.encode(x)[-1, feature]
    expected = x[-1] + (target - a) * sae.W_dec[feature] * x[-1].norm() / subject.d_model**0.5
    assert torch.allclose(y[-1], expected, atol=1e-4)


def test_a_sae_lens_file_reads_its_hook_as_a_site_and_runs(subject: aimri.Subject, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sae = _sae(subject)
    folder = tmp_path / "sl"
    folder.mkdir()
    save_file(
        {k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(folder / "sae_weights.safetensors")
    )
    cfg = {"architecture": "standard", "d_in": subject.d_model, "d_sae": 16, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_dictionary(folder)
    assert loaded.cfg.site == "resid.1"
    assert generate(subject, ["The lighthouse"], [FeatureEdit(loaded, 3, 2.0, "add")], max_new_tokens=2, chat=False)
    cfg["metadata"]["hook_name"] = "blocks.0.hook_resid_pre"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert load_dictionary(folder).cfg.site == "resid.-1"
    assert load_dictionary(folder, site="resid.2").cfg.site == "resid.2"  # `site` overrides the file's
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_mid"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AimriError, match="metadata.hook_name"):
        load_dictionary(folder)


def test_a_crosscoder_is_not_steered_on_one_model(subject: aimri.Subject) -> None:
    cc = build(DictionaryConfig("crosscoder", 2 * subject.d_model, 16, k=2, site="resid.1", extra={"sources": 2}))
    with pytest.raises(AimriError, match="crosscoder over 2 models"):
        generate(subject, ["The lighthouse"], [FeatureEdit(cc, 0, 1.0)], max_new_tokens=1, chat=False)
    check_model(cc, subject, sources=2)


def test_a_checkpoint_from_before_the_new_fields_resumes(tmp_path: Path) -> None:
    from aimri.dictionaries.config import TrainConfig
    from aimri.dictionaries.train import Trainer

    cfg = DictionaryConfig("batchtopk", 8, 16, k=2, site="resid.1")
    trainer = Trainer(cfg, TrainConfig(total_tokens=64, batch_size=32))
    trainer.step(torch.randn(32, 8))
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("prepend_bos", "bos_id", "normalize_activations"):
        del state["dictionary_config"][key]  # as written before these fields existed
    state["model"]["threshold"][:3] = float("inf")  # the old per-latent rule: latents never selected
    torch.save(state, tmp_path / "old.pt")
    resumed = Trainer(
        DictionaryConfig("batchtopk", 8, 16, k=2, site="resid.1", bos_id=0), TrainConfig(total_tokens=64, batch_size=32)
    )
    resumed.load_checkpoint(tmp_path / "old.pt")
    assert resumed.step_index == 1 and bool(torch.isfinite(resumed.model.threshold).all())
    with pytest.raises(AimriError, match="other settings"):
        Trainer(DictionaryConfig("batchtopk", 8, 32, k=2), TrainConfig(total_tokens=64, batch_size=32)).load_checkpoint(
            tmp_path / "old.pt"
        )
