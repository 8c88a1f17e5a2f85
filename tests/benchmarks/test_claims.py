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
PRESETS = ("claims", "claims_frontier")


class Recorder(claims.Bench):
    """A Bench that returns made-up rows instead of fitting, so every claim runs in no time."""

    def __init__(self, gated: bool):
        self.name, self.gated, self.dense, self.rows = MODEL[gated], gated, 1.0, {}
        self.args = types.SimpleNamespace(seq_calib_tokens=None)

    def measure(self, method, target, params):
        return {"claims": [], "model": self.name, "method": claims.label(method, params), "target": target,
                "effective": target, "measured": target, "act_mean": target, "ppl": 1 + target, "ratio": 1 + target}


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
            assert isinstance(ok, bool) and text
            assert all(used[n][0] == b.name for n in set(used) - before), f"a variant for {b.name} pins another model"
    return used


def swept(preset: str) -> list[str]:
    return yaml.safe_load((ROOT / "sweeps" / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]["claim"].split(",")


def test_claims_use_every_claim_option_and_the_presets_sweep_them_all(monkeypatch):
    used = used_variants(monkeypatch)
    options = {p.stem for p in (ROOT / "conf" / "claim").glob("*.yaml")}
    assert set(used) <= options, f"claims.py fits variants with no conf/claim option: {sorted(set(used) - options)}"
    assert set(used) == options, f"conf/claim options no claim uses: {sorted(options - set(used))}"
    assert set(swept("claims")) | set(swept("claims_frontier")) == options


def test_hydra_composes_each_claim_option_to_what_claims_py_fits():
    from actsparse.sweep.compose import compose_grid
    from actsparse.sweep.config import method_defaults

    args = claims.parser().parse_args([])
    defaults = method_defaults()
    for preset in PRESETS:
        points = compose_grid([f"+sweep={preset}", "sparsity=0.5"]).points
        assert len(points) == len(swept(preset))
        for overrides, cfg in points:
            name = next(o.split("=", 1)[1] for o in overrides if o.startswith("claim="))
            model, method, params = claims.variant(name)
            assert (cfg["model"]["name"], cfg["method"]["name"]) == (model, method), name
            want = defaults[method] | {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
            assert cfg["method"]["params"] == want, name
            # the settings claims.py calibrates and evaluates with
            assert (cfg["data"]["calib"], cfg["eval"]["data"], cfg["eval"]["token_policy"]) == \
                ("bundled:calib", "bundled:eval", "all"), preset
            assert cfg["data"]["tokens"] == args.calib_tokens and cfg["eval"]["max_tokens"] == args.max_tokens, preset
            assert cfg["data"]["seq_len"] == cfg["eval"]["seq_len"] == args.seq_len, preset


@pytest.mark.parametrize("given", [None, 1234])
def test_sequential_calibration_tokens_come_from_the_option_unless_given(given):
    b = Recorder(True)
    b.args.seq_calib_tokens = given
    row = b.cell("8", "teal_sequential", 0.5)
    want = given or claims.variant("teal_sequential_llama")[2]["calib_tokens"]
    assert f"calib_tokens={want}" in row["method"]
