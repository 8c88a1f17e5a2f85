"""The artifact store (a directory, or any fsspec URL) and the launcher checks that run before anything starts."""
from __future__ import annotations

import json

import pytest
import torch

from actsparse.artifacts import is_valid, load_tensors_json, save_tensors_json
from actsparse.errors import ActsparseError
from actsparse.sweep.compose import compose_grid
from actsparse.sweep.faults import from_env
from actsparse.sweep.runner import plan_sweep
from actsparse.sweep.store import FsspecStore, LocalStore, open_store


def _store(kind: str, tmp_path):
    if kind == "dir":
        return open_store(str(tmp_path / "store"))
    return open_store(f"file://{tmp_path}/remote", cache_dir=str(tmp_path / "node_cache"))


def _write(st, kind: str, key: str, tensors: dict, meta: dict):
    target = st.target(kind, key)
    save_tensors_json(target, tensors, meta)
    return st.publish(kind, key, target)


def _flip_byte(path, offset: int = -5) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_open_store_picks_a_directory_or_fsspec_by_the_spec(tmp_path):
    assert isinstance(open_store(str(tmp_path / "s")), LocalStore)
    assert isinstance(open_store("relative/store"), LocalStore) and open_store("relative/store").url.startswith("/")
    assert isinstance(open_store(f"file://{tmp_path}/s"), FsspecStore)
    assert isinstance(open_store("memory://bucket/prefix"), FsspecStore)


@pytest.mark.parametrize("kind", ["dir", "url"])
def test_published_artifact_reads_back_bit_exact_from_a_fresh_store_object(kind, tmp_path):
    w = torch.randn(37, 11, dtype=torch.float64)
    st = _store(kind, tmp_path)
    _write(st, "plans", "k1", {"w": w}, {"kind": "plan", "x": 3})
    again = _store(kind, tmp_path)            # another process/node: nothing in memory
    path = again.fetch("plans", "k1")
    t, meta = load_tensors_json(path)
    assert torch.equal(t["w"], w) and meta["x"] == 3
    assert again.fetch("plans", "other") is None
    assert again.keys("plans") == ["k1"] and again.keys("stats") == []


@pytest.mark.parametrize("kind", ["dir", "url"])
def test_a_corrupt_artifact_reads_as_absent_and_a_rewrite_replaces_it(kind, tmp_path):
    st = _store(kind, tmp_path)
    w = torch.randn(64)
    _write(st, "stats", "k", {"w": w}, {"kind": "stats"})
    stored = (tmp_path / "store" if kind == "dir" else tmp_path / "remote") / "stats" / "k" / "tensors.safetensors"
    _flip_byte(stored)
    fresh = _store(kind, tmp_path)
    if kind == "url":  # the node cache still holds the good copy: a corrupt store copy must not be trusted either
        assert fresh.fetch("stats", "k") is not None
        (tmp_path / "node_cache").rename(tmp_path / "old_cache")
        fresh = _store(kind, tmp_path)
    assert fresh.fetch("stats", "k") is None
    w2 = torch.randn(64)
    _write(fresh, "stats", "k", {"w": w2}, {"kind": "stats"})
    assert torch.equal(load_tensors_json(_store(kind, tmp_path).fetch("stats", "k"))[0]["w"], w2)
    assert fresh.keys("stats") == ["k"]


def test_an_interrupted_upload_is_invisible_and_a_half_written_artifact_is_absent(tmp_path):
    st = _store("url", tmp_path)
    src = tmp_path / "src"
    save_tensors_json(src, {"w": torch.randn(8)}, {"kind": "plan"})
    # a writer killed after the tensors, before meta.json: what it leaves is hidden staging
    staging = tmp_path / "remote" / "plans" / ".staging-k-1234abcd"
    staging.mkdir(parents=True)
    (staging / "tensors.safetensors").write_bytes((src / "tensors.safetensors").read_bytes())
    # a store without atomic moves, caught between copying the tensors and meta.json
    half = tmp_path / "remote" / "plans" / "k2"
    half.mkdir()
    (half / "tensors.safetensors").write_bytes((src / "tensors.safetensors").read_bytes()[:20])
    assert st.keys("plans") == ["k2"]
    assert st.fetch("plans", "k") is None and st.fetch("plans", "k2") is None
    # meta.json of another artifact over these tensors: the checksum says no
    (half / "meta.json").write_text((src / "meta.json").read_text())
    assert st.fetch("plans", "k2") is None


def test_the_url_store_notices_an_artifact_replaced_by_another_node(tmp_path):
    a = _store("url", tmp_path)
    b = FsspecStore(f"file://{tmp_path}/remote", cache_dir=str(tmp_path / "node_b"))
    _write(a, "dense", "k", {"v": torch.tensor([1.0])}, {"kind": "dense_eval", "ppl": 1.0})
    assert json.loads((a.fetch("dense", "k") / "meta.json").read_text())["ppl"] == 1.0
    _write(b, "dense", "k", {"v": torch.tensor([2.0])}, {"kind": "dense_eval", "ppl": 2.0})
    p = a.fetch("dense", "k")   # a's cached copy has the old checksum: it downloads the new one
    assert json.loads((p / "meta.json").read_text())["ppl"] == 2.0 and is_valid(p)


def test_store_objects_travel_to_workers_without_their_file_system(tmp_path):
    import pickle

    st = _store("url", tmp_path)
    st.keys("plans")               # opens the file system
    clone = pickle.loads(pickle.dumps(st))
    assert clone._fs is None and clone.url == st.url and clone.cache == st.cache


BAD_LAUNCHER = {
    "unknown store scheme": (["launcher.store=nosuchfs://bucket/x"], "fsspec cannot open nosuchfs:// URLs"),
    "zero workers per model": (["launcher.workers_per_model=0"], "launcher.workers_per_model must be >= 1 or null"),
    "negative oom retries": (["launcher.oom_retries=-1"], "launcher.oom_retries must be >= 0, got -1"),
    "negative gpus": (["launcher.evaluate.num_gpus=-1"], "launcher.evaluate.num_gpus must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_LAUNCHER))
def test_bad_launcher_settings_are_refused_before_anything_starts(case, tiny_dir):
    extra, message = BAD_LAUNCHER[case]
    with pytest.raises(ActsparseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_sweep(compose_grid(["+sweep=smoke", f"model={tiny_dir}", *extra]))


@pytest.mark.parametrize("text,message", [
    ("{not json", "must be a JSON object"),
    ('{"explode": []}', "with keys among ['hold', 'oom', 'raise']"),
    ('{"oom": [{"stage": "cook"}]}', "stage in ['calibrate', 'fit', 'dense', 'cell', 'worker']"),
    ('{"raise": [{"stage": "fit", "type": "NoSuchError"}]}', "a built-in exception name (e.g. ImportError)"),
    ('{"raise": [{"stage": "fit", "type": "print"}]}', "a built-in exception name (e.g. ImportError)"),
])
def test_a_malformed_fault_hook_is_refused(text, message, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_INJECT_FAULTS", text)
    with pytest.raises(ActsparseError) as e:
        from_env()
    assert message in str(e.value)
