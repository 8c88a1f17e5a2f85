"""Mask stability: Jaccard overlaps of active sets against a hand computation, for any method."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.data.text import text_data, token_stream, token_windows
from actsparse.eval.stability import mask_stability


def test_dense_model_is_perfectly_stable(llama, tok):
    model, _ = llama
    r = mask_stability(model, tok, seq_len=32, n_windows=2)
    assert r["stability/consecutive/mean"] == 1.0 and r["stability/perturbed/mean"] == 1.0


@pytest.mark.parametrize("method,kw", [("cats", {}), ("teal", {})])
def test_overlaps_match_hand_computed_jaccard(llama, tok, method, kw):
    model, stats = llama
    plan = asp.fit(method, stats, 0.5, model=model, **kw)
    ids = token_windows(token_stream(tok, text_data("bundled:eval"), max_tokens=64), 32, 2)
    mlp = model.model.layers[1].mlp
    t_site = plan.rules.get("layers.1.down")
    seen = []
    h = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with asp.sparsify(model, plan, token_policy="all"):
        with torch.no_grad():
            model(ids, use_cache=False)
        r = mask_stability(model, tok, seq_len=32, n_windows=2, perturb=0.0)
    h.remove()
    inter = seen[0]                                            # [2, 32, F] before any down-site rule
    if t_site is not None:                                     # teal thresholds the down input itself
        inter = inter * (inter.abs() > t_site.tensors["thresh"])
    act = (inter != 0).numpy()
    a, b = act[:, 1:], act[:, :-1]
    jac = (a & b).sum(-1) / np.maximum((a | b).sum(-1), 1)
    assert r["stability/consecutive/layers.1.down"] == pytest.approx(float(jac.mean()), rel=1e-6)
    assert r["stability/perturbed/layers.1.down"] == 1.0       # perturb=0: the same text
    d = act.mean()
    assert r["stability/chance/layers.1.down"] == pytest.approx(d / (2 - d), rel=1e-6)


def test_perturbed_text_lowers_overlap_under_any_token_policy(llama, tok):
    model, stats = llama
    plan = asp.fit("countdown", stats, 0.5, mode="m")
    out = {}
    for policy in ("all", "decode"):
        with asp.sparsify(model, plan, token_policy=policy):
            out[policy] = mask_stability(model, tok, seq_len=32, n_windows=2, perturb=0.5)
    assert out["all"] == out["decode"]
    assert out["all"]["stability/perturbed/mean"] < 1.0


def test_stability_bad_inputs(llama, tok):
    model, _ = llama
    with pytest.raises(asp.ActsparseError, match="perturb"):
        mask_stability(model, tok, perturb=1.5)
    with pytest.raises(asp.ActsparseError, match="no sites with roles"):
        mask_stability(model, tok, roles=("expert",))
    with pytest.raises(asp.ActsparseError, match="n_windows"):
        mask_stability(model, tok, n_windows=0)
