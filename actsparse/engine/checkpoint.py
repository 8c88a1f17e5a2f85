"""One tensor-parallel rank's shard read straight from a local Hugging Face folder's safetensors files.

`load_shard(path, rank, world_size, ...)` returns what `shard_weights(weights_from_hf(model), ...)` returns for
that rank, tensor for tensor, without building the model: config.json is checked first (families and features the
engine does not decode, and splits it cannot make, are refused before any weight is read), then each tensor is
read with `safe_open(...).get_slice`, only the rows or columns the rank keeps (q|k|v by heads and gate/up by
intermediate channels: output rows; o and down: input columns; the LM head: the rank's vocabulary rows; norms,
q/k norms and the embedding: whole). A rank's host memory thus peaks at one tensor's slice beside what it has
already moved to `device` (with `device` on the CPU, its shard), never the whole model: 8 ranks of a 70B each read
about an eighth of its blocks. Sliced reads touch only those bytes of the memory-mapped files.

Conversions follow `weights_from_hf` and commute with slicing, so the result is exact: each slice is cast to
`dtype`, Granite's multipliers are applied in `dtype` after the cast, Gemma's norms are 1 + w in float32 from the
stored w, a tied LM head is a view of the replicated embedding. RoPE frequencies come from the family's own rotary
module, built from the config alone (the rest of the model is built on the meta device, which allocates nothing).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch

from .config import GEMMA, LlamaConfig, unsupported_reason
from .sharding import shard_config, vocab_range
from .weights import Weights, _layer, check_layouts, rope_weights


class _Checkpoint:
    """The tensors of a folder's safetensors file(s) by name: one `model.safetensors`, or the shards its
    `model.safetensors.index.json` maps (any other set of *.safetensors files: every tensor of each)."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"]
            files = sorted(set(names.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            has = f"it holds {', '.join(found)}" if found else "it holds no weight files"
            raise FileNotFoundError(
                f"{path} has no *.safetensors files ({has}); per-rank loading reads each rank's slices from "
                "safetensors: re-save the model with save_pretrained(path) (safetensors by default), or load it "
                "whole and pass it to TPEngine.from_hf(model, ...)")
        handles = {f: stack.enter_context(safe_open(str(path / f), framework="pt", device="cpu")) for f in files}
        if not index.is_file():
            names = {k: f for f, h in handles.items() for k in h.keys()}
        self.path, self.handles, self.names = path, handles, names

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _file(self, name: str):
        if name not in self.names:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {name!r}, which the engine reads for this "
                             f"model's config")
        return self.handles[self.names[name]]

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor, as stored."""
        return self._file(name).get_tensor(name)

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the tensor (its first dimension), reading only those."""
        return self._file(name).get_slice(name)[start:end]

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        """Columns [start, end) of a matrix, reading only those."""
        return self._file(name).get_slice(name)[:, start:end]


def _rope(hf_config, device) -> dict:
    """The family's RoPE fields of `Weights`, from its own rotary module, built on the CPU from the config alone."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the module tree only, to find the family's rotary class: no memory
        rot = AutoModelForCausalLM.from_config(hf_config).model.rotary_emb
    with torch.device("cpu"):
        rot = type(rot)(getattr(rot, "config", hf_config))
    return rope_weights(rot, device)


def read_config(path) -> tuple[Path, object]:
    """(the folder, its transformers config), read offline from `path`/config.json."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a local directory; pass a Hugging Face model folder (config.json "
                         "and *.safetensors)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face model folder (save_pretrained)")
    from transformers import AutoConfig

    return path, AutoConfig.from_pretrained(path, local_files_only=True)


