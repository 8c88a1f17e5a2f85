"""The method library as a whole: every method registered, every rule kind survives save/load, paper presets."""
import importlib
from pathlib import Path

import pytest
import torch

import actsparse as asp
from tests.methods.conftest import fresh_x

ALL = ["cats", "countdown", "dense", "ffn_threshold", "larosa", "nm", "rsparse", "scap", "teal", "wina"]


def test_methods_lists_every_method_with_typed_params():
    m = asp.methods()
    assert sorted(m) == ALL
    assert m["nm"]["pattern"] == {"type": "str", "default": "2:4"}
    assert m["countdown"]["mode"]["default"] == "m"


CASES = [("cats", {}), ("countdown", {"mode": "m"}), ("countdown", {"mode": "oracle"}),
         ("countdown", {"mode": "d", "train_steps": 5, "calib_tokens": 128}),
         ("nm", {"pattern": "2:4", "mitigation": "shift"}), ("nm", {"pattern": "2:4", "mitigation": "scaling", "calib_tokens": 128}),
         ("rsparse", {"alpha": 0.7, "calib_tokens": 128}), ("scap", {"mode": "median"}),
         ("ffn_threshold", {"calib_tokens": 128}), ("teal", {}), ("teal", {"sequential": True, "calib_tokens": 128}),
         ("wina", {"calib_tokens": 128}), ("larosa", {"calib_tokens": 128})]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in CASES])
def test_plans_round_trip_through_safetensors(llama, tmp_path, method, kw):
    model, stats = llama
    plan = asp.fit(method, stats, 0.5, model=model, **kw)
    plan.save(tmp_path / "plan")
    back = asp.SparsityPlan.load(tmp_path / "plan")
    assert back.effective_sparsity == pytest.approx(plan.effective_sparsity)
    x = fresh_x(model, shape=(2, 6))
    layer = model.model.layers[0]
    outs = []
    for p in (plan, back):
        with asp.sparsify(model, p), torch.no_grad():
            outs.append(layer.mlp(layer.post_attention_layernorm(x)))
    torch.testing.assert_close(outs[0], outs[1])


NEEDS = [("teal", {}, False), ("teal", {"allocation": "greedy"}, True), ("cats", {}, False),
         ("scap", {"mode": "zero"}, False), ("scap", {"mode": "median"}, True), ("scap", {"mode": "zero", "sequential": True}, True),
         ("nm", {}, False), ("nm", {"mitigation": "variance"}, False), ("nm", {"score": "amber"}, True),
         ("nm", {"mitigation": "shift"}, True), ("countdown", {"mode": "m"}, False), ("countdown", {"mode": "oracle"}, False),
         ("countdown", {"mode": "d"}, True), ("rsparse", {}, True), ("ffn_threshold", {}, True), ("dense", {}, False),
         ("teal", {"sequential": True}, True), ("wina", {}, True), ("larosa", {}, True)]


@pytest.mark.parametrize("method,kw,needs", NEEDS)
def test_needs_model_for_tells_the_sweep_which_fits_load_the_model(llama, method, kw, needs):
    from actsparse.sparsifiers.registry import get_method, make_params
    _, stats = llama
    cls = get_method(method)
    assert cls.needs_model_for(make_params(cls, kw)) is needs
    if needs:
        with pytest.raises(asp.ActsparseError, match="pass model="):
            asp.fit(method, stats, 0.5, **kw)
    else:
        asp.fit(method, stats, 0.5, **kw)


PAPER = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf/method").glob("*_paper.yaml"))


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets_hold_valid_params_and_name_their_source(preset):
    import yaml

    from actsparse.sparsifiers.registry import get_method, make_params
    root = Path(__file__).resolve().parents[2]
    text = (root / "conf/method" / f"{preset}.yaml").read_text()
    conf = yaml.safe_load(text)
    make_params(get_method(conf["name"]), conf["params"] or {})
    header = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "reference code" in header and "Differences kept" in header
    doc = importlib.import_module(get_method(conf["name"]).__module__).__doc__
    assert f"conf/method/{preset}.yaml" in doc
    sweep = root / "sweeps" / f"{preset}.yaml"
    if sweep.exists():
        assert f"override /method: {preset}" in sweep.read_text()


def test_every_paper_preset_is_listed():
    assert PAPER == ["cats_paper", "countdown_paper", "larosa_paper", "nm_paper", "rsparse_paper", "scap_paper",
                     "teal_paper", "wina_paper"]
