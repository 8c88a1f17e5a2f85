"""Site discovery: find every linear layer whose input may be sparsified, named layers.{i}.{role}.

A *site* is one linear layer (nn.Linear, transformers' Conv1D, a quantized/dequantizing linear, or a
*virtual* linear that is one expert's slice of a fused 3-D expert weight); its *role* is its slot in
the block. Families are recognised by module-name patterns inside each block, so a new family is a
new row in ROLE_PATTERNS, not a new code path.

Roles per family:
  Llama / Mistral / Qwen2 / Qwen3 / Gemma   q k v o gate up down
  GPT-NeoX / GPT-2 (Conv1D)                 qkv o up down
  BERT-style encoders                       q k v o up down
  Mamba / Mamba2 mixers                     up (in_proj) down (out_proj): in_proj reads the block's
                                            normed input and expands it, out_proj reads the gated SSM
                                            output, as SCAP sparsifies them. A mixer is no MLP, so it
                                            gets no MLP probes (gate_act, up_out, mlp).
  MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, ...)  attention roles plus expert{e}.gate expert{e}.up
                                            expert{e}.down per routed expert, shared_expert.{gate,up,down}
                                            for an always-on shared expert; the router is never a site.

MLP probes exist per MLP: with P the MLP's prefix ('' for a dense MLP, 'expert{e}.', 'shared_expert.'),
`layers.i.{P}gate_act` (output of act(gate)), `layers.i.{P}up_out` (output of up) and
`layers.i.{P}mlp` (input of the module that computes the whole MLP).

Discovery has no side effects: it describes the model and patches nothing. Fused experts (transformers 5
stores each MoE layer's experts as 3-D parameters) are listed through the virtual per-expert linears of
`experts.routable_experts`; `moe.install_routing(model)`, called by what hooks a model, makes those linears run
and token policies reach the rows each expert sees.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ActsparseError
from .experts import is_fused_experts, routable_experts

# role -> regex on the module's name relative to its block. First match wins, in this order.
ROLE_PATTERNS: list[tuple[str, str]] = [
    ("qkv", r"^(attention\.query_key_value|attn\.c_attn|self_attn\.qkv_proj|attn\.Wqkv)$"),
    ("q", r"^(self_attn|attention|attn)\.(q_proj|query)$|^attention\.self\.query$"),
    ("k", r"^(self_attn|attention|attn)\.(k_proj|key)$|^attention\.self\.key$"),
    ("v", r"^(self_attn|attention|attn)\.(v_proj|value)$|^attention\.self\.value$"),
    ("o", r"^(self_attn\.o_proj|attention\.dense|attn\.c_proj|attention\.output\.dense|self_attn\.out_proj|attn\.out_proj)$"),
    ("gate", r"^(mlp|feed_forward)\.(gate_proj|w1)$"),
    ("up", r"^(mlp|feed_forward)\.(up_proj|dense_h_to_4h|c_fc|fc1|w3)$|^intermediate\.dense$|^mixer\.in_proj$"),
    ("down", r"^(mlp|feed_forward)\.(down_proj|dense_4h_to_h|c_proj|fc2|w2)$|^output\.dense$|^mixer\.out_proj$"),
]
# experts kept as modules (transformers 4 / remote code): <moe>.experts.<e>.<proj>, and shared experts
EXPERT_PATTERN = r"^((?:mlp|block_sparse_moe|feed_forward)\.experts)\.(\d+)\.(gate_proj|w1|up_proj|w3|down_proj|w2)$"
SHARED_PATTERN = r"^((?:mlp|feed_forward)\.shared_experts?)\.(gate_proj|up_proj|down_proj)$"
_PROJ_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
ACT_PATTERN = r"^(mlp|feed_forward)\.(act_fn|act)$|^intermediate\.intermediate_act_fn$"
ROLE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "down"]
MLP_ROLES = ("gate", "up", "down")


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
        """The weight as a float [out, in] tensor, whatever the storage (Conv1D [in, out], quantized, fused expert)."""
        m = self.module
        w = m.weight
        if _is_conv1d(m):
            return w.t()
        if type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point():
            return w
        return _dequantized(m, w, self.name)  # int codes, or a quantized tensor subclass

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def n_params(self) -> int:
        return self.in_features * self.out_features


def _dequantized(m: nn.Module, w: torch.Tensor, name: str) -> torch.Tensor:
    """Float weight of a quantized linear: a weight tensor subclass with dequantize(), or the module's own."""
    # torch's own quantized tensors and tensor subclasses (torchao) dequantize themselves; a plain int
    # tensor's dequantize() would only cast the codes
    if w.is_quantized or type(w) not in (torch.Tensor, nn.Parameter):
        out = w.dequantize() if callable(getattr(w, "dequantize", None)) else None
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out
    for attr in ("dequantize_weight", "dequantize"):  # dequantizing wrappers (HQQ-style modules)
        fn = getattr(m, attr, None)
        if callable(fn):
            return fn()
    raise ActsparseError(f"site {name}: the weight of {type(m).__name__} is stored as {w.dtype} and the module "
                         "offers no dequantize(); its inputs can still be sparsified with the torch backend, "
                         "but methods that read weights (SCAP's bias fold, R-Sparse's factors) cannot run on it")


