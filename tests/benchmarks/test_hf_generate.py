"""benchmarks/hf_generate.py: Hugging Face `generate` on the engine presets' shapes, the dense engine's baseline, and
its rows in benchmarks/bench_kernels.py (`--hf-baseline`)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from actsparse.engine.config import PRESETS, QWEN2_5_7B, TINY, LlamaConfig, unsupported_reason
from benchmarks import hf_generate
from benchmarks.hf_generate import PRESET_FAMILY, hf_config_for, hf_generate_speed, hf_generate_tok_s

ROOT = Path(__file__).resolve().parents[2]
CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM", "gemma2": "Gemma2ForCausalLM",
         "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         "qwen2_moe": "Qwen2MoeForCausalLM"}


def _n_params(c: LlamaConfig) -> int:
    """The weights a model of these shapes holds, counted from the engine's side of the spec."""
    d = c.hidden_size
    mlp = c.n_experts * (3 * d * c.moe_intermediate_size + d) if c.moe else 3 * d * c.intermediate_size  # + router
    mlp += 3 * d * c.shared_expert_intermediate_size + d * bool(c.shared_expert_intermediate_size)  # + its gate
    per = d * (c.q_size + 2 * c.kv_size) + c.q_size * d + mlp
    per += (c.q_size + 2 * c.kv_size) * c.qkv_bias + 2 * c.head_dim * c.qk_norm + (4 if c.sandwich_norms else 2) * d
    return c.vocab_size * d * (1 if c.tie_embeddings else 2) + c.n_layers * per + d


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_transformers_config_of_a_preset_reads_back_as_the_preset_and_builds_its_weights(name):
    """from_hf of the built config is the preset (shapes, activation, norms, scales, caps, local layers, RoPE); the
    model transformers builds from it (on the meta device) is the family's class with the preset's weight count."""
    import transformers as tr

    hf = hf_config_for(name)
    assert LlamaConfig.from_hf(hf) == PRESETS[name]
    assert unsupported_reason(hf) is None
    with torch.device("meta"):
        model = tr.AutoModelForCausalLM.from_config(hf)
    assert type(model).__name__ == CLASS[PRESET_FAMILY[name]]
    assert sum(p.numel() for p in model.parameters()) == _n_params(PRESETS[name])
    # only eager attention applies Gemma 2's score soft-cap (SDPA dropped it silently up to transformers 5.20)
    assert (model.config._attn_implementation == "eager") == (PRESETS[name].attn_softcap > 0)


def test_fewer_layers_keep_the_local_global_pattern():
    hf = hf_config_for("gemma3-12b", n_layers=7)
    assert hf.num_hidden_layers == 7 and hf.layer_types.count("full_attention") == 1  # layer 6 of every 6
    assert LlamaConfig.from_hf(hf) == PRESETS["gemma3-12b"].with_layers(7)


def test_an_engine_config_without_a_name_reads_as_its_family():
    assert type(hf_config_for(replace(TINY, qk_norm=True))).__name__ == "Qwen3Config"
    assert type(hf_config_for(replace(TINY, qkv_bias=True))).__name__ == "Qwen2Config"
    assert type(hf_config_for(PRESETS["gemma2-9b"].with_layers(2))).__name__ == "Gemma2Config"
    assert type(hf_config_for(TINY, family="granite")).__name__ == "GraniteConfig"


