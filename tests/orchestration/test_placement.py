"""A cell's GPUs follow its model's memory: the estimate from the config alone, the GPU count, the refusal of a
cell no node holds, and what --dry-run prints (no Ray, no MLflow, no weights loaded)."""
import math

import pytest

from actsparse.models.footprint import estimate_memory, model_shape
from actsparse.sweep.placement import USABLE

# Llama-3-70B's shape
V, H, L, I, NH, KV, HD = 128256, 8192, 80, 28672, 64, 8, 128
H100 = 85.52  # GB: an H100 80GB's 81559 MiB, as torch.cuda reports it


@pytest.fixture(scope="module")
def llama70(tmp_path_factory):
    """A 70B-shaped model folder: config.json only (no weights: nothing may load them)."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama-70b-shaped")
    LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                num_key_value_heads=KV, max_position_embeddings=8192, dtype="bfloat16").save_pretrained(path)
    return path


def _hand_70b_bf16_peak(eval_batch=8, eval_seq=256) -> float:
    """Weights plus the evaluation forward (the stage that sets a quality cell's peak), by hand."""
    per_layer = H * NH * HD + 2 * H * KV * HD + NH * HD * H + 3 * H * I + 2 * H   # q, k+v, o, gate/up/down, norms
    params = L * per_layer + 2 * V * H + H                                       # + embeddings, LM head, final norm
    assert params == 70_553_706_496                                             # Meta's "70B"
    bt, b = eval_batch * eval_seq, 2
    act = bt * b * (2 * H + 3 * I) + eval_batch * NH * eval_seq ** 2 * b + bt * V * (b + 8)
    return params * b + act


def test_70b_parameters_come_from_the_config_and_weigh_141_gb_in_bf16(llama70):
    from actsparse.models.footprint import _meta_shape

    s = model_shape(str(llama70))
    assert s == _meta_shape(str(llama70), local=True)          # the formula = what transformers would build
    assert s.params == 70_553_706_496
    assert s.linear_params == L * (H * NH * HD + 2 * H * KV * HD + NH * HD * H + 3 * H * I)
    assert (s.layers, s.hidden, s.inter, s.heads, s.kv_heads, s.head_dim, s.vocab) == (L, H, I, NH, KV, HD, V)
    est = estimate_memory(s, "bfloat16", (4, 256, 131072), (8, 256))
    assert est.weights == pytest.approx(141.107e9, rel=1e-5)
    assert est.peak == _hand_70b_bf16_peak()
    # calibration by hand: its forward at batch 4, 6 probe tensors per layer, the collector's working copies
    probes = L * (6 * (8 * 131072 + 8 * 1200) + 24 * (3 * H + 3 * I))
    cal = 1024 * 2 * (2 * H + 3 * I) + 4 * NH * 256 ** 2 * 2 + 1024 * V * 10 + probes + 24 * 1024 * I
    assert est.calibration == cal
    # decode speed: the engine's two bf16 copies of the block linears + a KV cache of 1 x (16 + 128 + 1) positions
    sp = estimate_memory(s, "bfloat16", (4, 256, 131072), (8, 256), speed=(1, 16, 128))
    assert sp.speed == 2 * s.linear_params * 2 + 2 * L * KV * HD * 145 * 2


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", {"head_dim": 24}),
])
def test_the_llama_formula_counts_what_transformers_builds(model_type, extra, tmp_path):
    from transformers import AutoConfig

    from actsparse.models.footprint import _meta_shape

    AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, **extra).save_pretrained(tmp_path)
    assert model_shape(str(tmp_path)) == _meta_shape(str(tmp_path), local=True)


def test_other_families_are_counted_on_the_meta_device(tmp_path):
    from tests.conftest import make_model

    model = make_model("gpt2")
    model.config.save_pretrained(tmp_path)
    s = model_shape(str(tmp_path))
    assert s.params == sum(p.numel() for p in model.parameters()) and (s.layers, s.hidden, s.inter) == (2, 64, 256)


def test_a_small_models_count_equals_its_loaded_weights(tiny):
    model, _ = tiny
    s = model_shape(str(model.actsparse_source.path))
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.linear_params == sum(m.weight.numel() for m in model.modules()
                                  if type(m).__name__ == "Linear" and m is not model.lm_head)


