"""A feature card in the terminal: activating tokens shaded by strength, like a dashboard."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text


def highlight(tokens: list[str], acts: list[float], peak: float) -> Text:
    """The example's text with each firing token's background shaded by its activation / `peak`."""
    text = Text()
    for token, act in zip(tokens, acts, strict=False):
        shown = token.replace("\n", "⏎")
        if act > 0 and peak > 0:
            level = min(1.0, act / peak)
            red, green = 255, int(255 - 140 * level)
            text.append(shown, style=f"black on rgb({red},{green},{int(255 - 255 * level)})")
        else:
            text.append(shown)
    return text


def render_card(card: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]feature {card['id']}[/]  {card['address']}")
    for lab in card["labels"]:
        scores = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in lab["scores"].items())
        console.print(f"  label ({lab['explainer']}): [bold]{lab['label']}[/]  {scores}")
    if not card["labels"]:
        console.print("  label: (none yet: `mri label`)")
    q = card["quantiles"] or {}
    console.print(
        f"  density {card['density']:.2e} ({card['fires']:,} tokens)  mean {card['mean_act']:.3g}  "
        f"max {card['max_act']:.3g}  median {q.get('0.5', 0):.3g}  p99 {q.get('0.99', 0):.3g}"
    )
    if card["logits_top"]:
        console.print("  promotes: " + "  ".join(repr(t) for t, _ in card["logits_top"][:8]))
        console.print("  suppresses: " + "  ".join(repr(t) for t, _ in card["logits_bottom"][:8]))
    if card["neighbours"]:
        console.print("  decoder neighbours: " + ", ".join(f"#{i} ({c:.2f})" for i, c in card["neighbours"][:5]))
    if card["cofiring"]:
        console.print("  co-fires with: " + ", ".join(f"#{i} ({c:.2f})" for i, c in card["cofiring"][:5]))
    peak = max((ex["peak"] for ex in card["top_examples"]), default=0.0)
    for ex in card["top_examples"]:
        line = Text(f"  {ex['peak']:7.3f}  ")
        line.append_text(highlight(ex["tokens"], ex["acts"], peak))
        console.print(line)
