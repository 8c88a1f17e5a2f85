"""Hydra grid -> validated cells -> keyed DAG (no Ray, no MLflow)."""
import pytest

from actsparse.errors import ActsparseError
from actsparse.sweep.compose import compose_grid
from actsparse.sweep.config import conf_dir, sweeps_dir
from actsparse.sweep.dag import build_dag
from actsparse.sweep.runner import plan_sweep


def _cells(overrides):
    cells, dag, _ = plan_sweep(compose_grid(overrides))
    return cells, dag


def test_preset_grid_is_the_cartesian_product_and_command_line_wins(tiny_dir):
    g = compose_grid(["+sweep=smoke", f"model={tiny_dir}", "sparsity=0.2,0.4,0.7"])
    # the preset sweeps method over dense,teal and sparsity over 0.3,0.6; the command line replaces sparsity
    got = sorted((c["method"]["name"], c["sparsity"]) for _, c in g.points)
    assert got == sorted((m, s) for m in ("dense", "teal") for s in (0.2, 0.4, 0.7))
    assert g.name == "smoke"
    for _, c in g.points:  # the preset's values and the model override reached every cell
        assert c["data"]["tokens"] == 1024 and c["eval"]["max_tokens"] == 1024
        assert c["model"]["name"] == str(tiny_dir)


def test_multirun_overrides_expand_like_hydra(tiny_dir):
    g = compose_grid([f"model={tiny_dir}", "method=teal", "sparsity=choice(0.1,0.2,0.3)", "eval.token_policy=all,decode"])
    pairs = [(c["sparsity"], c["eval"]["token_policy"]) for _, c in g.points]
    assert len(pairs) == 6 and {p[1] for p in pairs} == {"all", "decode"}
    assert sorted({round(p[0], 6) for p in pairs}) == [0.1, 0.2, 0.3]


def test_dense_at_many_sparsities_is_one_cell_and_keys_follow_their_inputs(tiny_dir):
    cells, dag = _cells(["+sweep=smoke", f"model={tiny_dir}", "sparsity=0.25,0.4,0.5,0.65"])
    dense = [c for c in cells if c.plan.method == "dense"]
    teal = [c for c in cells if c.plan.method == "teal"]
    assert len({c.key for c in dense}) == 1 and len({c.key for c in teal}) == 4
    assert len(dag.cells) == 5 and len(dag.duplicates) == 3
    assert len(dag.stats) == 1 and len(dag.dense) == 1 and len(dag.plans) == 5
    assert all(c.plan.target == 0.0 for c in dense)

    base = {c.plan.target: c for c in teal}[0.5]
    # the token policy is part of the eval spec: new cell, same plan, same dense evaluation
    (pol,), _ = _cells(["+sweep=smoke", f"model={tiny_dir}", "method=teal", "sparsity=0.5", "eval.token_policy=decode"])
    assert pol.key != base.key and pol.plan.key == base.plan.key and pol.dense.key == base.dense.key
    # more calibration tokens: new stats, so new plan and cell, but the same dense evaluation
    (tok,), _ = _cells(["+sweep=smoke", f"model={tiny_dir}", "method=teal", "sparsity=0.5", "data.tokens=2048"])
    assert tok.stats.key != base.stats.key and tok.plan.key != base.plan.key and tok.dense.key == base.dense.key
    # spelling out a default parameter does not change the plan
    (exp,), _ = _cells(["+sweep=smoke", f"model={tiny_dir}", "method=teal", "sparsity=0.5",
                        "method.params.allocation=uniform"])
    assert exp.key == base.key
    # the eval batch size is not part of any key; the device is not either
    (bs,), _ = _cells(["+sweep=smoke", f"model={tiny_dir}", "method=teal", "sparsity=0.5", "eval.batch_size=3"])
    assert bs.key == base.key


