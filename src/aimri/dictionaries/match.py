"""Where a dictionary meets a model: is it that dictionary's model, and how does a prompt open for it.

A dictionary is only meaningful on the activations it was trained on: the same weights (`check_model`) and the
same input distribution, which starts at the first token. Training windows open with a BOS token at
position 0 (the attention sink, left out of training); a prompt fed to the dictionary must open the same way
(`prompt_ids`), or its first word becomes the sink (SmolLM2: residual norm ~22,000 instead of ~180) and every
later position sees a context the dictionary never saw. The convention is read from the dictionary's
recorded settings (`DictionaryConfig.prepend_bos` / `bos_id`, SAELens' `metadata.prepend_bos`), never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from aimri.data.corpus import Packing
from aimri.dictionaries.base import Dictionary, DictionaryConfig
from aimri.errors import AimriError


def check_model(
    dictionary: Dictionary | DictionaryConfig, subject: Any, allow_other_model: bool = False, source: object = "",
    sources: int = 1,
) -> None:  # fmt: skip
    """Refuse a dictionary trained on another model than `subject` (a Subject).

    The recorded `model_revision` (a content hash of the weights) must equal `subject.revision` where both are
    known; the widths must fit always. `allow_other_model=True` (the CLI's --allow-other-model) lets a
    deliberate transfer through (e.g. a base model's SAE on its fine-tune) — the widths are still checked.
    A crosscoder reads `sources` models at once (its input is their activations side by side): pass how many
    the caller feeds it; read on one model (sources=1) it is refused by its width. Its recorded revisions
    ("a+b") fit any of its models.

    Raises AimriError naming both models and the override."""
    cfg = dictionary.cfg if isinstance(dictionary, Dictionary) else dictionary
    what = f"{source}" if source else f"the {cfg.architecture} dictionary on {cfg.site or '?'}"
    if cfg.site:
        try:
            width = subject.site_dim(cfg.site)
        except AimriError as err:
            raise AimriError(f"{what} reads {cfg.site}, which {subject.name} has not ({err})") from None
        if cfg.d_in != width * sources:
            if cfg.d_in == width * int(cfg.extra.get("sources", 0)):
                raise AimriError(
                    f"{what} is a crosscoder over {cfg.extra['sources']} models: it reads them side by side, not "
                    f"{subject.name} alone (use it in the checkup's model diffing: `mri scan --crosscoder`)"
                )
            raise AimriError(
                f"{what} is {cfg.d_in} wide but {subject.name}'s {cfg.site} is {width * sources}: it belongs to "
                "another model"
            )
    check_revision(f"{what} was trained on", cfg.model_name, cfg.model_revision, subject.name,
                   getattr(subject, "revision", "unknown"), allow_other_model)  # fmt: skip


_MANTISSA = {"float32": 23, "float16": 10, "bfloat16": 7}  # bits: what rounding each dtype leaves


def check_dtype(store: Any, dictionary: Dictionary | DictionaryConfig) -> str:
    """Compare the precision of a store's rows — the coarser of the dtype the model computed them in (its
    spec.model.dtype; fp32 before it was recorded) and the one they were written in (spec.dtype) — with the
    dtype the dictionary was trained on (`DictionaryConfig.model_dtype`; not recorded: no check).

    Returns "" when they agree, or a note when the store's rows are at least as precise (read as fp32: no
    precision is lost; the dictionary sees slightly other numbers than in training). Raises AimriError when they
    are less precise (fewer mantissa bits): the figures would measure that rounding, not the dictionary
    (harvest again with the model in the dictionary's dtype, stored in float32)."""
    cfg = dictionary.cfg if isinstance(dictionary, Dictionary) else dictionary
    computed, written = str(store.spec["model"].get("dtype", "float32")), str(store.spec.get("dtype", "float32"))
    have = min((computed, written), key=lambda d: _MANTISSA.get(d, 23))
    want = cfg.model_dtype
    if not want or have == want:
        return ""
    if _MANTISSA.get(have, 23) < _MANTISSA.get(want, 23):
        raise AimriError(
            f"{store.path} holds activations rounded to {have}, but the dictionary was trained on {want} ones: its "
            f"figures there would measure {have}'s rounding; harvest again with `--dtype {want} --store-dtype float32`"
        )
    return f"note: {store.path} holds {have} activations, the dictionary was trained on {want} ones; read as float32"


def check_store(store: Any, name: str, revision: str, allow_other_model: bool = False) -> None:
    """`check_revision` for an ActivationStore's rows against the model `name` (a phrase: "the model given, X")."""
    made = store.spec["model"]
    check_revision(f"{store.path} was harvested from", str(made.get("name")), str(made.get("revision") or ""),
                   name, revision, allow_other_model)  # fmt: skip


def check_revision(
    what: str, trained_name: str, trained_revision: str, name: str, revision: str, allow_other_model: bool = False
) -> None:
    """The one identity rule for everything made from a model (a dictionary, a store's rows, a direction): the
    recorded revision (a content hash of the weights) must equal the model's where both are known; a
    crosscoder's "a+b" (12 characters each) fits any of its models. `what` starts the message ("X was trained
    on"). Raises AimriError naming both models and the override, unless `allow_other_model`."""
    recorded, revision = trained_revision or "", revision or "unknown"
    if not recorded or revision == "unknown" or allow_other_model:
        return
    if recorded == revision or ("+" in recorded and any(revision.startswith(p) for p in recorded.split("+"))):
        return
    raise AimriError(
        f"{what} {trained_name or 'another model'} (revision {recorded[:12]}), not {name} (revision "
        f"{revision[:12]}); use one made from this model, or pass --allow-other-model (allow_other_model=True) "
        "for a deliberate transfer"
    )


def opening(
    dictionaries: Dictionary | DictionaryConfig | Iterable[Dictionary | DictionaryConfig], tokenizer: Any
) -> list[int]:
    """The token ids a prompt opens with for these dictionaries: [bos_id] as recorded at training, [] when they
    were trained without one (SAELens' prepend_bos=False); when not recorded (dictionaries saved before the
    record, files from elsewhere with prepend_bos=True), the tokenizer's packing rule — the rule every AI MRI
    harvest used (`aimri.data.corpus.Packing.for_tokenizer`).

    Raises AimriError when the dictionaries disagree (e.g. a transcoder set trained on two conventions)."""
    if isinstance(dictionaries, (Dictionary, DictionaryConfig)):
        dictionaries = [dictionaries]
    found: dict[tuple[int, ...], str] = {}
    fallback: tuple[int, ...] | None = None
    for d in dictionaries:
        cfg = d.cfg if isinstance(d, Dictionary) else d
        if not cfg.prepend_bos:
            ids: tuple[int, ...] = ()
        elif cfg.bos_id is not None:
            ids = (int(cfg.bos_id),)
        else:
            if fallback is None:
                if tokenizer is None:
                    raise AimriError(
                        "the dictionary records no BOS token and the subject has no tokenizer to read one from"
                    )
                bos = Packing.for_tokenizer(tokenizer, 2).bos_id
                fallback = () if bos is None else (int(bos),)
            ids = fallback
        found.setdefault(ids, cfg.site or "?")
    if len(found) > 1:
        detail = ", ".join(f"{site}: {list(ids) or 'none'}" for ids, site in found.items())
        raise AimriError(f"these dictionaries were trained with different opening tokens ({detail}); use one set")
    return list(next(iter(found), ()))


def open_ids(ids: Sequence[int], start: Sequence[int]) -> list[int]:
    """`ids` with `start` in front, unless they already open with it (a tokenizer that adds its own BOS, a
    chat template that begins with it)."""
    ids, start = list(ids), list(start)
    return ids if ids[: len(start)] == start else start + ids


def prompt_ids(
    tokenizer: Any, prompt: str, dictionaries: Dictionary | DictionaryConfig | Iterable[Dictionary | DictionaryConfig]
) -> list[int]:
    """A raw-text prompt as the dictionaries' training windows would hold it: the text tokenized without the
    tokenizer's own special tokens, opened with `opening(dictionaries, tokenizer)` (as the harvest packs it:
    aimri.data.corpus.pack)."""
    if tokenizer is None:
        raise AimriError("this subject has no tokenizer: give the prompt as token ids")
    return open_ids(tokenizer(prompt, add_special_tokens=False)["input_ids"], opening(dictionaries, tokenizer))


def packing_for(
    dictionaries: Dictionary | DictionaryConfig | Iterable[Dictionary | DictionaryConfig],
    tokenizer: Any,
    context: int,
    **options: bool,
) -> Packing:
    """The tokenizer's packing (`Packing.for_tokenizer(tokenizer, context, **options)`) with windows opened as
    these dictionaries' were (`opening`): corpus windows read through a dictionary (evaluation, atlas mining)
    start as its training windows did, also for a dictionary trained elsewhere."""
    start = opening(dictionaries, tokenizer)
    return replace(Packing.for_tokenizer(tokenizer, context, **options), bos_id=start[0] if start else None)