@dataclass
class Mlp:
    """One MLP of a block: the dense MLP (prefix ''), a routed expert ('expert{e}.') or a shared expert."""
    prefix: str
    sites: dict[str, Site] = field(default_factory=dict)  # base role gate/up/down -> Site
    act: nn.Module | None = None     # its activation module (probe gate_act), gated MLPs only
    module: nn.Module | None = None  # computes the whole MLP from its input (point layers.i.{prefix}mlp)

    @property
    def gated(self) -> bool:
        return "gate" in self.sites


@dataclass
class Block:
    """One transformer block: its sites by role and its MLPs (dense, experts, shared expert) for MLP probes."""
    layer: int
    module: nn.Module
    sites: dict[str, Site] = field(default_factory=dict)
    act: nn.Module | None = None
    mlp: nn.Module | None = None  # the module holding the dense MLP's sites (parent of `up`), for MLP-level rules
    mlps: list[Mlp] = field(default_factory=list)
    moe: nn.Module | None = None  # the sparse-MoE module (router + experts), when the block has experts
    moe_routed: nn.Module | None = None   # its fused experts module, routed per expert by moe.install_routing
    moe_opaque: bool = False              # experts kept as modules: their token rows are not visible

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
    """Return the ModuleList of transformer blocks: the longest outermost list of identical blocks.

    Lists nested in another candidate (a block's experts) are not candidates, however long.
    """
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(b).__name__ for b in mod}) == 1:
            cands.append((name, mod))
    outer = [(n, m) for n, m in cands if not any(o != n and n.startswith(o + ".") for o, _ in cands)]
    if not outer:
        kids = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in list(model.named_modules())[:10])
        raise ActsparseError(f"{type(model).__name__}: found no list of transformer blocks (an nn.ModuleList of "
                             f"identical blocks); modules found: {kids}")
    return max(outer, key=lambda nm: len(nm[1]))


def _role_key(role: str) -> tuple:
    """Sort key: attention and dense-MLP roles in ROLE_ORDER, then shared expert, then experts by index."""
    if role in ROLE_ORDER:
        return (0, ROLE_ORDER.index(role), 0)
    base = role.rsplit(".", 1)[-1]
    r = ROLE_ORDER.index(base) if base in ROLE_ORDER else 99
    m = re.match(r"^expert(\d+)\.", role)
    return (2, int(m.group(1)), r) if m else (1, 0, r)


def find_blocks(model: nn.Module) -> list[Block]:
    """Return the model's blocks with their sites; raise ActsparseError naming the modules if none match.

    Pure discovery: nothing on the model changes (fused experts' virtual linears are remembered in experts.py).
    """
    list_name, layers = _layer_list(model)
    blocks: list[Block] = []
    seen_linear: list[str] = []
    for i, blk in enumerate(layers):
        b = Block(layer=i, module=blk)
        dense = Mlp("")
        module_experts: dict[str, dict[str, Mlp]] = {}  # experts list name -> {prefix: Mlp}
        shared: dict[str, Mlp] = {}
        fused: list[tuple[str, nn.Module]] = []
        for rel, mod in blk.named_modules():
            if not rel:
                continue
            if b.act is None and re.match(ACT_PATTERN, rel):
                b.act = dense.act = mod
                continue
            if is_fused_experts(mod):
                fused.append((rel, mod))
                continue
            feats = _features(mod)
            if feats is None:
                continue
            seen_linear.append(f"{list_name}.{i}.{rel}")
            m = re.match(EXPERT_PATTERN, rel)
            if m:
                role = f"expert{int(m.group(2))}.{_PROJ_ROLE[m.group(3)]}"
                mlp = module_experts.setdefault(m.group(1), {}).setdefault(
                    f"expert{int(m.group(2))}.", Mlp(f"expert{int(m.group(2))}."))
                mlp.module = blk.get_submodule(f"{m.group(1)}.{m.group(2)}")
                mlp.act = _child_act(mlp.module)
                _add_site(b, role, mod, feats)
                mlp.sites[_PROJ_ROLE[m.group(3)]] = b.sites[role]
                continue
            m = re.match(SHARED_PATTERN, rel)
            if m:
                role = f"shared_expert.{_PROJ_ROLE[m.group(2)]}"
                mlp = shared.setdefault(m.group(1), Mlp("shared_expert."))
                mlp.module = blk.get_submodule(m.group(1))
                mlp.act = _child_act(mlp.module)
                _add_site(b, role, mod, feats)
                mlp.sites[_PROJ_ROLE[m.group(2)]] = b.sites[role]
                continue
            for role, pat in ROLE_PATTERNS:
                if re.match(pat, rel) and role not in b.sites:
                    _add_site(b, role, mod, feats)
                    if role in MLP_ROLES:
                        dense.sites[role] = b.sites[role]
                    if role == "up":
                        parent = rel.rsplit(".", 1)[0] if "." in rel else ""
                        b.mlp = blk.get_submodule(parent) if parent else None
                    break
        if _is_ssm_mixer(b):
            b.mlp = None  # in_proj/out_proj of a mixer: no MLP, no MLP probes
        elif dense.sites:
            # the MLP point needs one module computing the whole MLP: BERT's up and down live in sibling modules
            if b.mlp is not None and "down" in dense.sites and not _contains(b.mlp, dense.sites["down"].module):
                b.mlp = None
            dense.module = b.mlp
            b.mlps.append(dense)
        for rel, mod in fused:
            _add_fused_experts(b, blk, rel, mod)
        for lst_name, mlps in module_experts.items():
            b.mlps.extend(mlps.values())
            b.moe, b.moe_opaque = blk.get_submodule(lst_name.rsplit(".", 1)[0]), True
        for name, mlp in shared.items():
            b.mlps.append(mlp)
            b.moe = blk.get_submodule(name.rsplit(".", 1)[0])
        if b.sites:
            blocks.append(b)
    if not blocks:
        raise ActsparseError(_no_sites_message(model, list_name, layers, seen_linear))
    return blocks


