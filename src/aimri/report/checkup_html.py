"""The checkup report: one self-contained HTML file (inline CSS and SVG, no scripts or network needed)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from aimri.diagnostics.findings import FLAW_CATEGORIES
from aimri.errors import AimriError
from aimri.paths import atomic_write_text
from aimri.plots import bar_plot, line_plot
from aimri.run import Run

CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#1d2330}
h1{margin-bottom:4px} h2{border-bottom:1px solid #dde;padding-bottom:4px;margin-top:32px}
.score{font-size:28px;font-weight:600} .muted{color:#667}
.finding{border:1px solid #dde;border-radius:8px;padding:10px 14px;margin:10px 0}
.finding.flaw{border-left:6px solid #c0392b} .finding.info{border-left:6px solid #7f8c9b}
.bar{display:inline-block;height:10px;background:#c0392b;border-radius:2px;vertical-align:middle}
table{border-collapse:collapse;margin:6px 0;font-size:13px} td,th{border:1px solid #dde;padding:3px 6px;text-align:left;vertical-align:top}
.tok{padding:1px 0;border-radius:3px;white-space:pre-wrap} details{margin-top:6px} summary{cursor:pointer;color:#2c5d9a}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.badge{background:#8e44ad;color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}
"""


def esc(x: object) -> str:
    return html.escape(str(x))


def _table(rows: list[dict[str, Any]], limit: int = 12) -> str:
    if not rows:
        return "<p class=muted>(none)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows[:limit])
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v[:12])
    return str(v)


def _features_table(rows: list[dict[str, Any]]) -> str:
    """Cited features: the number links to its card in the console (`mri serve`), then its label, the
    figures that ranked it and its top examples (the peak token in [brackets])."""
    if not rows:
        return "<p class=muted>(none)</p>"
    numbers = [k for k in rows[0] if k not in ("feature", "label", "examples", "link")]
    head = "".join(f"<th>{esc(k)}</th>" for k in ["feature", "label", *numbers, "top examples"])
    body = "".join(
        f"<tr><td><a href='{esc(r['link'])}'>#{esc(r['feature'])}</a></td><td>{esc(r['label'])}</td>"
        + "".join(f"<td>{esc(_fmt(r.get(k)))}</td>" for k in numbers)
        + f"<td>{'<br>'.join(esc(x) for x in r.get('examples', []))}</td></tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _features(f: dict[str, Any]) -> str:
    """The report's features section: the labelled features most specific to each battery category."""
    if "skipped" in f:
        return f"<p class=muted>{esc(f['skipped'])}</p>"
    parts = [
        f"<p class=muted>Dictionary {esc(f['dictionary'])} ({f['d_sae']:,} features at {esc(f['site'])}); each category's "
        "features rank by mean activation on the model's own answers there minus the mean on the other categories' "
        "answers. Feature numbers open their cards in the console (<code>mri serve</code>).</p>"
    ]
    for cat, rows in f["categories"].items():
        parts.append(f"<h3>{esc(cat)}</h3>" + _features_table(rows))
    return "".join(parts)


def _evidence(e: dict[str, Any]) -> str:
    kind = e.get("kind", "")
    if kind == "features" and isinstance(e.get("rows"), list) and e["rows"] and "link" in e["rows"][0]:
        return f"<p class=muted>features ({esc(e.get('dictionary', ''))})</p>" + _features_table(e["rows"])
    if "rows" in e and isinstance(e["rows"], list):
        return f"<p class=muted>{esc(kind)}</p>" + _table(e["rows"])
    if "rows" in e and isinstance(e["rows"], dict):  # head roles
        return "".join(f"<p class=muted>{esc(k)}</p>" + _table(v) for k, v in e["rows"].items())
    return f"<p class=muted>{esc(kind)}</p>" + _table([{k: v for k, v in e.items() if k != "kind"}])


def _finding(f: dict[str, Any], flaw: bool) -> str:
    rel = ", ".join(f"{k} {_fmt(v)}" for k, v in f["reliability"].items()) or "not measured"
    ev = "".join(_evidence(e) for e in f["evidence"])
    bar = f"<span class=bar style='width:{int(120 * f['suspicion'])}px'></span> " if flaw else ""
    by = f" · found by {esc(f['detector'])}" if f.get("detector") else ""
    only = " <span class=badge>found by internals only</span>" if f.get("internals_only") else ""
    return (
        f"<div class='finding {'flaw' if flaw else 'info'}'><b>{esc(f['title'])}</b>{only}<br>"
        f"{bar}<span class=muted>{esc(f['category'])} · suspicion {f['suspicion']:.2f}{by} · reliability: {esc(rel)}</span>"
        f"<p>{esc(f['summary'])}</p><details><summary>evidence</summary>{ev}</details></div>"
    )


def _heatmap(scores: list[list[float]], title: str) -> str:
    n_l, n_h = len(scores), len(scores[0]) if scores else 0
    cell = 12
    rects = []
    for layer, row in enumerate(scores):
        for head, v in enumerate(row):
            a = max(0.0, min(1.0, v))
            rects.append(
                f"<rect x='{40 + head * cell}' y='{20 + (n_l - 1 - layer) * cell}' width='{cell - 1}' height='{cell - 1}' "
                f"fill='rgba(192,57,43,{a:.2f})'><title>L{layer}H{head}: {v:.2f}</title></rect>"
            )
    h = 30 + n_l * cell
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{60 + n_h * cell}' height='{h + 14}'>"
        f"<text x='4' y='12' font-size='11'>{esc(title)}</text>{''.join(rects)}"
        f"<text x='4' y='{h + 10}' font-size='10'>heads → · layers ↑</text></svg>"
    )


