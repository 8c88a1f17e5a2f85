"""Site discovery: find every linear layer whose input may be sparsified, named layers.{i}.{role}.

A *site* is one linear layer (nn.Linear or transformers' Conv1D); its *role* is its slot in the block.
Families are recognised by module-name patterns inside each block, so a new family is a new row in
ROLE_PATTERNS, not a new code path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ActsparseError

# role -> regex on the module's name relative to its block. First match wins, in this order.
ROLE_PATTERNS: list[tuple[str, str]] = [
    ("qkv", r"^(attention\.query_key_value|attn\.c_attn|self_attn\.qkv_proj|attn\.Wqkv)$"),
    ("q", r"^(self_attn|attention|attn)\.(q_proj|query)$|^attention\.self\.query$"),
    ("k", r"^(self_attn|attention|attn)\.(k_proj|key)$|^attention\.self\.key$"),
    ("v", r"^(self_attn|attention|attn)\.(v_proj|value)$|^attention\.self\.value$"),
    ("o", r"^(self_attn\.o_proj|attention\.dense|attn\.c_proj|attention\.output\.dense|self_attn\.out_proj|attn\.out_proj)$"),
    ("gate", r"^(mlp|feed_forward)\.(gate_proj|w1)$"),
    ("up", r"^(mlp|feed_forward)\.(up_proj|dense_h_to_4h|c_fc|fc1|w3)$|^intermediate\.dense$"),
    ("down", r"^(mlp|feed_forward)\.(down_proj|dense_4h_to_h|c_proj|fc2|w2)$|^output\.dense$"),
]
ACT_PATTERN = r"^(mlp|feed_forward)\.(act_fn|act)$|^intermediate\.intermediate_act_fn$"
ROLE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "down"]


@dataclass
class Site:
    """One sparsifiable linear layer: its name, block index, role and module."""
    name: str
    layer: int
    role: str
    module: nn.Module
    in_features: int
    out_features: int

    @property
    def weight(self) -> torch.Tensor:
        """The weight as [out, in], whatever the module's storage layout (Conv1D stores [in, out])."""
        w = self.module.weight
        return w.t() if _is_conv1d(self.module) else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def n_params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class Block:
    """One transformer block: its sites by role and the MLP's activation module (for MLP probes)."""
    layer: int
    module: nn.Module
    sites: dict[str, Site] = field(default_factory=dict)
    act: nn.Module | None = None
    mlp: nn.Module | None = None  # the module holding the MLP sites (parent of `up`), for MLP-level rules

    @property
    def gated(self) -> bool:
        return "gate" in self.sites


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _features(m: nn.Module) -> tuple[int, int] | None:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if _is_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    w = getattr(m, "weight", None)  # quantized / wrapped linears that keep a 2-D weight and a forward(x)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "in_features") and hasattr(m, "out_features"):
        return int(m.in_features), int(m.out_features)
    return None


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the ModuleList of transformer blocks (the longest list of identical blocks)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(b).__name__ for b in mod}
            if len(kinds) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ActsparseError(f"{type(model).__name__}: found no list of transformer blocks (nn.ModuleList)")
    return best


def find_blocks(model: nn.Module) -> list[Block]:
    """Return the model's blocks with their sites; raise ActsparseError naming the modules if none match."""
    cached = getattr(model, "_actsparse_blocks", None)
    if cached is not None:
        return cached
    list_name, layers = _layer_list(model)
    blocks: list[Block] = []
    seen_linear: list[str] = []
    for i, blk in enumerate(layers):
        b = Block(layer=i, module=blk)
        for rel, mod in blk.named_modules():
            if not rel:
                continue
            if b.act is None and re.match(ACT_PATTERN, rel):
                b.act = mod
                continue
            feats = _features(mod)
            if feats is None:
                continue
            seen_linear.append(f"{list_name}.{i}.{rel}")
            for role, pat in ROLE_PATTERNS:
                if re.match(pat, rel) and role not in b.sites:
                    b.sites[role] = Site(f"layers.{i}.{role}", i, role, mod, feats[0], feats[1])
                    if role == "up":
                        parent = rel.rsplit(".", 1)[0] if "." in rel else ""
                        b.mlp = blk.get_submodule(parent) if parent else None
                    break
        if b.sites:
            blocks.append(b)
    if not blocks:
        shown = ", ".join(seen_linear[:12]) or "none"
        raise ActsparseError(f"{type(model).__name__}: no sparsifiable sites recognised. Linear modules found: "
                             f"{shown}. Expected attention/MLP projections such as self_attn.q_proj or "
                             "mlp.down_proj; add a pattern to actsparse.models.sites.ROLE_PATTERNS")
    model._actsparse_blocks = blocks
    return blocks


def find_sites(model: nn.Module) -> dict[str, Site]:
    """Return every site of the model, keyed by its name layers.{i}.{role}, in block then role order."""
    out: dict[str, Site] = {}
    for b in find_blocks(model):
        for role in sorted(b.sites, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99):
            out[b.sites[role].name] = b.sites[role]
    return out


def hook_points(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Return point name -> (module, 'input'|'output'): site inputs, gate_act/up_out outputs, MLP inputs."""
    points = {}
    for b in find_blocks(model):
        for site in b.sites.values():
            points[site.name] = (site.module, "input")
        if b.gated and b.act is not None:
            points[f"layers.{b.layer}.gate_act"] = (b.act, "output")
        if "up" in b.sites:
            points[f"layers.{b.layer}.up_out"] = (b.sites["up"].module, "output")
        if b.mlp is not None:
            points[f"layers.{b.layer}.mlp"] = (b.mlp, "input")
    return points