def test_what_no_transformers_config_holds_is_refused():
    with pytest.raises(ValueError, match=r"unknown engine preset 'llama9-1b'; expected one of llama3-8b, "):
        hf_config_for("llama9-1b")
    with pytest.raises(ValueError, match="unknown transformers family 'olmo2'"):
        hf_config_for("tiny", family="olmo2")
    with pytest.raises(TypeError, match="engine preset name or an actsparse LlamaConfig, got dict"):
        hf_config_for({"hidden_size": 64})
    with pytest.raises(ValueError, match="qwen2 model's head_dim is hidden_size / heads = 128; this engine config "
                                         "has head_dim 64"):
        hf_config_for(replace(QWEN2_5_7B, head_dim=64))
    # a soft-cap on a Llama block: no Llama config has one, so it would not be the model the engine decodes
    with pytest.raises(ValueError, match=r"no llama transformers config has exactly .*'attn_softcap': \(5.0, 0.0\)"):
        hf_config_for(replace(TINY, attn_softcap=5.0))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_is_timed_on_exactly_steps_new_tokens_and_decodes_what_plain_generate_does(family):
    """Three timed calls through one static cache reset in place decode the tokens a plain (dynamic-cache)
    `generate` of the same random model decodes; both rates are positive."""
    import transformers as tr

    cfg = TINY.with_layers(1) if family == "llama" else replace(
        PRESETS["gemma2-9b"], vocab_size=300, hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2,
        head_dim=16, embed_scale=8.0, attn_scale=16**-0.5, sliding_window=6).with_layers(3)
    seed = int(torch.randint(0, 2**31, ()))
    got = hf_generate_speed(cfg, steps=5, prompt_len=7, compile=False, device="cpu", dtype=torch.float32, seed=seed)
    assert got["new_tokens"] == 5 and len(got["tokens"][0]) == 7 + 5
    assert got["tok_s"] > 0 and got["tok_s_call"] > 0 and got["compile"] == "off" and not got["compiled"]
    assert got["family"] == family and got["layers"] == cfg.n_layers

    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(hf_config_for(cfg), dtype=torch.float32).eval()
    prompt = torch.randint(1, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert got["tokens"] == want.tolist()


def test_tok_s_is_the_whole_calls_rate_and_too_few_steps_are_refused():
    assert hf_generate_tok_s("tiny", n_layers=1, steps=3, compile=False, device="cpu", dtype=torch.float32) > 0
    with pytest.raises(ValueError, match="need steps ≥ 2"):
        hf_generate_speed("tiny", steps=1, compile=False, device="cpu")


def test_cli_writes_a_row_per_preset_and_a_failing_preset_is_an_error_row(tmp_path, monkeypatch, capsys):
    real = hf_generate.hf_generate_speed

    def speed(preset, **kw):
        if preset == "gemma2-9b":
            raise RuntimeError("Dynamo failed to run FX node")  # as a model that does not compile fails
        return real(preset, **kw)

    monkeypatch.setattr(hf_generate, "hf_generate_speed", speed)
    hf_generate.main(["--presets", "gemma2-9b,tiny", "--out", str(tmp_path), "--layers", "1", "--steps", "3",
                      "--device", "cpu", "--no-compile"])
    got = json.loads((tmp_path / "hf_generate.json").read_text())
    bad, tiny = got["rows"]
    assert bad == {"model": "gemma2-9b", "tok_s": None, "error": "RuntimeError: Dynamo failed to run FX node"}
    assert tiny["model"] == "tiny" and tiny["tok_s"] > 0 and tiny["new_tokens"] == 3 and "tokens" not in tiny
    assert got["meta"]["steps"] == 3 and got["meta"]["transformers"]
    out = capsys.readouterr().out
    assert "[hf-generate gemma2-9b]" in out and "| gemma2-9b | | | | | error: RuntimeError: Dynamo failed" in out
    with pytest.raises(SystemExit):
        hf_generate.main(["--presets", "tiny,qwen9", "--out", str(tmp_path)])
    assert "unknown engine preset(s) qwen9" in capsys.readouterr().err


def _bench(tmp_path, *args):
    env = {**os.environ, "BENCH_SMOKE": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--out", str(tmp_path),
                           "--skip-kernels", "--budget-s", "2000", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_benchs_hf_baseline_rows_sit_beside_our_dense_rows(tmp_path):
    run = _bench(tmp_path, "--decode-models", "llama2-7b:1", "--decode-steps", "3", "--hf-baseline",
                 "--decode-dense-only")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    got = json.loads((tmp_path / "results.json").read_text())
    assert "error" not in got["extra"], got["extra"].get("error")
    dense, hf = got["rows"]  # dense only: no sparse rows
    assert (dense["method"], hf["method"]) == ("dense", "hf-generate") and hf["model"] == dense["model"] == "llama2-7b"
    assert hf["batch"] == 1 and hf["kind"] == "decode" and hf["tok_s"] > 0 and hf["new_tokens"] == 3
    assert hf["tok_s_dense"] == dense["tok_s"]
    # of the unrounded figures: tok/s are rounded to 0.1, which on a slow (loaded) CPU is a few percent
    rounding = 0.05 / hf["tok_s"] + 0.05 / dense["tok_s"]
    assert hf["speedup"] == pytest.approx(hf["tok_s"] / dense["tok_s"], rel=rounding + 0.005)
    md = (tmp_path / "BENCHMARKS_fragment.md").read_text()
    assert "### Dense engine vs Hugging Face generate" in md and "### Decode, random weights" not in md
    assert (f"| llama2-7b | 2 | {dense['tok_s']:.1f} | {hf['tok_s']:.1f} | {dense['tok_s'] / hf['tok_s']:.2f}× | "
            f"{hf['tok_s_call']:.1f} | sdpa, off |") in md


def test_the_bench_refuses_an_unknown_family_preset(tmp_path):
    run = _bench(tmp_path, "--decode-families", "qwen3-8b,gemma9-2b", "--hf-baseline")
    assert run.returncode == 2 and "--decode-families: unknown engine preset(s) gemma9-2b" in run.stderr