def _decision(d: dict[str, Any], features: dict[str, Any] | None = None) -> str:
    peak = max((abs(t["attribution"]) for t in d["tokens"]), default=1.0) or 1.0
    spans = []
    for t in d["tokens"]:
        a = t["attribution"] / peak
        color = f"rgba(39,174,96,{abs(a):.2f})" if a > 0 else f"rgba(192,57,43,{abs(a):.2f})"
        spans.append(
            f"<span class=tok style='background:{color}' title='{t['attribution']:.3f}'>{esc(t['token'])}</span>"
        )
    opt = d["options"]
    feats = (
        _table(d["features"])
        if d.get("features")
        else "<p class=muted>Feature-level path: pass --transcoders (per-layer transcoders from `mri train-transcoders`).</p>"
    )
    return (
        f"<p>Decision: <b>{esc(d['decision'])}</b> (logit difference {opt[0]} − {opt[1]} = {d['logit_diff']:.2f}; "
        f"p = {d['p_options'][0]:.2f} / {d['p_options'][1]:.2f}).</p>"
        f"<p class=muted>Prompt tokens coloured by gradient × embedding (green pushes {esc(opt[0])}, red {esc(opt[1])}):</p>"
        f"<p>{''.join(spans)}</p><p class=muted>Largest direct effects of layer outputs on the decision:</p>"
        + _table(d["components"])
        + "<p class=muted>Largest direct effects of single MLP neurons (last position):</p>"
        + _table(d.get("neurons", []))
        + feats
        + (
            f"<p class=muted>Labelled features carrying it at {esc(features['site'])} (activation × decoder · gradient of "
            f"the logit difference; positive pushes {esc(opt[0])}):</p>" + _features_table(features["decision"])
            if features and "decision" in features
            else ""
        )
    )


def _treatment(t: dict[str, Any] | None) -> str:
    """The treatment section of a re-scan's report (SCAN/treatment.json, from `mri treat`): what was changed
    and why, and before / after side by side."""
    if not t:
        return ""
    r = t.get("rescan", {})
    before_after = {}
    if "flaw_rate" in t:
        before_after["flaw rate"] = t["flaw_rate"]
    for key, label in (("finding_suspicion", "finding suspicion"), ("scan_suspicion", "scan suspicion")):
        if key in r:
            before_after[label] = r[key]
    if "battery_agreement" in r:
        before_after["battery agreement"] = r["battery_agreement"]
    plot = bar_plot({k: {"before": v["before"], "after": v["after"]} for k, v in before_after.items()},
                    "share / score", title="Before and after treatment")  # fmt: skip
    probes = r.get("probe_auroc", {})
    probe_plot = (
        bar_plot(
            {k: {"untreated": probes["untreated"][k], "treated": v} for k, v in probes["treated"].items()},
            "test AUROC",
            title="Trait probes (the baseline's) on the untreated and treated model",
        )
        if probes.get("treated")
        else ""
    )
    loss = t["held_out_loss"]
    edit = t.get("edit") or {}
    repair = t.get("repair") or {}
    mech = t.get("mechanism") or {}
    rows = [
        {"what": "method", "value": t["method"] + (f" ({edit.get('kind')}, {'exact' if edit.get('exact') else 'approximate'})" if edit else "")},
        {"what": "finding", "value": f"{t['finding']['id']}: {t['finding']['title']}"},
        {"what": "direction", "value": f"layer {mech['layer']} (chosen from {len(mech.get('selection', []))} layers)" if mech.get("layer") is not None else "none"},
        {"what": "repair data", "value": (", ".join(f"{n} {k}" for k, n in repair["examples"].items()) + f" examples (batch 8); {len(repair['condition_prompts'])} condition prompts; direction ablated while training: {repair.get('ablated_during_training')}") if repair else "none"},
        {"what": "flaw rate", "value": (f"{t['flaw_rate']['before']:.0%} → {t['flaw_rate']['after']:.0%} of answers using "
                                        f"{', '.join(t['flaw_rate']['words'])}, on {t['flaw_rate']['prompts']}"
                                        + (" (the flaw does not show there without its condition: this rate says nothing)"
                                           if t["flaw_rate"]["before"] == 0 else "")) if "flaw_rate" in t else "no prompt pool matches the condition"},
        {"what": "held-out loss", "value": f"{loss['before']:.4f} → {loss['after']:.4f} nats ({loss['relative_change']:+.2%})"},
    ] + ([{"what": "note", "value": edit["note"]}] if edit.get("note") else [])  # fmt: skip
    diff = _table(r.get("diff_to_untreated", []))
    return (f"<h2>Treatment</h2><p class=muted>This model was treated from the scan {esc(t.get('scan', ''))} of "
            f"{esc(t['candidate']['name'])}; below, that scan (before) against this re-scan (after).</p>"
            f"{_table(rows)}<div class=grid>{plot}{probe_plot}</div>"
            f"<details><summary>Difference from the untreated model on neutral text</summary>{diff}</details>")  # fmt: skip


