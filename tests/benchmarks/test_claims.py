"""benchmarks/claims.py and the claim sweeps run the same variants: every variant a claim fits is a
conf/claim option, Hydra composes it to the model, method and parameters the script fits, and the
presets sweep exactly those variants with the script's calibration and evaluation settings."""
import importlib.util
import pathlib
import types

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)

MODEL = {True: "tiny-llama", False: "tiny-gelu"}  # the reference model a gated / ungated variant pins
PRESETS = ("claims", "claims_frontier", "claims_protocols")


class Recorder(claims.Bench):
    """A Bench that returns made-up rows instead of fitting, so every claim runs in no time: perplexity
    1 + target (+ `worse` for the methods listed there), accuracy 0.5 +- 0.01 (dense 0.6 +- 0.01), and
    on the ungated model WINA's transform and LaRoSA refuse, as the real methods do."""

    def __init__(self, gated: bool, worse: dict | None = None):
        self.name, self.gated, self.dense, self.rows, self._acc_dense = MODEL[gated], gated, 1.0, {}, None
        self.args = types.SimpleNamespace(seq_calib_tokens=None, calib_tokens=16384, seq_len=256, acc_at=0.5,
                                          plans=None, measured_only=False)
        self._saved, self._dense = {}, {}
        self.worse = worse or {}

    def measure(self, method, target, params, calib, ev, fit_key):
        row = {"claims": [], "model": self.name, "method": claims.label(method, params), "target": target,
               "protocol": claims.protocol_label(calib, ev, self.args)}
        if not self.gated and (method == "larosa" or params.get("transform")):
            return row | {"error": f"{method} refuses gpt_neox"}
        ppl = 1 + target + self.worse.get(method, lambda t: 0.0)(target)
        return row | {"effective": target, "measured": target, "act_mean": target, "ppl": ppl, "ppl_dense": 1.0,
                      "ratio": ppl}

    def measure_acc(self, fit_key, token_policy):
        return {"acc": 0.5, "acc_se": 0.01, "acc_dense": 0.6, "acc_se_dense": 0.01}


def used_variants(monkeypatch) -> dict[str, tuple[bool, tuple]]:
    """{variant name: (gated, (model, method, params))} of every cell every claim asks for."""
    used, read = {}, claims.variant

    def record(name):
        used[name] = read(name)
        return read(name)

    monkeypatch.setattr(claims, "variant", record)
    benches = [Recorder(True), Recorder(False)]
    for fn, on in claims.CLAIMS.values():
        for b in claims.models_for(on, benches):
            before = set(used)
            ok, text = fn(b)
            assert (isinstance(ok, bool) or ok in ("holds", "fails", "refused")
                    or ok.startswith("holds only partly (at ")) and text
            assert all(used[n][0] == b.name for n in set(used) - before), f"a variant for {b.name} pins another model"
    return used