def test_model_key_follows_the_weights(tiny_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    (a,), _ = _cells([f"model={tiny_dir}", "method=teal"])
    (b,), _ = _cells([f"model={copy}", "method=teal"])
    assert a.stats.model.key == b.stats.model.key  # same files, same key, wherever they are
    cfg = (copy / "config.json").read_text()
    (copy / "config.json").write_text(cfg.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    (c,), _ = _cells([f"model={copy}", "method=teal"])
    assert c.stats.model.key != a.stats.model.key and c.key != a.key


def test_sweep_wide_settings_cannot_vary_between_cells(tiny_dir, tmp_path):
    with pytest.raises(ActsparseError, match="tracking"):
        _cells([f"model={tiny_dir}", f"tracking.uri=sqlite:///{tmp_path}/a.db,sqlite:///{tmp_path}/b.db"])


def test_build_dag_only_keeps_what_the_remaining_cells_need(tiny_dir):
    cells, dag = _cells(["+sweep=smoke", f"model={tiny_dir}", "eval.token_policy=all,decode"])
    teal_all = next(c for c in cells if c.plan.method == "teal" and c.eval.token_policy == "all")
    sub = dag.only({teal_all.key})
    assert list(sub.cells) == [teal_all.key] and list(sub.plans) == [teal_all.plan.key]
    assert list(sub.stats) == [teal_all.stats.key] and list(sub.dense) == [teal_all.dense.key]
    assert build_dag(cells).sweep_key == dag.sweep_key  # same grid, same sweep id


def test_dry_run_lists_cells_and_keys_and_touches_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    from actsparse.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--dry-run", "-m", "+sweep=smoke", f"model={tiny_dir}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 grid points -> 3 cells, 1 calibrations, 3 plans, 1 dense evaluations")
    assert out.count("(duplicate of #0)") == 1
    assert list(tmp_path.iterdir()) == []


def test_method_variants_are_labelled_by_their_non_default_params(tiny_dir):
    (c,), _ = _cells([f"model={tiny_dir}", "method=teal", "method.params.allocation=greedy"])
    assert c.method_label == "teal(allocation=greedy)"
    (c,), _ = _cells([f"model={tiny_dir}", "method=teal", "method.params.allocation=uniform"])   # the default
    assert c.method_label == "teal" and c.label.endswith("teal s=0.5")
    (c,), _ = _cells([f"model={tiny_dir}", "method=nm", "+method.params.pattern=8:16"])
    # labelled at the sparsity its pattern sets (8 of 16 kept), not at the grid's target
    assert c.method_label == "nm(pattern=8:16)" and c.label.endswith(" nm(pattern=8:16) s=0.5")


def test_a_method_filter_keeps_the_variants_of_that_method():
    import pandas as pd

    from actsparse.report.runs import RunFilter, tidy

    raw = pd.DataFrame({"params.method.name": ["teal", "teal", "cats", "dense"],
                        "tags.method_label": ["teal", "teal(allocation=greedy)", "cats", "dense"],
                        "tags.model": ["m"] * 4})
    df = tidy(raw)
    assert list(df["method"]) == ["teal", "teal(allocation=greedy)", "cats", "dense"]
    assert set(RunFilter(methods=["teal"]).apply(df)["method"]) == {"teal", "teal(allocation=greedy)", "dense"}
    assert set(RunFilter(methods=["teal(allocation=greedy)"]).apply(df)["method"]) == {"teal(allocation=greedy)",
                                                                                        "dense"}


PAPER = sorted(p.stem for p in sweeps_dir().glob("*_paper.yaml"))
METHOD_PAPER = sorted(p.stem for p in (conf_dir() / "method").glob("*_paper.yaml"))


def _listed(params: dict) -> dict:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in params.items()}


@pytest.mark.parametrize("preset", PAPER)
def test_paper_sweep_presets_compose_into_cells_of_their_method_preset_and_grid(preset):
    import yaml

    cells, _ = _cells([f"+sweep={preset}"])
    params = yaml.safe_load((conf_dir() / "method" / f"{preset}.yaml").read_text())["params"] or {}
    grid = yaml.safe_load((sweeps_dir() / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]["sparsity"]
    assert sorted(c.plan.target for c in cells) == sorted(float(s) for s in str(grid).split(","))
    for c in cells:
        assert _listed({k: c.plan.params[k] for k in params}) == _listed(params)


@pytest.mark.parametrize("preset", METHOD_PAPER)
def test_every_method_preset_composes_as_a_method_override(preset):
    import yaml

    conf = yaml.safe_load((conf_dir() / "method" / f"{preset}.yaml").read_text())
    cells, _ = _cells([f"method={preset}", "sparsity=0.5"])
    assert len(cells) == 1 and cells[0].plan.method == conf["name"]
    params = conf["params"] or {}
    assert _listed({k: cells[0].plan.params[k] for k in params}) == _listed(params)
