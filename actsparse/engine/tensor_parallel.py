"""Tensor-parallel decode: the engine's block split over W processes (one GPU each, NCCL; or CPU, gloo).

Rank r of W holds, per block (Megatron's split, `shard_weights`):
    q|k|v   its n_heads/W query heads and n_kv_heads/W key-value heads (output columns), and their biases
    o       the input rows of those heads' channels
    gate/up its I/W intermediate columns                     down  the input rows of those channels
and its KV cache holds only its kv heads. Attention needs no communication: a rank's query heads read only its
own kv heads (GQA groups never straddle ranks, which is why W must divide n_kv_heads). The residual stream x is
replicated; o and down each yield a partial sum over their rank's rows, and one all-reduce after each makes it
whole. The residual is added by rank 0 alone, inside its op as on one GPU; a post-norm (Gemma) follows the
all-reduce, on the whole sum. A row-split op's folded bias (SCAP's W·m) is each rank's own rows' share
W_r·m_r, so the all-reduce sums it exactly once.

The LM head is vocab-parallel: rank r computes the logits of its vocabulary slice (soft-capping is elementwise, so
each rank caps its own), and the greedy token comes from one all-gather of every rank's (max, index). A replicated
head would read the whole [V, D] matrix on every GPU at every step: at Llama-3-70B on 8 GPUs that is 2.1 GB, an
eighth more than a rank's share of the blocks. The embedding stays replicated (a step reads B of its rows).

Sparse plans are given whole (`set_plan` takes the same EnginePlan as `Engine`) and sliced per rank
(`shard_plan`): q|k|v and gate/up read the replicated x, so their thresholds and shifts stay whole; o's, down's
and CATS's gate_act per-channel thresholds and shifts keep the rank's input channels. A skipped row of down is
skipped on the rank that holds it. Every kernel path of the single-GPU engine runs per shard unchanged, and the
per-op kernel choice (`crossover.op_times`) is measured at the shard's shapes, since the shard's config is the
engine's `cfg` (`full_cfg` keeps the model's).

A rank's engine comes from a local Hugging Face folder with `TPEngine.from_pretrained`, which reads only the rank's
slices of the safetensors (`checkpoint.load_shard`: a 70B never sits whole in one process), from a loaded
transformers model with `from_hf` (each rank then holds the whole model in host memory), or from whole `Weights`
with `from_weights`. World size 1 is the ordinary engine. `launch.run_ranks` spawns W processes on one machine,
rank r on GPU r (its current CUDA device, the default `device` of `from_pretrained`, `from_hf` and `random`);
another launcher sets each rank's current device itself (`torch.cuda.set_device(local_rank)`), as NCCL wants one
GPU per rank.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .config import LlamaConfig, unsupported_reason
from .engine import Engine
from .plan import EnginePlan
from .sharding import shard_config, split_reason, vocab_range
from .weights import LayerWeights, Weights, _layer, check_layouts, random_weights, weights_from_hf

# roles whose per-channel thresholds follow a split of their channels, and by what (gate_act and up_out: the
# intermediate channels each rank computes)
ROW_SPLIT = {"o": "q", "down": "inter", "gate_act": "inter", "up_out": "inter"}


def _linears(lw: LayerWeights, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """One block's q k v o gate up down in nn.Linear's [out, in] layout, from whichever layout is loaded."""
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qkv = lw.wqkv if lw.wqkv is not None else lw.wqkv_t.t()
    gate, up = (lw.w13[:inter], lw.w13[inter:]) if lw.w13 is not None else (lw.wg_t.t(), lw.wu_t.t())
    return {"q": qkv[:q], "k": qkv[q:q + kv], "v": qkv[q + kv:], "gate": gate, "up": up,
            "o": lw.wo if lw.wo is not None else lw.wo_t.t(), "down": lw.wd if lw.wd is not None else lw.wd_t.t()}


@torch.no_grad()
def shard_weights(w: Weights, cfg: LlamaConfig, rank: int, world_size: int, device=None,
                  layouts: str = "both") -> Weights:
    """Return rank's shard of the whole model's weights `w` (any device), in `layouts`, on `device`."""
    check_layouts(layouts)
    s = shard_config(cfg, world_size)
    device = torch.device(device) if device is not None else w.embed.device
    nq, nkv, ni = s.q_size, s.kv_size, s.intermediate_size
    rows = {"q": slice(rank * nq, (rank + 1) * nq), "k": slice(rank * nkv, (rank + 1) * nkv),
            "v": slice(rank * nkv, (rank + 1) * nkv), "gate": slice(rank * ni, (rank + 1) * ni),
            "up": slice(rank * ni, (rank + 1) * ni)}
    cols = {"o": rows["q"], "down": rows["gate"]}

    def to(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(device)

    layers = []
    for lw in w.layers:
        lin = _linears(lw, cfg)
        part = {r: lin[r][sl] for r, sl in rows.items()} | {r: lin[r][:, sl] for r, sl in cols.items()}
        part = {r: t.to(device) for r, t in part.items()}
        new = _layer(to(lw.attn_norm), to(lw.mlp_norm), part["q"], part["k"], part["v"], part["o"], part["gate"],
                     part["up"], part["down"], layouts)
        if lw.bqkv is not None:
            q, kv = cfg.q_size, cfg.kv_size
            b = lw.bqkv
            new.bqkv = to(torch.cat([b[:q][rows["q"]], b[q:q + kv][rows["k"]], b[q + kv:][rows["v"]]]))
        new.q_norm, new.k_norm = to(lw.q_norm), to(lw.k_norm)
        new.post_attn_norm, new.post_mlp_norm = to(lw.post_attn_norm), to(lw.post_mlp_norm)
        layers.append(new)
    v0, v1 = vocab_range(cfg.vocab_size, rank, world_size)
    embed = to(w.embed)
    tied = w.lm_head.data_ptr() == w.embed.data_ptr()
    lm_head = embed[v0:v1] if tied else w.lm_head[v0:v1].to(device).contiguous()  # a tied head: a view, no copy
    return Weights(embed=embed, final_norm=to(w.final_norm), lm_head=lm_head, inv_freq=to(w.inv_freq),
                   rope_scale=w.rope_scale, layers=layers, inv_freq_local=to(w.inv_freq_local),
                   rope_scale_local=w.rope_scale_local)


def shard_plan(plan: EnginePlan, cfg: LlamaConfig, rank: int, world_size: int) -> EnginePlan:
    """Return rank's share of a whole-model plan: per-channel thresholds and shifts of o, down, gate_act and
    up_out keep the rank's channels; everything else (scalars, q k v gate up, N:M patterns, expected skips) is
    unchanged. R-Sparse's low-rank factors are refused above world size 1."""
    s = shard_config(cfg, world_size)
    width = {"q": (cfg.q_size, s.q_size), "inter": (cfg.intermediate_size, s.intermediate_size)}

    def part(role: str, t, layer: int):
        if t is None or role not in ROW_SPLIT or isinstance(t, (int, float)):
            return t
        t = torch.as_tensor(t)
        full, n = width[ROW_SPLIT[role]]
        if t.dim() == 0 or t.numel() == 1:
            return t
        if t.dim() != 1 or t.shape[0] != full:
            raise ValueError(f"layers.{layer}.{role}: expected a scalar or a per-channel [{full}] tensor, "
                             f"got shape {tuple(t.shape)}")
        return t[rank * n:(rank + 1) * n]

    for i, L in enumerate(plan.layers):
        for r, sr in L.items():
            if sr.lowrank is not None and world_size > 1:
                raise ValueError(f"layers.{i}.{r}: R-Sparse's low-rank factors are not split over ranks yet; "
                                 "measure this plan at world size 1")
            if sr.nm is not None and r in ROW_SPLIT and width[ROW_SPLIT[r]][1] % sr.nm[1]:
                raise ValueError(f"layers.{i}.{r}: N:M groups of {sr.nm[1]} channels straddle the ranks' "
                                 f"{width[ROW_SPLIT[r]][1]}-channel shards")
            if sr.topk is not None and r in ROW_SPLIT and world_size > 1:
                raise ValueError(f"layers.{i}.{r}: a per-token Top-K on an input split over the ranks would rank "
                                 "each rank's channels alone, not the token's; measure this plan at world size 1")
    return EnginePlan([{r: dataclasses.replace(sr, thresh=part(r, sr.thresh, i), shift=part(r, sr.shift, i))
                        for r, sr in L.items()} for i, L in enumerate(plan.layers)], rotations=plan.rotations)


