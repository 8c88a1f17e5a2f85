"""Shared fixtures: tiny real transformers models with a real trained tokenizer, saved as HF folders."""
from __future__ import annotations

import os

import pytest

# `make test` runs two xdist workers on a 2-core machine, and the tests start Ray clusters and interpreters of their
# own beside them: torch's default of one OpenMP thread per core in every process oversubscribes the cores, and
# spinning OpenMP threads made tiny-model tests up to 30x slower (test_greedy: 153 s on two workers, 35 s with one
# thread each). Each worker gets its share of the cores; the variables reach the subprocesses the tests start.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():  # Triton runs on the CPU only through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A raylet on a loaded 2-core machine (two test workers, a cluster of several raylets) can take longer to
# register than Ray's default wait: give it two minutes rather than fail the test that started it.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
# The `mlflow server` / `mlflow ui` the tests start serve tracking and artifacts only; MLflow 3 would also start
# six job-queue consumer processes beside each (~250 MB and steady CPU each), slowing every test running meanwhile.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

TEXT = ("The quick brown fox jumps over the lazy dog. Activation sparsity skips weight reads for "
        "inputs near zero, which makes decoding faster on memory-bound hardware. ")


def make_tokenizer(path):
    """Train a small byte-level BPE on synthetic text and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT * 4] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(path)
    return tok


def make_model(kind: str, vocab: int = 300, layers: int = 2, seed: int = 0):
    """Return a tiny random causal LM of the given family ('llama', 'neox', 'gpt2')."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        m = LlamaForCausalLM(cfg)
    elif kind == "neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=512, eos_token_id=0, bos_token_id=0)
        m = GPTNeoXForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
                         eos_token_id=0, bos_token_id=0)
        m = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A local HF folder holding a tiny random Llama and a trained BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama-random")
    make_tokenizer(path)
    make_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A local text file of several documents separated by the document marker."""
    from actsparse.data.text import DOC_SEPARATOR

    p = tmp_path_factory.mktemp("text") / "docs.txt"
    docs = [(TEXT * 30).replace("fox", w) for w in ("fox", "cat", "owl", "elk", "yak", "emu")]
    p.write_text(f"\n{DOC_SEPARATOR}\n".join(docs))
    return p


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny random Llama, loaded through asp.load_model."""
    import actsparse as asp

    return asp.load_model(str(tiny_dir))


# Tests that start Ray clusters, MLflow servers or whole sweeps, or share a module fixture that runs a sweep, run on
# one xdist worker per test module (`make test` runs two workers, `--dist loadgroup`): a module fixture then runs
# once instead of once on each worker (a tiny sweep through the console script is 30-90 s), and the modules still
# spread over both workers. One group for all of them would put ~20 minutes of sweeps on one worker, longer than
# the rest of the suite together. The rest (pure-Python tests, command-line errors, dry runs) spreads freely.
# A test joins its module's group when it uses a fixture that starts such a thing, or starts one itself.
_SERIAL_FIXTURES = {"ray_cluster", "swept", "acc_sweep", "mlflow_server"}
_SERIAL_TESTS = ("test_demo_e2e.py", "orchestration/test_cluster.py",
                 "orchestration/test_cli_mlflow.py::test_experiment_opens_on_runs_table_and_reruns_are_numbered")
# Other fixtures that take many seconds and are shared by several tests: their tests share a worker too, so the
# fixture is built once. fixture -> group (None: the test's module).
_SHARED_FIXTURES = {"built_report": "report-built_report", "two_ranks": None}


def _group(item, rel: str) -> str | None:
    """The xdist group of a test (None: scheduled on its own)."""
    names = set(item.fixturenames)
    module = rel.removesuffix(".py").replace("/", "-")
    for fixture, group in _SHARED_FIXTURES.items():
        if fixture in names:
            return group or f"shared-{module}"
    if _SERIAL_FIXTURES & names or any(t in f"{rel}::{item.name}" for t in _SERIAL_TESTS):
        return f"serial-{module}"
    return None


# tryfirst: xdist's own hook reads the xdist_group marks to name each test's group, so they must be on by then
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    root = os.path.dirname(__file__)
    loadgroup = getattr(config.option, "loadgroup", False)  # set on xdist's workers under --dist loadgroup
    for item in items:
        group = _group(item, "/".join(os.path.relpath(str(item.path), root).split(os.sep)))
        if group is None:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
        # xdist names the group by suffixing the node id with "@group", which it does by setting item._nodeid;
        # from pytest 9 the node id is read from item._id, so that assignment is lost and every test would be
        # scheduled on its own. Suffix it here where that is the case.
        if loadgroup and hasattr(item, "_id") and "@" not in item.nodeid:
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{group}")
