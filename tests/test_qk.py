"""QK attribution and head loadings on tiny models, by known answers: the pair terms of a bias-free Llama add up
to the pre-softmax score, whose softmax is the model's own attention pattern; an edge's head loadings and its
residual part add up to the graph's edge weight, with per-layer transcoders and with a CLT."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import random_transcoders, tiny_subject
from tests.test_clt import random_clt

from aimri.circuits.attribution import attribute
from aimri.circuits.qk import _scaling, edge_heads, qk_attribution
from aimri.circuits.replacement import ReplacementModel
from aimri.errors import AimriError


def _model(kind: str) -> ReplacementModel:
    subject = tiny_subject("llama")
    subject.model.set_attn_implementation("eager")
    return ReplacementModel(subject, random_transcoders(subject, width=24) if kind == "plt" else random_clt(subject))


IDS = torch.randint(1, 96, (7,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_qk_pairs_add_up_to_the_models_score(kind: str) -> None:
    model = _model(kind)
    result = qk_attribution(model, IDS, layer=2, head=1, query_pos=6, key_pos=3, constant_positions=0)
    assert abs(result.unexplained) <= 1e-5 * max(1.0, abs(result.score))  # Llama: no attention biases
    assert float(result.pair_matrix().sum()) == pytest.approx(result.score, rel=1e-5, abs=1e-6)
    assert result.pairs and abs(result.pairs[0][2]) >= abs(result.pairs[-1][2])
    # the score is the model's: the softmax over every key of the captured scores is its attention pattern
    run = model.run(torch.tensor(IDS), options={"capture": 2})
    q, k, given, module = run.kept["qk"]
    scores = _scaling(module, given, q.shape[-1]) * (k[0, 1 // 2, :7] @ q[0, 1, 6]).detach()
    with torch.no_grad():
        pattern = model.subject.model(input_ids=torch.tensor([IDS]), output_attentions=True).attentions[2][0, 1, 6, :7]
    assert torch.allclose(scores.softmax(-1), pattern, atol=1e-6)
    assert float(scores[3]) == pytest.approx(result.score, rel=1e-6)


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_head_loadings_add_up_to_the_edge(kind: str) -> None:
    model = _model(kind)
    graph = attribute(model, IDS, max_feature_nodes=10_000, progress=False, constant_positions=0)
    checked = 0
    for t, s, w in zip(
        graph.edge_targets.tolist(), graph.edge_sources.tolist(), graph.edge_weights.tolist(), strict=True
    ):
        if t < graph.n_features and s < graph.n_features and abs(w) > 1e-3:
            src, tgt = tuple(graph.features[s].tolist()), tuple(graph.features[t].tolist())
            if src[1] != tgt[1]:
                loadings = edge_heads(model, IDS, src, tgt)  # type: ignore[arg-type]
                assert loadings.total == pytest.approx(w, rel=1e-4, abs=1e-6)
                assert loadings.residual == 0.0 and loadings.heads  # between positions: all through heads
                checked += 1
        if checked == 3:
            break
    assert checked == 3
    token = graph.logit_tokens[0]
    src = tuple(graph.features[(graph.features[:, 1] < len(IDS) - 1).nonzero()[0, 0]].tolist())
    to_logit = edge_heads(model, IDS, src, token)  # type: ignore[arg-type]
    sources, weights = graph.row(graph.logit_start)
    edge = dict(zip(sources.tolist(), weights.tolist(), strict=True))
    node = next(i for i, f in enumerate(graph.features.tolist()) if tuple(f) == src)
    assert to_logit.total == pytest.approx(edge.get(node, 0.0), rel=1e-4, abs=1e-6)


def test_bad_requests_are_named() -> None:
    model = _model("plt")
    graph = attribute(model, IDS, max_feature_nodes=64, progress=False, constant_positions=0)
    same = [tuple(f) for f in graph.features.tolist() if f[1] == 5]
    with pytest.raises(AimriError, match="does not pass through attention"):
        edge_heads(model, IDS, (0, 5, same[0][2]), (2, 5, 0))
    with pytest.raises(AimriError, match="after query position"):
        qk_attribution(model, IDS, 1, 0, 2, 4)
    with pytest.raises(AimriError, match="head 9 is outside"):
        qk_attribution(model, IDS, 1, 9, 4, 2)
    with pytest.raises(AimriError, match="outside the 7-token prompt"):
        qk_attribution(model, IDS, 1, 0, 9, 2)
    with pytest.raises(AimriError, match="not active"):
        edge_heads(model, IDS, (0, 1, 10_000), (2, 5, 0))