def _is_ssm_mixer(b: Block) -> bool:
    """True when the block's up/down sites are an SSM mixer's in_proj/out_proj (no MLP probes)."""
    up = b.sites.get("up")
    return up is not None and any(up.module is getattr(m, "in_proj", None) for m in b.module.children())


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def _child_act(mlp: nn.Module) -> nn.Module | None:
    for name in ("act_fn", "act"):
        a = getattr(mlp, name, None)
        if isinstance(a, nn.Module):
            return a
    return None


def _add_site(b: Block, role: str, mod: nn.Module, feats: tuple[int, int]) -> None:
    b.sites[role] = Site(f"layers.{b.layer}.{role}", b.layer, role, mod, feats[0], feats[1])


def _no_sites_message(model, list_name: str, layers: nn.ModuleList, seen_linear: list[str]) -> str:
    blk = layers[0]
    inside = [f"{n} ({type(m).__name__})" for n, m in blk.named_modules() if n][:12]
    where = (f"modules in {list_name}.0: {', '.join(inside)}" if inside else
             f"{list_name}.0 is itself a {type(blk).__name__} with no submodules")
    lin = ", ".join(seen_linear[:12]) or "none"
    return (f"{type(model).__name__}: no sparsifiable sites recognised in the {len(layers)} blocks of "
            f"'{list_name or '<root>'}'. {where}. Linear modules found: {lin}. Expected attention/MLP "
            "projections such as self_attn.q_proj or mlp.down_proj; add a pattern to "
            "actsparse.models.sites.ROLE_PATTERNS")


def _add_fused_experts(b: Block, blk: nn.Module, rel: str, experts: nn.Module) -> None:
    """Sites for each expert of a fused experts module, when its layout can be routed per expert."""
    mlps = routable_experts(experts, f"layers.{b.layer}.{rel}")
    if mlps is None:
        return
    for e, mlp in enumerate(mlps):
        # a model-specific gate has no separate act(gate) output, hence no gate_act probe
        ex = Mlp(f"expert{e}.", module=mlp, act=mlp.act_fn if mlp.gate_proj is not None and mlp.default_gate else None)
        for role, lin in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
            if lin is not None:
                _add_site(b, f"expert{e}.{role}", lin, (lin.in_features, lin.out_features))
                ex.sites[role] = b.sites[f"expert{e}.{role}"]
        b.mlps.append(ex)
    parent = rel.rsplit(".", 1)[0] if "." in rel else ""
    b.moe, b.moe_routed = (blk.get_submodule(parent) if parent else blk), experts


def find_sites(model: nn.Module) -> dict[str, Site]:
    """Return every site of the model, keyed by its name layers.{i}.{role}, in block then role order."""
    out: dict[str, Site] = {}
    for b in find_blocks(model):
        for role in sorted(b.sites, key=_role_key):
            out[b.sites[role].name] = b.sites[role]
    return out


def hook_points(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Return point name -> (module, 'input'|'output'): site inputs, per-MLP gate_act/up_out outputs, MLP inputs."""
    points = {}
    for b in find_blocks(model):
        for role in sorted(b.sites, key=_role_key):
            points[b.sites[role].name] = (b.sites[role].module, "input")
        for mlp in b.mlps:
            p = f"layers.{b.layer}.{mlp.prefix}"
            if mlp.gated and mlp.act is not None:
                points[p + "gate_act"] = (mlp.act, "output")
            if "up" in mlp.sites:
                points[p + "up_out"] = (mlp.sites["up"].module, "output")
            if mlp.module is not None:
                points[p + "mlp"] = (mlp.module, "input")
    return points