@torch.no_grad()
def load_shard(path, rank: int, world_size: int, device=None, dtype: torch.dtype = torch.bfloat16,
               layouts: str = "both", max_seq_len: Optional[int] = None) -> tuple[LlamaConfig, Weights]:
    """Return (the whole model's LlamaConfig, rank's shard of its weights on `device` in `dtype` and `layouts`),
    read from the local folder `path`'s safetensors; equal to `shard_weights(weights_from_hf(model, ...), ...)`."""
    check_layouts(layouts)
    path, hf = read_config(path)
    why = unsupported_reason(hf, max_seq_len)
    if why:
        raise ValueError(why)
    cfg = LlamaConfig.from_hf(hf)
    s = shard_config(cfg, world_size)  # refuses a split it cannot make, before any weight is read
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    kind = hf.model_type
    gemma, granite = kind in GEMMA, kind == "granite"
    q_all, kv_all, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qr = (rank * s.q_size, (rank + 1) * s.q_size)
    kr = (rank * s.kv_size, (rank + 1) * s.kv_size)
    ir = (rank * s.intermediate_size, (rank + 1) * s.intermediate_size)
    # Granite's multipliers, folded as weights_from_hf folds them (in dtype, after the cast)
    mult = {} if not granite else {
        "embed": hf.embedding_multiplier, "residual": hf.residual_multiplier, "logits": 1.0 / hf.logits_scaling,
        "q": hf.attention_multiplier * math.sqrt(cfg.head_dim)}

    with ExitStack() as stack:
        ck = _Checkpoint(path, stack)
        allowed = ("q_proj.bias", "k_proj.bias", "v_proj.bias") if cfg.qkv_bias else ()
        for name in ck.names:
            if name.endswith("_proj.bias") and not name.endswith(allowed):
                raise ValueError(f"the engine's projections have no biases but Qwen2's q/k/v; {path} has {name}")

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype)

        def norm(name: str) -> torch.Tensor:
            w = ck.whole(name)
            return (1.0 + w.float()).to(device) if gemma else cast(w).to(device)

        layers = []
        for i in range(cfg.n_layers):
            at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            if f"{at}qkv_proj.weight" in ck:  # Phi-3: q|k|v and gate|up fused, each part sliced on its own
                qkv, gu = f"{at}qkv_proj.weight", f"{mlp}gate_up_proj.weight"
                q, k, v = (ck.rows(qkv, *qr), ck.rows(qkv, q_all + kr[0], q_all + kr[1]),
                           ck.rows(qkv, q_all + kv_all + kr[0], q_all + kv_all + kr[1]))
                gate, up = ck.rows(gu, *ir), ck.rows(gu, inter + ir[0], inter + ir[1])
            else:
                q, k, v = (ck.rows(f"{at}{r}_proj.weight", *sl) for r, sl in (("q", qr), ("k", kr), ("v", kr)))
                gate, up = ck.rows(f"{mlp}gate_proj.weight", *ir), ck.rows(f"{mlp}up_proj.weight", *ir)
            o, down = ck.cols(f"{at}o_proj.weight", *qr), ck.cols(f"{mlp}down_proj.weight", *ir)
            q, k, v, o, gate, up, down = map(cast, (q, k, v, o, gate, up, down))
            if granite:
                q, o, down = q * mult["q"], o * mult["residual"], down * mult["residual"]
            q, k, v, o, gate, up, down = (t.to(device) for t in (q, k, v, o, gate, up, down))
            blk = f"model.layers.{i}."
            # Gemma's post_attention_layernorm normalises the attention output; its MLP's input norm is
            # pre_feedforward_layernorm (as in weights_from_hf)
            mlp_norm = f"{blk}pre_feedforward_layernorm.weight" if gemma else f"{blk}post_attention_layernorm.weight"
            lw = _layer(norm(f"{blk}input_layernorm.weight"), norm(mlp_norm), q, k, v, o, gate, up, down, layouts)
            del q, k, v, o, gate, up, down
            if gemma:
                lw.post_attn_norm = norm(f"{blk}post_attention_layernorm.weight")
                lw.post_mlp_norm = norm(f"{blk}post_feedforward_layernorm.weight")
            if cfg.qkv_bias:
                lw.bqkv = torch.cat([cast(ck.rows(f"{at}{r}_proj.bias", *sl))
                                     for r, sl in (("q", qr), ("k", kr), ("v", kr))]).to(device)
            if cfg.qk_norm:
                lw.q_norm, lw.k_norm = norm(f"{at}q_norm.weight"), norm(f"{at}k_norm.weight")
            layers.append(lw)

        v0, v1 = vocab_range(cfg.vocab_size, rank, world_size)
        raw = cast(ck.whole("model.embed_tokens.weight"))
        embed = (raw * mult["embed"] if granite else raw).to(device)
        if cfg.tie_embeddings and not granite:
            lm_head = embed[v0:v1]  # a view, no copy, as shard_weights makes it
        else:
            head = raw[v0:v1] if cfg.tie_embeddings else cast(ck.rows("lm_head.weight", v0, v1))
            lm_head = (head * mult["logits"] if granite else head).to(device).contiguous()
        del raw
        final_norm = norm("model.norm.weight")
    return cfg, Weights(embed=embed, final_norm=final_norm, lm_head=lm_head, layers=layers, **_rope(hf, device))