class TPEngine(Engine):
    """Rank `rank` of a tensor-parallel engine over `world_size` processes (see the module docstring).

    `cfg` is the shard's config (heads and intermediate channels of one rank), `full_cfg` the model's; `weights`
    the rank's shard (`shard_weights`). Every rank runs the same calls (decode, set_plan) in the same order, as
    each step communicates: 2 all-reduces of [B, D] per block and one all-gather of [W, 2, B] for the token.
    `forward_step` returns the rank's vocabulary slice of the logits [B, V_r]. `group`: the process group of
    the W ranks (None: the default group); unused at world size 1, which needs none.
    """

    # A rank's o and down hold partial sums that the all-reduce adds up: they cannot add into the stream.
    ACCUMULATES = False

    def __init__(self, cfg: LlamaConfig, weights: Weights, rank: int = 0, world_size: int = 1,
                 group: Optional[dist.ProcessGroup] = None, **kw) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if world_size > 1:
            if not dist.is_initialized():
                raise RuntimeError(f"a tensor-parallel engine of world size {world_size} needs an initialised "
                                   "torch.distributed process group (init_process_group, or launch.run_ranks)")
            if dist.get_world_size(group) != world_size:
                raise ValueError(f"world_size {world_size} but the process group has {dist.get_world_size(group)} "
                                 "ranks")
        self.full_cfg = cfg
        self.rank, self.world_size, self.group = rank, world_size, group
        self.vocab_start = vocab_range(cfg.vocab_size, rank, world_size)[0]
        self.comm = world_size > 1  # off: every collective is skipped (the compute-only timing of `comm_share`)
        super().__init__(shard_config(cfg, world_size), weights, **kw)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(cls, cfg: LlamaConfig, weights: Weights, rank: int = 0, world_size: int = 1,
                     group: Optional[dist.ProcessGroup] = None, *, device=None, layouts: str = "both",
                     **kw) -> "TPEngine":
        """Return rank's engine from the whole model's weights (on any device; the shard goes to `device`)."""
        return cls(cfg, shard_weights(weights, cfg, rank, world_size, device, layouts), rank, world_size, group,
                   **kw)

    @classmethod
    def from_pretrained(cls, path, rank: int = 0, world_size: int = 1, group: Optional[dist.ProcessGroup] = None,
                        *, device=None, dtype: torch.dtype = torch.bfloat16, layouts: str = "both",
                        **kw) -> "TPEngine":
        """Return rank's engine holding its shard, read from a local Hugging Face folder (config.json and
        model.safetensors, or shards listed by model.safetensors.index.json) without loading the model.

        Each rank reads only its slices of each tensor (`checkpoint.load_shard`), so its host memory peaks at one
        tensor's slice beside its shard, never the whole model; the shard equals `from_hf`'s of the same model
        loaded whole. The config is checked first: a family or feature the engine does not decode
        (`config.unsupported_reason`) and a world size that does not divide the heads, kv heads or MLP width
        (`split_reason`) are refused before any weight is read; a folder without safetensors (pytorch_model.bin
        only) is refused with what to do. `dtype`: the shard's dtype (default bfloat16; Gemma's norms stay
        float32). `device`: as `from_hf`'s (cuda:<current device> when CUDA is present, else the CPU)."""
        from .checkpoint import load_shard

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        cfg, shard = load_shard(path, rank, world_size, device, dtype, layouts, kw.get("max_seq_len", 512))
        return cls(cfg, shard, rank, world_size, group, **kw)

    @classmethod
    def from_hf(cls, model, rank: int = 0, world_size: int = 1, group: Optional[dist.ProcessGroup] = None, *,
                device=None, dtype: Optional[torch.dtype] = None, layouts: str = "both", **kw) -> "TPEngine":
        """Return rank's engine holding its shard of a transformers model of a family the engine decodes.

        The model's weights are read where they are (CPU is fine) and only the shard is copied to `device`
        (default: cuda:<current device> when CUDA is present, GPU `rank` under `run_ranks`; else the model's
        device). Each rank then holds the whole model in host memory: for a model larger than that, pass its
        local folder instead (a str or Path), which `from_pretrained` reads rank by rank."""
        if isinstance(model, (str, Path)):
            return cls.from_pretrained(model, rank, world_size, group, device=device,
                                       dtype=dtype or torch.bfloat16, layouts=layouts, **kw)
        why = unsupported_reason(model.config, kw.get("max_seq_len", 512))
        if why:
            raise ValueError(why)
        cfg = LlamaConfig.from_hf(model.config)
        why = split_reason(cfg, world_size)
        if why:
            raise ValueError(why)
        p = next(model.parameters())
        dtype = dtype or p.dtype
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else p.device
        whole = weights_from_hf(model, p.device, dtype, "dense")  # on the model's device: fused, not transposed
        return cls.from_weights(cfg, whole, rank, world_size, group, device=device, layouts=layouts, **kw)

    @classmethod
    def random(cls, cfg: LlamaConfig, rank: int = 0, world_size: int = 1, group: Optional[dist.ProcessGroup] = None,
               *, device="cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0, layouts: str = "both",
               **kw) -> "TPEngine":
        """Return rank's engine with random weights drawn for its shard alone (for speed at any size; they are
        not the whole-model weights `Engine.random` draws: for that, `from_weights(cfg, random_weights(...))`)."""
        shard = random_weights(shard_config(cfg, world_size), torch.device(device), dtype, seed + rank, layouts)
        v0, v1 = vocab_range(cfg.vocab_size, rank, world_size)
        shard.lm_head = shard.embed[v0:v1] if cfg.tie_embeddings else shard.lm_head[v0:v1].contiguous()
        return cls(cfg, shard, rank, world_size, group, **kw)

    # ------------------------------------------------------------------ plans
    def set_plan(self, plan: EnginePlan) -> None:
        """Turn sparse decoding on from the whole model's plan (the same as `Engine.set_plan`), sliced to this
        rank (`shard_plan`). A rotated plan (LaRoSA, WINA's transform) is refused: its folded copy and adapters
        are not split over ranks."""
        if plan.rotations:
            raise ValueError("the tensor-parallel engine does not fold a rotated residual stream; measure this plan "
                             "with the single-GPU Engine")
        super().set_plan(shard_plan(plan, self.full_cfg, self.rank, self.world_size))

    # ------------------------------------------------------------------ the split
    def _op_residual(self, x: torch.Tensor, post_norm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Rank 0 alone adds the residual inside the op; the all-reduce brings it to every rank."""
        return super()._op_residual(x, post_norm) if self.rank == 0 or not self.comm else None

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the row shards' partial outputs [B, D] over the ranks (in place)."""
        if self.comm:
            dist.all_reduce(y, group=self.group)
        return y

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy tokens [B] over the whole vocabulary from every rank's slice [B, V_r]: one all-gather of
        each rank's (max, global index), in float64 (indices < 2^53 are exact). Ties go to the lowest rank, i.e.
        the lowest index, as argmax over the whole logits does."""
        mx, idx = logits.max(-1)
        if not self.comm:
            return idx + self.vocab_start
        mine = torch.stack([mx.double(), (idx + self.vocab_start).double()])  # [2, B]
        every = torch.empty((self.world_size, *mine.shape), dtype=mine.dtype, device=mine.device)
        if dist.get_backend(self.group) == "nccl":
            dist.all_gather_into_tensor(every, mine, group=self.group)
        else:
            dist.all_gather(list(every.unbind(0)), mine, group=self.group)
        best = every[:, 0].argmax(0)  # [B]: the rank with the largest max, the first on ties
        return every[:, 1].gather(0, best[None])[0].long()

    # ------------------------------------------------------------------ figures
    @torch.no_grad()
    def comm_share(self, n: int = 64, *, sparse: Optional[bool] = None, batch: int = 1, prompt_len: int = 16,
                   seed: int = 0) -> dict:
        """Decode n tokens with and without the collectives; return tok_s, step_ms, step_ms_no_comm (the slowest
        rank's compute alone, each collective skipped) and comm_share = 1 − step_ms_no_comm / step_ms, the part of
        the step the all-reduces (and the token all-gather) cost, waiting for the slowest rank included.

        Collective: every rank calls it. Decoding without collectives yields garbage tokens (each rank picks from
        its own slice); the captured graphs of both runs are dropped afterwards."""
        tok_s = self.decode(None, n, sparse=sparse, batch=batch, prompt_len=prompt_len, seed=seed)
        step_ms = self.last_step_ms
        tokens = self.last_tokens
        if not self.comm:
            return {"tok_s": tok_s, "step_ms": step_ms, "step_ms_no_comm": step_ms, "comm_share": 0.0}
        self.comm = False
        self.reset_graphs()
        try:
            self.decode(None, n, sparse=sparse, batch=batch, prompt_len=prompt_len, seed=seed)
        finally:
            self.comm = True
            self.reset_graphs()
        alone = torch.tensor([self.last_step_ms], dtype=torch.float64, device=self.device)
        dist.all_reduce(alone, op=dist.ReduceOp.MAX, group=self.group)
        self.last_tokens, self.last_step_ms = tokens, step_ms
        no_comm = float(alone)
        return {"tok_s": tok_s, "step_ms": step_ms, "step_ms_no_comm": no_comm,
                "comm_share": max(0.0, 1.0 - no_comm / step_ms)}