def render_report(result: dict[str, Any], stages: dict[str, Any], treatment: dict[str, Any] | None = None) -> str:
    """The report page: `result` is findings.json's content, `stages` the anatomy, probes and decision
    results (stage-results.json), `treatment` a re-scan's treatment record (treatment.json), drawn when
    given. Returns the HTML text."""
    findings = result["findings"]
    flaws = [f for f in findings if f["category"] in FLAW_CATEGORIES]
    info = [f for f in findings if f["category"] not in FLAW_CATEGORIES]
    anat = stages["anatomy"]
    lens = line_plot(
        {"KL(final ‖ lens)": [(r["layer"], r["kl"]) for r in anat["logit_lens"]]},
        "layer",
        "nats",
        title="Logit lens: how far each layer is from the final answer",
    )
    agree = line_plot(
        {"top-1 agreement": [(r["layer"], r["top1_agree"]) for r in anat["logit_lens"]]},
        "layer",
        "share of positions",
        title="Logit lens: top token already the final one",
    )
    sweeps = line_plot(
        {t: [(r["layer"], r["logistic"]) for r in p["sweep"]] for t, p in stages["probes"].items()},
        "layer",
        "test AUROC (logistic)",
        title="Trait probes by layer (held-out pairs)",
    )
    heads = "".join(_heatmap(v, k.replace("_", " ")) for k, v in anat["heads"]["scores"].items())
    against = f" against {esc(result['baseline'])}" if result["baseline"] else ""
    return f"""<!doctype html><html><head><meta charset=utf-8><title>AI MRI checkup: {esc(result["model"])}</title>
<style>{CSS}</style></head><body>
<h1>AI MRI checkup: {esc(result["model"])}{against}</h1>
<p class=muted>revision {esc(result["revision"][:16])} · findings ranked by suspicion; every reliability figure was measured on data the method did not see.</p>
<p class=score>suspicion {result["suspicion"]:.2f}</p>{_treatment(treatment)}
<h2>Findings</h2>{"".join(_finding(f, True) for f in flaws)}
<h2>One decision explained</h2>{_decision(stages["decision"], stages.get("features"))}
<h2>Features</h2>{_features(stages.get("features") or {"skipped": "This scan predates feature evidence; rerun `mri scan`."})}
<h2>Description of the model</h2>{"".join(_finding(f, False) for f in info)}
<h2>Anatomy</h2><div class=grid>{lens}{agree}</div><div class=grid>{heads}</div>
<h2>Probes</h2>{sweeps}
</body></html>
"""


def write_report(scan: Path) -> Path:
    """Render SCAN/report.html from the finished checkup's files (findings.json, stage-results.json), through
    a temp file and a rename. Returns the report's path.

    Raises AimriError when the scan has not finished (the files are missing or unreadable)."""
    scan = Path(scan)
    try:
        result = json.loads(Run.findings_of(scan).read_text())
        stages = json.loads(Run.stage_results_of(scan).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AimriError(f"{scan} holds no finished checkup ({err}); run the checkup there first") from err
    treated = scan / "treatment.json"
    treatment = json.loads(treated.read_text()) if treated.is_file() else None
    path = Run.report_of(scan)
    atomic_write_text(path, render_report(result, stages, treatment))
    return path
