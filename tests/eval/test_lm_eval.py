"""lm-eval accuracy on the sparsified in-memory model, checked against an independent scoring."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

import actsparse as asp
from actsparse.eval.lm_eval import TASK_DIR, _wrapper_class

pytest.importorskip("lm_eval")


def rows(task: str, n: int) -> list[dict]:
    lines = (TASK_DIR / f"{task}.test.jsonl").read_text("utf-8").splitlines()
    return [json.loads(x) for x in lines[:n]]


def encode_pair(tok, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval splits them: the continuation is what ctx+cont adds."""
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    return ctx_ids, whole[len(ctx_ids):]


@torch.no_grad()
def ref_loglik(model, ctx_ids, cont_ids, decode_mask: bool = False) -> float:
    """Sum of log p(continuation | context), one unpadded sequence; under 'decode' mark the scoring positions."""
    inp = torch.tensor([(ctx_ids + cont_ids)[:-1]])  # [1, T]
    t, c = inp.shape[1], len(cont_ids)
    h = asp.sparsifiers.apply.active_handle(model)
    if decode_mask:
        mask = torch.zeros_like(inp, dtype=torch.bool)
        mask[0, t - c:] = True
        with h.positions(mask):
            logits = model(inp).logits
    else:
        logits = model(inp).logits
    lp = F.log_softmax(logits[0, t - c:].double(), -1)  # [c, V]
    return float(lp.gather(1, torch.tensor(cont_ids)[:, None]).sum())


def test_decode_policy_scores_continuations_sparse_and_contexts_dense(llama_1k, bpe_tok, llama_1k_stats):
    from lm_eval.api.instance import Instance

    model, tok = llama_1k, bpe_tok
    plan = asp.fit("teal", llama_1k_stats, sparsity=0.6)
    pairs = [(r["context"], " " + r["choices"][j]) for r in rows("actsparse_continuation", 3) for j in (0, 1)]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    lm = _wrapper_class()(pretrained=model, tokenizer=tok, batch_size=4, backend="causal")
    with asp.sparsify(model, plan, token_policy="decode") as h:
        got = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        n_rows = h._total["layers.0.q"] // 64
        enc = [encode_pair(tok, c, x) for c, x in pairs]
        ref_decode = [ref_loglik(model, c, x, decode_mask=True) for c, x in enc]
        dense = [ref_loglik(model, c, x) for c, x in enc]  # 'decode' without a mask: everything dense
    with asp.sparsify(model, plan, token_policy="all"):
        ref_all = [ref_loglik(model, c, x) for c, x in enc]
    # exactly the positions that score continuation tokens were sparsified, in padded batches of 4
    assert n_rows == sum(len(x) for _, x in enc)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_decode), rtol=0, atol=2e-3)
    assert max(abs(a - b) for a, b in zip(got, dense)) > 1e-2  # the continuation is sparse...
    assert max(abs(a - b) for a, b in zip(got, ref_all)) > 1e-2  # ...and the context is not


@pytest.mark.parametrize("task, policy", [("actsparse_continuation", None), ("actsparse_continuation", "all"),
                                          ("actsparse_context", "decode")])
def test_accuracy_matches_an_independent_scoring_of_the_offline_task(llama_1k, bpe_tok, llama_1k_stats, task, policy):
    model, tok = llama_1k, bpe_tok
    items = rows(task, 8)

    def reference():
        acc = acc_norm = 0
        for r in items:
            if task == "actsparse_context":  # one sentence scored after each candidate passage
                pairs = [(p, " " + r["sentence"]) for p in r["passages"]]
                lens = torch.tensor([float(len(p)) for p in r["passages"]])
            else:
                pairs = [(r["context"], " " + c) for c in r["choices"]]
                lens = torch.tensor([float(len(c)) for c in r["choices"]])
            lls = torch.tensor([ref_loglik(model, *encode_pair(tok, c, x), decode_mask=policy == "decode")
                                for c, x in pairs])
            acc += int(lls.argmax()) == r["label"]
            acc_norm += int((lls / lens).argmax()) == r["label"]
        return acc / len(items), acc_norm / len(items)

    if policy is None:
        res = asp.lm_eval_accuracy(model, tok, task, limit=8, batch_size=8)
        acc, acc_norm = reference()
    else:
        with asp.sparsify(model, asp.fit("teal", llama_1k_stats, sparsity=0.7), token_policy=policy):
            res = asp.lm_eval_accuracy(model, tok, [task], limit=8, batch_size=8)
            acc, acc_norm = reference()
    assert res[f"acc/{task}"] == pytest.approx(acc)
    if task == "actsparse_continuation":
        assert res[f"acc_norm/{task}"] == pytest.approx(acc_norm)
    assert res["acc_avg"] == pytest.approx(acc)
    assert res["versions"] == {task: 1.0}
    assert res["n_samples"] == {task: 8} and res["n_shot"] == {task: 0}


def test_group_few_shot_and_versions_are_reported(llama_1k, bpe_tok):
    res = asp.lm_eval_accuracy(llama_1k, bpe_tok, "actsparse_offline", num_fewshot=2, limit=4, batch_size=8)
    tasks = ("actsparse_continuation", "actsparse_continuation_local", "actsparse_context")
    for t in tasks:
        assert 0.0 <= res[f"acc/{t}"] <= 1.0 and res["n_shot"][t] == 2 and res["versions"][t] == 1.0
        assert res["n_samples"][t] == 4
    # the group's acc is the item-weighted mean of its tasks', and acc_avg is the group's acc
    mean = sum(res[f"acc/{t}"] for t in tasks) / 3
    assert res["acc/actsparse_offline"] == pytest.approx(mean) == pytest.approx(res["acc_avg"])


@pytest.mark.parametrize("name, close", [("hellaswg", "hellaswag"), ("actsparse_continuaton", "actsparse_continuation")])
def test_unknown_task_lists_close_matches(llama_1k, bpe_tok, name, close):
    with pytest.raises(asp.ActsparseError, match=rf"unknown lm-eval task '{name}'; close matches: .*\b{close}\b"):
        asp.lm_eval_accuracy(llama_1k, bpe_tok, name)


@pytest.mark.parametrize("task, dataset", [("piqa", "baber/piqa"), ("arc_easy", "allenai/ai2_arc"),
                                           ("ai2_arc", "allenai/ai2_arc"), ("mmlu", "cais/mmlu")])
def test_hub_task_offline_fails_fast_with_a_clear_message(llama_1k, bpe_tok, monkeypatch, tmp_path, task, dataset):
    from actsparse.eval.lm_eval import task_manager

    task_manager(True)  # the full task index is built once per process (~15 s); not what is timed here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(asp.ActsparseError, match=rf"'{task}' reads its data from the Hugging Face hub \(dataset "
                                                 rf"'{dataset}'\).*offline.*actsparse_continuation"):
        asp.lm_eval_accuracy(llama_1k, bpe_tok, task)
    assert time.perf_counter() - t0 < 10


def test_bad_arguments_are_refused(llama_1k, bpe_tok):
    with pytest.raises(asp.ActsparseError, match="num_fewshot must be a non-negative integer"):
        asp.lm_eval_accuracy(llama_1k, bpe_tok, "actsparse_continuation", num_fewshot=-1)
    with pytest.raises(asp.ActsparseError, match="batch_size must be a positive integer"):
        asp.lm_eval_accuracy(llama_1k, bpe_tok, "actsparse_continuation", batch_size=0)
    with pytest.raises(asp.ActsparseError, match="tasks must name at least one"):
        asp.lm_eval_accuracy(llama_1k, bpe_tok, " , ")
