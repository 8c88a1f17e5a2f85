"""A model's memory from its config alone: what its weights take at a dtype, and what calibration, evaluation and
the decode-speed measure add on top. Nothing is loaded and nothing allocated.

Llama and Mistral are counted by formula, other families on the meta device. Every figure is an upper bound
of the peak a stage reaches on the device that holds the model (bytes):

    weights      = parameters × bytes of the dtype
    activations  = B·T·b·(2·hidden + 3·inter)          residual stream + normed input; gate, up, act(gate)·up
                 + B·heads·T²·b                          attention scores (eager attention; SDPA needs less)
                 + B·T·vocab·(b + 8)                     logits, and two float32 copies (upcast, log-softmax)
    calibration  = activations(data.batch_size, data.seq_len)
                 + per probe tensor: 8·sample_size + 24·channels + 8·1200   (sample and its keys, float64
                   moments, histogram), 6 of them per layer (attention input, o input, MLP input, gate_act, up_out,
                   down input)
                 + 24·B·T·inter                          the collector's float32 working copies of the widest probe
    evaluation   = activations(largest measure batch, eval.seq_len)
    speed        = 2·linear·2 (the engine's dense and transposed bf16 copies of every block linear; embeddings too
                   when the model is not bf16) + KV cache 2·layers·kv_heads·head_dim·batch·(prompt + tokens + 1)·2
    peak         = weights + max(calibration, evaluation, speed)      (the stages run one at a time)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ALIAS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
N_HIST = 1200          # calibration/stats.py N_BINS (float64 histogram per probe)
PROBES_PER_LAYER = 6   # distinct tensors calibration collects per gated-MLP block (q/k/v and gate/up alias)


@dataclass(frozen=True)
class ModelShape:
    """The sizes memory depends on, read from a model's config."""
    params: int             # every parameter
    linear_params: int      # the blocks' linear layers (not the embeddings, not the LM head)
    layers: int
    hidden: int
    inter: int              # the widest linear input in a block (the MLP's intermediate size)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str              # the config's dtype: what dtype=auto loads on a GPU


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one cell on the device(s) holding its model, by stage (bytes)."""
    weights: float
    calibration: float
    evaluation: float
    speed: float = 0.0
    dtype: str = ""          # the dtype the weights are counted in

    @property
    def peak(self) -> float:
        return self.weights + max(self.calibration, self.evaluation, self.speed)

    def describe(self) -> str:
        """`142.6 GB = 141.1 GB weights + 1.5 GB evaluation` (the stage that sets the peak)."""
        stage = max(("calibration", self.calibration), ("evaluation", self.evaluation), ("speed", self.speed),
                    key=lambda s: s[1])
        return f"{size(self.peak)} = {size(self.weights)} weights + {size(stage[1])} {stage[0]}"


def size(n: float) -> str:
    """`141.1 GB`, `12.3 MB` (decimal units, as GPU memory is quoted)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def model_shape(path: str, local: bool = True) -> ModelShape:
    """The shape of the model whose config is at `path` (a local folder, or a hub id when not local).

    Llama and Mistral configs are counted by their formula (no transformers import: a sweep's dry run stays
    quick); any other family is built on the meta device and its parameters counted."""
    f = Path(path) / "config.json"
    if local and f.exists():
        cfg = json.loads(f.read_text())
        if cfg.get("model_type") in _FORMULA:
            return _llama_shape(cfg)
    return _meta_shape(path, local)


_FORMULA = ("llama", "mistral")


def _llama_shape(c: dict) -> ModelShape:
    """A Llama/Mistral decoder's shape: q, k, v, o, gate, up, down per layer, two norms, embeddings, LM head."""
    h, i, layers, nh, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], \
        c["num_attention_heads"], c["vocab_size"]
    kv, hd = c.get("num_key_value_heads") or nh, c.get("head_dim") or h // nh
    linear = h * nh * hd + 2 * h * kv * hd + nh * hd * h + 3 * h * i
    bias = (nh * hd + 2 * kv * hd + h if c.get("attention_bias") else 0) + (2 * i + h if c.get("mlp_bias") else 0)
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return ModelShape(params=layers * (linear + bias + 2 * h) + embeddings + h, linear_params=layers * linear,
                      layers=layers, hidden=h, inter=i, heads=nh, kv_heads=kv, head_dim=hd, vocab=vocab,
                      dtype=str(c.get("dtype") or c.get("torch_dtype") or "float32"))


def _meta_shape(path: str, local: bool) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .load import config_is_encoder

    cfg = AutoConfig.from_pretrained(path, local_files_only=local)
    auto = AutoModel if config_is_encoder(cfg) else AutoModelForCausalLM
    with torch.device("meta"):        # shapes only: no memory, no initialisation
        model = auto.from_config(cfg)
    head = model.get_output_embeddings()
    # nn.Linear, and GPT-2's Conv1D (weight [in, out], `nx` inputs)
    linears = {m: getattr(m, "in_features", None) or m.nx for m in model.modules()
               if m is not head and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return ModelShape(params=sum(p.numel() for p in model.parameters()),
                      linear_params=sum(m.weight.numel() for m in linears),
                      layers=int(getattr(text, "num_hidden_layers", 0) or 0), hidden=hidden,
                      inter=max(linears.values(), default=hidden),
                      heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", 0) or heads),
                      head_dim=int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0)),
                      vocab=int(getattr(text, "vocab_size", 0) or 0),
                      dtype=str(dtype or "float32").replace("torch.", ""))


def load_dtype(dtype: str, shape: ModelShape, on_gpu: bool) -> str:
    """The dtype a cell loads the model in: dtype=auto is float32 on the CPU, the config's dtype on a GPU."""
    if dtype == "auto":
        dtype = shape.dtype if on_gpu else "float32"
    dtype = _ALIAS.get(dtype, dtype)
    return dtype if dtype in BYTES else "float32"


def activations(s: ModelShape, batch: int, seq_len: int, b: int) -> float:
    """Peak transient bytes of one no-grad forward over [batch, seq_len] (see the module doc)."""
    bt = batch * seq_len
    return bt * b * (2 * s.hidden + 3 * s.inter) + batch * s.heads * seq_len ** 2 * b + bt * s.vocab * (b + 8)


def estimate_memory(s: ModelShape, dtype: str, calib: tuple[int, int, int], evaluation: tuple[int, int],
                    speed: tuple[int, int, int] | None = None) -> MemoryEstimate:
    """The cell's memory with the model in `dtype` (as load_dtype gives it); calib = (batch, seq_len, sample_size),
    evaluation = (batch, seq_len), speed = (batch, prompt_len, n_tokens) when the cell measures decode speed."""
    b, (cb, ct, sample) = BYTES[dtype], calib
    widths = (s.hidden, s.heads * s.head_dim or s.hidden, s.hidden, s.inter, s.inter, s.inter)
    probes = s.layers * sum(8 * sample + 24 * c + 8 * N_HIST for c in widths[:PROBES_PER_LAYER])
    cal = activations(s, cb, ct, b) + probes + 24 * cb * ct * s.inter
    ev = activations(s, *evaluation, b)
    sp = 0.0
    if speed is not None:
        batch, prompt, tokens = speed
        engine = 2 * s.linear_params * 2 + (0 if dtype == "bfloat16" else (s.params - s.linear_params) * 2)
        sp = engine + 2 * s.layers * s.kv_heads * s.head_dim * batch * (prompt + tokens + 1) * 2
    return MemoryEstimate(weights=s.params * b, calibration=cal, evaluation=ev, speed=sp, dtype=dtype)