def _dry_run(capsys, *overrides):
    from actsparse.cli import main

    rc = main(["sweep", "--dry-run", *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _refuse_ray(monkeypatch) -> None:
    """Make any start of Ray fail the test (a cluster another test left running in this process must not hide it)."""
    import ray

    def init(*a, **kw):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def test_dry_run_prints_each_cells_estimate_and_gpus_and_starts_nothing(llama70, tmp_path, monkeypatch, capsys):
    _refuse_ray(monkeypatch)
    monkeypatch.chdir(tmp_path)
    gpu = [f"model={llama70}", "model.dtype=bfloat16", "launcher=gpu", "device=cuda", f"launcher.gpu_memory_gb={H100}",
           "ray.num_gpus=8"]
    rc, out, err = _dry_run(capsys, "-m", *gpu, "method=teal", "sparsity=0.5")
    assert rc == 0, err
    peak = _hand_70b_bf16_peak()
    n = math.ceil(peak / (USABLE * H100 * 1e9))
    assert n == 2
    assert f"GPUs: {H100:.1f} GB each (launcher.gpu_memory_gb), 8 per node (ray.num_gpus)" in out
    assert f"memory {peak / 1e9:.1f} GB = 141.1 GB weights + " in out and f"; {n} GPU(s) (auto: " in out
    # decode speed: 3 copies of the linears need 6 GPUs, rounded up to 8 so the engine splits 8 KV heads evenly
    rc, out, err = _dry_run(capsys, *gpu, "method=teal", "eval=speed")
    assert rc == 0, err
    assert "GB speed; 8 GPU(s) (auto: " in out
    # a fixed count is taken as given, and a cell it cannot hold is said so
    rc, out, err = _dry_run(capsys, *gpu, "method=teal", "launcher.gpus_per_cell=1")
    assert rc == 0 and "; 1 GPU(s) (launcher.gpus_per_cell)" in out
    assert f"is estimated at {peak / 1e9:.1f} GB, more than the {USABLE * H100:.1f} GB usable on" in out
    assert list(tmp_path.iterdir()) == []


def test_a_cell_no_node_holds_is_refused_before_ray_naming_the_figures(llama70, tmp_path, monkeypatch, capsys):
    from actsparse.cli import main

    _refuse_ray(monkeypatch)
    monkeypatch.chdir(tmp_path)
    rc = main(["sweep", f"model={llama70}", "model.dtype=bfloat16", "method=teal", "launcher=gpu", "device=cuda",
               f"launcher.gpu_memory_gb={H100}", "ray.num_gpus=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err
    assert rc == 2
    peak = _hand_70b_bf16_peak()
    assert err.startswith(f"actsparse: error: cell llama-70b-shaped0 teal s=0.5 needs 2 GPUs of one node: its "
                          f"estimate {peak / 1e9:.1f} GB = 141.1 GB weights + ")
    assert f"over 90% of {H100:.1f} GB per GPU (launcher.gpu_memory_gb); but a node has 1 GPU(s) (ray.num_gpus)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, msg", [
    ("launcher.gpus_per_cell=two", "launcher.gpus_per_cell must be auto or an integer >= 1, got 'two'"),
    ("launcher.gpus_per_cell=0", "launcher.gpus_per_cell must be auto or an integer >= 1, got '0'"),
    ("launcher.gpu_memory_gb=0", "launcher.gpu_memory_gb must be > 0 (GB of one GPU) or null"),
])
def test_bad_gpu_settings_are_refused(override, msg, tiny_dir, capsys):
    rc, _, err = _dry_run(capsys, f"model={tiny_dir}", "method=teal", override)
    assert rc == 2 and msg in err


def test_model_workers_only_serve_models_of_their_size():
    from types import SimpleNamespace

    from actsparse.sweep.affinity import AffinityScheduler, _Slot

    gpu = {"num_cpus": 1, "num_gpus": 1}
    sched = AffinityScheduler(None, {"calibrate": gpu, "evaluate": gpu, "workers_per_model": None,
                                     "model_gpus": {"small": 1, "big": 4}}, None, {}, None,
                              pool=SimpleNamespace(slots=[_Slot(None, 4.0)]))
    sched.caps = {1: 8, 4: 2}
    sched.queued.update({"small": 10, "big": 1})
    assert sched._choose_model(sched.slots[0]) == "big"
    sched.queued["big"] = 0
    assert sched._choose_model(sched.slots[0]) is None      # small's work is not for a 4-GPU worker
    assert sched._choose_model(_Slot(None, 1.0)) == "small"