def swept(preset: str) -> list[str]:
    return yaml.safe_load((ROOT / "sweeps" / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]["claim"].split(",")


def protocol_of(cfg: dict) -> tuple:
    """(calibration tokens, calibration seq_len, evaluation seq_len, token policy) of a composed cell."""
    return cfg["data"]["tokens"], cfg["data"]["seq_len"], cfg["eval"]["seq_len"], cfg["eval"]["token_policy"]


def test_claims_use_every_claim_option_and_the_presets_sweep_them_all(monkeypatch):
    used = used_variants(monkeypatch)
    options = {p.stem for p in (ROOT / "conf" / "claim").glob("*.yaml")}
    assert set(used) <= options, f"claims.py fits variants with no conf/claim option: {sorted(set(used) - options)}"
    assert set(used) == options, f"conf/claim options no claim uses: {sorted(options - set(used))}"
    assert set().union(*(swept(p) for p in PRESETS)) == options


@pytest.mark.parametrize("preset", PRESETS)
def test_hydra_composes_each_claim_option_to_what_claims_py_fits(preset):
    from actsparse.sweep.compose import compose_grid
    from actsparse.sweep.config import method_defaults

    args = claims.parser().parse_args([])
    defaults = method_defaults()
    points = compose_grid([f"+sweep={preset}", "sparsity=0.5"]).points
    assert len(points) == len(swept(preset))
    for overrides, cfg in points:
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("claim="))
        model, method, params, p = claims.variant(name)
        assert (cfg["model"]["name"], cfg["method"]["name"]) == (model, method), name
        # a method preset composes to its own parameters only; asp.fit fills in the rest from the defaults
        want = defaults[method] | {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        assert defaults[method] | cfg["method"]["params"] == want, name
        # the settings claims.py calibrates and evaluates with: the option's protocol, else the script's
        assert (cfg["data"]["calib"], cfg["eval"]["data"]) == ("bundled:calib", "bundled:eval"), preset
        assert cfg["eval"]["max_tokens"] == args.max_tokens, preset
        assert protocol_of(cfg) == (p.calib_tokens or args.calib_tokens, p.calib_seq_len or args.seq_len,
                                    p.seq_len or args.seq_len, p.token_policy), name


def test_paper_claim_options_calibrate_and_evaluate_as_the_paper_sweeps_do():
    """`<m>_paper_<family>` takes sweeps/<m>_paper.yaml's calibration and evaluation; `<m>_paper_<n>_eval_<family>`
    calibrates as <m>'s sweep and evaluates as <n>'s (the claiming paper's) sweep."""
    from actsparse.sweep.compose import compose_grid

    composed = {}

    def protocol(sweep: str) -> tuple:
        if sweep not in composed:
            composed[sweep] = protocol_of(compose_grid([f"+sweep={sweep}", "sparsity=0.5"]).points[0][1])
        return composed[sweep]

    checked = 0
    for name in swept("claims_protocols"):
        stem = name.rsplit("_", 1)[0]
        fit, _, ev = stem.partition("_paper")
        ev = ev.strip("_").removesuffix("_eval")
        calib_sweep, eval_sweep = f"{fit}_paper", f"{ev}_paper" if ev else f"{fit}_paper"
        if not (ROOT / "sweeps" / f"{calib_sweep}.yaml").exists():
            continue        # scap, rsparse, nm: no preset sweep; the option follows the method preset's header
        p = claims.variant(name).protocol
        got = (p.calib_tokens, p.calib_seq_len, p.seq_len, p.token_policy)
        assert got[:2] == protocol(calib_sweep)[:2] and got[2:] == protocol(eval_sweep)[2:], name
        checked += 1
    assert checked >= 10


def test_variant_resolves_a_method_preset_and_the_option_overrides_its_params():
    v = claims.variant("scap_paper_gelu")
    preset = yaml.safe_load((ROOT / "conf" / "method" / "scap_paper.yaml").read_text())
    assert (v.model, v.method) == ("tiny-gelu", "scap")
    assert v.params == preset["params"] | {"roles": ["down"], "mode": "kde"}
    assert v.protocol == claims.Protocol(16384, 256, 256, "all")
    assert claims.variant("teal_uniform_llama").protocol == claims.Protocol()


@pytest.mark.parametrize("wins, want", [({0.25: True, 0.4: True}, "holds"), ({0.25: False, 0.4: False}, "fails"),
                                        ({0.25: False, 0.4: True, 0.5: True}, "holds only partly (at 0.4, 0.5)")])
def test_tally_says_where_a_claim_holds(wins, want):
    assert claims.tally(wins) == want


def test_a_refusing_method_makes_the_verdict_its_reason_and_fits_no_baseline():
    b = Recorder(False)
    ok, text = claims.claim9(b)
    assert ok == "refused" and "refuses gpt_neox" in text
    assert [r["method"].split("(")[0] for r in b.rows.values()] == ["wina"]


def test_pairwise_claims_compare_perplexity_at_each_target_and_report_accuracy_at_acc_at():
    b = Recorder(True, worse={"wina": lambda t: 0.1 if t >= 0.5 else -0.1})  # WINA better below 0.5, worse above
    ok, text = claims.claim9(b)
    assert ok == "holds only partly (at 0.25, 0.4)"
    assert text.count("acc 50.0 +- 1.0") == 2 and "accuracy difference within 2 se" in text
    acc_rows = [r for r in b.rows.values() if "acc" in r]
    assert {r["target"] for r in acc_rows} == {0.5} and len(acc_rows) == 2


def test_near_dense_fails_when_accuracy_is_significantly_below_dense():
    ok, text = claims.claim13(Recorder(True))      # 0.5 +- 0.01 vs dense 0.6 +- 0.01: 10 points > 2 se
    assert ok == "fails" and "significantly below" in text


def test_render_marks_refused_cells_and_prints_accuracy_with_its_error():
    b = Recorder(False)
    b.dense_ppl, b._dense = (lambda n: 1.0), {256: 1.0}
    claims.claim9(b)
    claims.claim13(b)
    table, verdict = claims.render([b], [("9", "refused", "x"), ("13", "fails", "y")])
    assert "| refused: wina refuses gpt_neox |" in table and "50.0 ± 1.0" in table
    assert verdict.splitlines() == ["- claim 9: **refused** - x", "- claim 13: **fails** - y"]


@pytest.mark.parametrize("given", [None, 1234])
def test_sequential_calibration_tokens_come_from_the_option_unless_given(given):
    b = Recorder(True)
    b.args.seq_calib_tokens = given
    row = b.cell("8", "teal_sequential", 0.5)
    want = given or claims.variant("teal_sequential_llama").params["calib_tokens"]
    assert f"calib_tokens={want}" in row["method"]


def test_a_rerun_with_the_same_plans_folder_reuses_the_measured_cells(tmp_path):
    first = Recorder(True)
    first.args.plans = str(tmp_path)
    claims.claim9(first)
    again = Recorder(True)
    again.args.plans = str(tmp_path)
    again._saved = again.load_saved()
    again.measure = again.measure_acc = lambda *a: pytest.fail("a saved cell was measured again")
    assert claims.claim9(again) == claims.claim9(first)
    assert {k: {**r, "claims": []} for k, r in again.rows.items()} == \
        {k: {**r, "claims": []} for k, r in first.rows.items()}


def test_a_stopped_run_keeps_the_finished_verdicts_and_names_the_unfinished_claims(monkeypatch):
    def stop(b):
        raise KeyboardInterrupt

    monkeypatch.setitem(claims.CLAIMS, "10", (stop, "every"))
    verdicts = claims.check([Recorder(True), Recorder(False)], ["9", "10", "11"])
    assert [(c, v) for c, v, _ in verdicts] == [("9", "fails"), ("9", "refused"), ("10", "not finished"),
                                                ("11", "not finished")]


def test_measured_only_judges_the_saved_cells_and_names_the_missing_targets(tmp_path):
    first = Recorder(True, worse={"teal": lambda t: 0.1})
    first.args.plans = str(tmp_path)
    for s in (0.25, 0.4):                           # a run stopped after two of the four targets
        first.cell("9", "wina_paper", s)
        first.cell("9", "teal_paper_wina_eval", s)
    again = Recorder(True)
    again.args.plans, again.args.measured_only = str(tmp_path), True
    again._saved = again.load_saved()
    ok, text = claims.claim9(again)
    assert ok == "holds (not measured at 0.5, 0.65)" and text.endswith("(not measured at 0.5, 0.65)")
    verdicts = claims.check([again], ["13"])
    assert verdicts[0][:2] == ("13", "not measured")
