"""The offline lm-eval tasks: rebuilt byte for byte from the bundled texts, and well formed."""
from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import pytest

import actsparse as asp
from actsparse.eval.lm_eval import TASK_DIR, offline_tasks

REPO = Path(__file__).resolve().parents[2]
TASKS = ("actsparse_continuation", "actsparse_continuation_local")


def _load(task: str, split: str) -> list[dict]:
    return [json.loads(x) for x in (TASK_DIR / f"{task}.{split}.jsonl").read_text("utf-8").splitlines()]


def test_shipped_tasks_are_what_the_builder_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_offline_tasks", REPO / "scripts" / "build_offline_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    built = sorted(p.name for p in tmp_path.iterdir())
    # every shipped file but the hand-written loader (which reads the JSONL) is the builder's output
    assert built == sorted(p.name for p in TASK_DIR.iterdir() if p.is_file() and p.name != "loader.py")
    assert (TASK_DIR / "loader.py").is_file()
    for name in built:
        assert (tmp_path / name).read_bytes() == (TASK_DIR / name).read_bytes(), name
    assert offline_tasks() == ["actsparse_context", "actsparse_continuation", "actsparse_continuation_local",
                               "actsparse_offline"]


@pytest.mark.parametrize("task", TASKS)
def test_items_pair_a_passage_with_its_true_next_sentence(task):
    docs = [" ".join(d.split()) for d in asp.text_data("bundled:eval").documents]
    items = _load(task, "test")
    assert len(items) > 500 and len({r["id"] for r in items}) == len(items)
    labels = collections.Counter(r["label"] for r in items)
    assert set(labels) == {0, 1, 2, 3} and min(labels.values()) > 0.18 * len(items)
    for r in items:
        doc = docs[r["doc"]]
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        assert f'{r["context"]} {r["choices"][r["label"]]}' in doc  # the true sentence follows the passage
        wrong = [c for i, c in enumerate(r["choices"]) if i != r["label"]]
        if task == "actsparse_continuation":
            assert not any(c in doc for c in wrong)  # distractors come from other documents
        else:
            assert all(c in doc for c in wrong)      # distractors come from the same document
    shots = _load(task, "validation")
    calib = " ".join(" ".join(d.split()) for d in asp.text_data("bundled:calib").documents)
    assert len(shots) == 48 and all(r["context"] in calib for r in shots)  # few-shot text is never eval text


def test_context_items_score_one_sentence_after_each_candidate_passage():
    docs = [" ".join(d.split()) for d in asp.text_data("bundled:eval").documents]
    items = _load("actsparse_context", "test")
    assert len(items) > 500
    labels = collections.Counter(r["label"] for r in items)
    assert set(labels) == {0, 1, 2, 3} and min(labels.values()) > 0.18 * len(items)
    for r in items:
        assert len(r["passages"]) == 4 == len(set(r["passages"]))
        assert f'{r["passages"][r["label"]]} {r["sentence"]}' in docs[r["doc"]]
        assert not any(p in docs[r["doc"]] for i, p in enumerate(r["passages"]) if i != r["label"])


def test_offline_tasks_index_without_the_builtin_tasks():
    pytest.importorskip("lm_eval")
    from actsparse.eval.lm_eval import task_manager

    tm = task_manager(False)
    assert set(offline_tasks()) <= set(tm.all_tasks) and len(tm.all_tasks) < 10
