"""A saved plan is self-contained: a fresh interpreter that never imported the method's module applies it and
scores the same perplexity as the process that fitted it (rule kinds are found where the plan says they live)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import actsparse as asp
from actsparse.errors import ActsparseError

# Four sequences are enough: each plan's score is compared between the two processes, not against a fixed number.
PPL = dict(seq_len=64, max_tokens=256, batch_size=4)

FRESH = r"""
import json, sys
import actsparse as asp
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model, tok = asp.load_model("tiny-llama")
    plan = asp.SparsityPlan.load(path)
    with asp.sparsify(model, plan, backend="torch", token_policy="all"):
        out[name] = asp.perplexity(model, tok, data=asp.text_data("bundled:eval"), **json.loads(sys.argv[2]))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_llama_stats():
    model, tok = asp.load_model("tiny-llama")
    stats = asp.calibrate(model, tok, data=asp.text_data("bundled:calib"), tokens=2048, progress=False)
    return model, tok, stats


def test_every_method_plan_applies_in_a_fresh_interpreter(tiny_llama_stats, tmp_path):
    model, tok, stats = tiny_llama_stats
    here, paths = {}, {}
    for name in asp.methods():
        plan = asp.fit(name, stats, sparsity=0.5, model=model)
        paths[name] = str(tmp_path / name)
        plan.save(paths[name])
        with asp.sparsify(model, plan, backend="torch", token_policy="all"):
            here[name] = asp.perplexity(model, tok, data=asp.text_data("bundled:eval"), **PPL)
    out = subprocess.run([sys.executable, "-c", FRESH, json.dumps(paths), json.dumps(PPL)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(fresh) == set(here)
    for name in here:
        assert abs(fresh[name] - here[name]) <= 1e-6 * here[name], (name, fresh[name], here[name])


def test_plan_records_where_its_rule_kinds_are_defined(tiny_llama_stats, tmp_path):
    model, _, stats = tiny_llama_stats
    plan = asp.fit("nm", stats, sparsity=0.5, model=model)
    plan.save(tmp_path / "p")
    meta = json.loads(next((tmp_path / "p").glob("*.json")).read_text())
    assert meta["rule_modules"] == {"nm": "actsparse.sparsifiers.nm"}


def test_a_rule_kind_from_a_missing_plugin_is_refused_naming_its_module(tiny_llama_stats, tmp_path):
    model, _, stats = tiny_llama_stats
    plan = asp.fit("teal", stats, sparsity=0.5, model=model)
    for r in plan.rules.values():
        r.kind = "my_kind"
    plan.rule_modules = {"my_kind": "no_such_plugin.rules"}
    with pytest.raises(ActsparseError, match="no_such_plugin.rules.*cannot be imported"):
        asp.sparsify(model, plan)
    plan.rule_modules = {}
    with pytest.raises(ActsparseError, match="unknown rule kind 'my_kind'; known: .*threshold"):
        asp.sparsify(model, plan)


def test_plans_saved_without_rule_modules_still_apply_in_a_fresh_interpreter(tiny_llama_stats, tmp_path):
    """Plans written before kinds were recorded: the built-in methods are imported on a miss."""
    model, _, stats = tiny_llama_stats
    asp.fit("ffn_threshold", stats, sparsity=0.5, model=model).save(tmp_path / "p")
    meta_file = tmp_path / "p" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta.pop("rule_modules")
    meta_file.write_text(json.dumps(meta))
    code = ("import sys, actsparse as asp\n"
            "model, tok = asp.load_model('tiny-llama')\n"
            "plan = asp.SparsityPlan.load(sys.argv[1])\n"
            "before = 'actsparse.sparsifiers.ffn_threshold' in sys.modules\n"
            "with asp.sparsify(model, plan):\n"
            "    pass\n"
            "print(before, sorted({r.kind for r in plan.rules.values()}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False ['ffn_down', 'output_threshold', 'threshold']"
