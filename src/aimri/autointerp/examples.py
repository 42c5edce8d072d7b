"""Examples as explainers and scorers see them: split so a label is never scored on what it was made from."""

from __future__ import annotations

from dataclasses import dataclass

from aimri.atlas.db import Atlas


@dataclass
class Example:
    tokens: list[str]
    acts: list[float]
    peak: float
    window: int = -1  # the atlas window it came from

    @property
    def peak_index(self) -> int:
        return max(range(len(self.acts)), key=self.acts.__getitem__) if self.acts else 0

    def text(self) -> str:
        return "".join(self.tokens)

    def highlighted(self, threshold: float = 0.0) -> str:
        """delphi style: activating tokens wrapped in << >>."""
        cut = threshold * self.peak
        out = []
        for token, act in zip(self.tokens, self.acts, strict=False):
            out.append(f"<<{token}>>" if act > 0 and act >= cut else token)
        return "".join(out).replace(">><<", "")

    def snippet(self, radius: int = 8, centre: int | None = None) -> str:
        """The tokens around the peak (or `centre`): what an embedding of the example should be about."""
        c = self.peak_index if centre is None else centre
        return "".join(self.tokens[max(0, c - radius) : c + radius + 1])


@dataclass
class FeatureExamples:
    feature: int
    explain: list[Example]  # the explainer's view: top examples and half the quantile samples
    score_active: list[Example]  # held out: the other half of the samples, minus any window shown above
    score_inactive: list[Example]  # windows where the feature never fired


def split_examples(atlas: Atlas, feature: int, n_top: int = 10) -> FeatureExamples:
    atlas.check_feature(feature)

    def convert(rows: list[dict]) -> list[Example]:
        return [Example(r["tokens"], r["acts"], r["peak"], r["window"]) for r in rows]

    top = atlas.examples(feature, "top")[:n_top]
    samples = atlas.examples(feature, "sample")
    shown = top + samples[0::2]
    seen = {r["window"] for r in shown}
    held = [r for r in samples[1::2] if r["window"] not in seen]
    return FeatureExamples(feature, convert(shown), convert(held), convert(atlas.examples(feature, "negative")))
