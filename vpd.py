"""
vpd.py: adversarial Parameter Decomposition (VPD) in one file.

Every chosen weight matrix W [d_out, d_in] of a frozen target network is rewritten as C rank-1
subcomponents plus a remainder, W = (V U)^T + Δ. A learned causal-importance (CI) function says, at every
input position, which subcomponents the target needs there. Training keeps the model faithful when the
unneeded ones are ablated, at random (stochastic loss) or by an adversary (adversarial loss), while
needing as few as possible (importance minimality).

    python vpd.py                                   # TMS 5-2: trains the toy target, then decomposes it
    python vpd.py configs/resid_mlp1.py --steps=5000
    python vpd.py configs/tms_5_2.py --init_from=resume
    python vpd.py configs/fortunes.py               # a small language model, offline on a CPU
    torchrun --standalone --nproc_per_node=8 vpd.py configs/pile4l.py   # the paper's Pile-4L run
    python vpd.py import wandb:goodfire/spd/runs/s-55ea3f9b out/pile4l_goodfire --n_heads=6   # Goodfire's

Sections, in the order of the method:
    Config         every knob
    §1-2           components, masks and the masked forward
    §3             causal importance: the two leaky sigmoids, the CI functions, the Decomposition
    §4             losses: faithfulness, importance minimality, stochastic and adversarial reconstruction
    §5             one training step, and train()
    §6             metrics: L0, alive, CE and KL under masks, the evaluation adversary, toy ground truth
    §7             attribution graphs of one prompt: edges, optimised CI, faithfulness
    Appendix       plumbing: A data parallelism, B checkpoints, resume and Goodfire's decompositions,
                   C memory plan and FLOPs, D figures, E configurator and entry point
Left out on purpose: gradient accumulation, weight tying beyond transposed pairs, decomposing embeddings,
W&B logging (metrics.jsonl instead), mixed-precision other than bf16 autocast, SPD's shared-MLP CI, and
SPD's sigmoid with negative forward values (VPD's lower-leaky one serves SPD-style runs too).
"""
import ast
import collections
import copy
import dataclasses
import difflib
import fnmatch
import glob
import json
import math
import os
import re
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import models


# -----------------------------------------------------------------------------
# Config: every knob of a decomposition. configs/*.py and --key=value override the defaults.

@dataclass
class Config:
    # run
    out_dir: str = "out/run"
    init_from: str = "scratch"       # "resume": continue from out_dir/ckpt.pt
    seed: int = 0
    device: str = "auto"             # "auto": cuda when available, else cpu (vpd.train: the target's device)
    dtype: str = "float32"           # "bfloat16": autocast on CUDA (Δ and L_faith stay fp32)
    compile: bool = None             # torch.compile the hot paths; None: on for CUDA, off on CPU
    memory_check: bool = True        # stop before training when the memory plan exceeds free memory
    peak_tflops: float = 0.0         # the device's peak, for the log's MFU; 0: the GPU's from PEAK_TFLOPS
    # §1 what to decompose: module-path pattern -> number of subcomponents C
    modules: dict = field(default_factory=lambda: {"linear1": 20, "linear2": 20})
    tie: dict = field(default_factory=dict)  # {"linear2": "linear1"}: W2 = W1^T, so V2 = U1^T, U2 = V1^T
    # §3 causal importance function
    ci_fn: str = "mlp"               # "mlp": one tiny MLP per subcomponent; "transformer": global shared
    ci_hidden: int = 16              # mlp: hidden width
    ci_d_model: int = 2048           # transformer sizes (Pile-4L recipe)
    ci_n_blocks: int = 8
    ci_n_heads: int = 16
    ci_d_mlp: int = 8192
    ci_mlp_bias: bool = False        # transformer: biases in its MLP (Goodfire's CI transformer has them)
    ci_final_norm: bool = True       # transformer: an RMSNorm before the output head (Goodfire's has none)
    # §4 losses
    faith_coeff: float = 1.0
    imp_coeff: float = 3e-3
    p_start: float = 1.0             # importance-minimality exponent, annealed linearly to p_end
    p_end: float = 1.0
    beta: float = 0.0                # frequency penalty (VPD 0.5)
    stoch_coeff: float = 1.0
    adv_coeff: float = 1.0
    recon_loss: str = "mse"          # "mse" (toys) or "kl" (language models)
    routing: str = "uniform_k_subset"  # stochastic loss: "all", "layerwise" (SPD), "uniform_k_subset" (VPD)
    adv_routing: str = "all"         # persistent adversary: "all" or "uniform_k_subset"
    adv_steps: int = 2               # inner ascent steps per training step
    adv_lr: float = 0.01
    adv_warmup: float = 0.025        # fraction of the run over which adv_lr warms up linearly
    # §5 optimisation
    steps: int = 10_000
    batch_size: int = 4096           # per process
    lr: float = 1e-3
    lr_warmup: float = 0.0           # fraction of the run
    lr_final: float = 0.0            # cosine decay to lr * lr_final
    weight_decay: float = 0.0
    grad_clip: float = 0.0           # max gradient norm of V and U; 0: off
    faith_warmup_steps: int = 200    # before the main loop: AdamW on V, U with L_faith only
    faith_warmup_lr: float = 0.01
    # §6 evaluation, logging, checkpoints
    eval_interval: int = 1000        # 0: never evaluate
    eval_batches: int = 1
    eval_adv_steps: list = field(default_factory=lambda: [20])  # report adversarial loss at these steps
    ci_threshold: float = 0.1        # L0 counts CI above this (LM: 0.0)
    alive_threshold: float = 1e-6    # alive: mean CI above this
    log_interval: int = 100          # 0: only at the end
    ckpt_interval: int = 1000        # 0: only at the end


# the keys that take one of a few words, and those words (checked with the other limits by check_config)
CHOICES = {"init_from": ("scratch", "resume"), "dtype": ("float32", "bfloat16"),
           "ci_fn": ("mlp", "transformer"), "recon_loss": ("mse", "kl"),
           "routing": ("all", "uniform_k_subset", "layerwise"), "adv_routing": ("all", "uniform_k_subset")}


def check_config(cfg: Config):
    for key, options in CHOICES.items():
        if getattr(cfg, key) not in options:
            raise ValueError(f"{key} must be one of {options}, got {getattr(cfg, key)!r}")
    if cfg.eval_interval > 0 and cfg.eval_batches < 1:
        raise ValueError(f"eval_batches must be at least 1 when eval_interval > 0, got {cfg.eval_batches}")


# -----------------------------------------------------------------------------
# §1-2 Components, masks and the masked forward

def is_conv1d(module) -> bool:
    """transformers' Conv1D (GPT-2's projections): an nn.Linear whose weight is stored transposed,
    [d_in, d_out]. Known by its name, so that vpd.py needs no transformers."""
    return type(module).__name__ == "Conv1D" and module.weight.shape == (module.nx, module.nf)


def weight_of(module) -> torch.Tensor:
    """[d_out, d_in], the nn.Linear convention, of an nn.Linear, a Conv1D or Components (a view, no copy)."""
    transposed = module.transposed if isinstance(module, Components) else is_conv1d(module)
    return module.weight.T if transposed else module.weight


class Components(nn.Module):
    """A target nn.Linear or Conv1D (weight W [d_out, d_in], frozen) rewritten as C rank-1 subcomponents
    and a remainder: W = (V U)^T + Δ, V [d_in, C] reading, U [C, d_out] writing; subcomponent c's weight
    is (V[:, c] ⊗ U[c, :])^T. With per-position masks m [..., C] and δ [...], the masked matrix computes

        out = Σ_c m_c (x · V[:, c]) U[c, :] + δ Δx + bias

    (m = 1, δ = 1: the target itself). The forward writes Δx = Wx - (V U)^T x out, so Δ is never built
    here: ((x V) ⊙ (m - δ)) U + δ Wx, the same function of V and U, without the [d_out, d_in] gradient of
    Δ in every masked pass. Δ is built once per step, in fp32, for the faithfulness loss only."""

    def __init__(self, linear: nn.Module, C: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the target's own tensors (state-dict keys kept)
        self.transposed = is_conv1d(linear)
        d_out, d_in = self.W.shape
        self.V = nn.Parameter(torch.randn(d_in, C, device=self.weight.device) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(C, d_out, device=self.weight.device) / math.sqrt(C))
        self.mask = None   # None: the target's weight; else (m [..., C], δ [...])
        self.input = None  # input of the last forward through the target's weight: what CI reads
        self.cast = None   # (V, U, W) in autocast's dtype, once per training step (Decomposition.cast_once)

    @property
    def W(self):  # [d_out, d_in]
        return weight_of(self)

    def delta(self):  # [d_out, d_in], in fp32: what the faithfulness loss drives to zero
        return self.W.float() - (self.V @ self.U).T

    def forward(self, x):  # x [..., d_in]
        V, U, W = self.cast or (self.V, self.U, self.W)
        if self.mask is None:
            self.input = x
            return F.linear(x, W, self.bias)
        m, delta = self.mask
        delta = delta.unsqueeze(-1)                                                 # [..., 1]
        out = torch.addcmul(((x @ V) * (m - delta)) @ U, delta, F.linear(x, W))     # [..., d_out]
        return out if self.bias is None else out + self.bias


def find_matrices(model: nn.Module, modules: dict) -> dict:
    """{path: module} of the nn.Linear and Conv1D modules that the patterns of `modules` match
    ({"h.*.mlp.c_fc": 3072}), checked: every pattern matches, no path twice, every C a positive int, no
    weight shared with another module."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    found = {}
    for pattern, C in modules.items():
        if type(C) is not int or C <= 0:
            raise ValueError(f"modules[{pattern!r}] = {C!r}: the number of subcomponents must be a positive "
                             "int")
        matched = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            near = difflib.get_close_matches(pattern, list(linears), n=3, cutoff=0.3)
            raise ValueError(f"module pattern {pattern!r} matches no nn.Linear or Conv1D of the target; "
                             f"closest such paths: {near or sorted(linears)[:5]}")
        for path in matched:
            if path in found:
                raise ValueError(f"module {path!r} is matched by two patterns of `modules`")
            if uses[id(linears[path].weight)] > 1:  # a tied unembedding: its other use, the embedding, stays
                raise ValueError(f"module {path!r} shares its weight with another module (an unembedding "
                                 "tied to the embedding?): vpd.py does not decompose embeddings; leave it "
                                 "out")
            found[path] = (linears[path], C)
    return found


def install_components(model: nn.Module, modules: dict) -> dict:
    """Freeze `model` (no gradients; eval mode, so no dropout) and replace each matrix `modules` names
    with Components. A fused matrix (GPT-2's c_attn, GPT-NeoX's query_key_value) is decomposed whole.
    Returns {path: Components} in sorted path order, the order used everywhere."""
    model.requires_grad_(False).eval()
    comps = {}
    for path, (linear, C) in find_matrices(model, modules).items():
        comps[path] = Components(linear, C)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, comps[path])
    return dict(sorted(comps.items()))


def check_ties(comps: dict, tie: dict):
    """cfg.tie {b: a} ties matrices with W_b = W_a^T: both decomposed, with the same C."""
    for b, a in tie.items():
        if a not in comps or b not in comps:
            raise ValueError(f"tie {b!r} -> {a!r}: both must be decomposed matrices, i.e. in {list(comps)}")
        if not torch.equal(comps[b].W, comps[a].W.T) or comps[a].V.shape[1] != comps[b].V.shape[1]:
            raise ValueError(f"tie {b!r} -> {a!r} needs {b}'s weight to be {a}'s transposed, with the same C")


def uniform_k_subset(pos_shape, M: int, device) -> torch.Tensor:
    """VPD routing: per position draw k ~ U{1..M}, then a uniformly random k-subset of the M matrices.
    A given matrix is routed with probability E[k]/M = (M + 1) / 2M. Returns bool [*pos_shape, M]."""
    k = torch.randint(1, M + 1, pos_shape, device=device)
    rank = torch.rand(*pos_shape, M, device=device).argsort(-1).argsort(-1)  # a random permutation
    return rank < k.unsqueeze(-1)


# -----------------------------------------------------------------------------
# §3 Causal importance

LEAK = 0.01  # α of both leaky hard sigmoids


class LowerLeakyHardSigmoid(torch.autograd.Function):
    """Forward clamp(z, 0, 1). Backward: pass the gradient on (0, 1], block it above 1, and below 0 let
    α·g through only when g < 0, i.e. when the loss wants the CI to rise (revives dead subcomponents).
    Used for masks; VPD found that SPD's negative forward values destabilise training."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.clamp(0, 1)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        # the regions as float arithmetic, sign(z)⁺ = 1[z > 0]: boolean masks are slow on a CPU
        above0 = z.sign().clamp(min=0)
        inside = above0 - (z - 1).sign().clamp(min=0)                     # 1[0 < z <= 1]
        return g * inside + LEAK * g.clamp(max=0) * (1 - above0)          # revive: α·g where z <= 0, g < 0


def upper_leaky_hard_sigmoid(z):
    """clamp(z, 0, 1) below 1, slope α above: used for the minimality loss, which keeps pushing down
    CI values that overshoot 1."""
    return z.clamp(0, 1) + LEAK * F.relu(z - 1)


class SubcomponentMLPs(nn.Module):
    """SPD's CI function: every subcomponent c has its own MLP 1 -> H -> 1 on its inner activation
    h_c = x · V[:, c]. All subcomponents of all matrices are batched as one [ΣC, H] computation."""

    def __init__(self, Cs: dict, hidden: int):
        super().__init__()
        self.Cs, n = Cs, sum(Cs.values())
        self.W1 = nn.Parameter(torch.randn(n, hidden) * math.sqrt(2))      # fan-in 1, He init
        self.b1 = nn.Parameter(torch.zeros(n, hidden))
        self.W2 = nn.Parameter(torch.randn(n, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n))

    def forward(self, inputs: dict, comps: dict) -> dict:
        h = torch.cat([inputs[n] @ comps[n].V for n in self.Cs], -1)           # [..., ΣC]
        hidden = F.gelu(torch.addcmul(self.b1, h.unsqueeze(-1), self.W1))     # [..., ΣC, H]
        return (hidden * self.W2).sum(-1) + self.b2                            # [..., ΣC]


class Block(nn.Module):
    """Pre-norm bidirectional transformer block: RoPE attention over all positions, then a GELU MLP."""

    def __init__(self, d: int, n_heads: int, d_mlp: int, mlp_bias=False):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp, bias=mlp_bias), nn.GELU(),
                                 nn.Linear(d_mlp, d, bias=mlp_bias))

    def forward(self, x):  # [B, T, d]
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(models.rope(q), models.rope(k), v)      # [B, H, T, D]
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.norm2(x))


class CITransformer(nn.Module):
    """VPD's CI function: RMS-normalise each decomposed matrix's input (no learned scale), concatenate
    them in sorted module order, and let a bidirectional transformer map them to ΣC scores per position."""

    def __init__(self, d_ins: dict, Cs: dict, d_model: int, n_blocks: int, n_heads: int, d_mlp: int,
                 mlp_bias=False, final_norm=True):
        super().__init__()
        self.d_ins = d_ins
        self.proj_in = nn.Linear(sum(d_ins.values()), d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp, mlp_bias) for _ in range(n_blocks))
        self.norm = nn.RMSNorm(d_model) if final_norm else nn.Identity()
        self.proj_out = nn.Linear(d_model, sum(Cs.values()))

    def forward(self, inputs: dict, comps: dict = None) -> dict:
        x = torch.cat([F.rms_norm(inputs[n], (d,)) for n, d in self.d_ins.items()], -1)  # [B, T, Σd_in]
        flat = x.dim() == 2  # toy inputs [B, d]: one position per sample
        # the residual stream in fp32 (the matmuls still run in bf16 under autocast): RMSNorm's fused kernel
        # refuses a bf16 input
        x = self.proj_in(x[:, None] if flat else x).float()                              # [B, T, d_model]
        for block in self.blocks:
            x = block(x)
        z = self.proj_out(self.norm(x)).float()                                          # [B, T, ΣC]
        return z[:, 0] if flat else z


def ci_function(cfg: Config, comps: dict) -> nn.Module:
    """The CI function cfg.ci_fn names, over the decomposed matrices {path: Components}."""
    Cs = {path: comp.V.shape[1] for path, comp in comps.items()}
    if cfg.ci_fn == "mlp":
        return SubcomponentMLPs(Cs, cfg.ci_hidden)
    d_ins = {path: comp.V.shape[0] for path, comp in comps.items()}
    return CITransformer(d_ins, Cs, cfg.ci_d_model, cfg.ci_n_blocks, cfg.ci_n_heads, cfg.ci_d_mlp,
                         cfg.ci_mlp_bias, cfg.ci_final_norm)


def output_logits(out):
    """What a target returns, as the tensor the reconstruction losses compare: a Hugging Face
    ModelOutput's .logits, a tuple's first element, or the tensor itself."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, tuple) else out


class Decomposition(nn.Module):
    """A frozen target with components on the matched matrices, and the CI function. `dec(x)` runs the
    target (caching each matrix's input; x a tensor or a dict of keyword inputs); `dec.masked(x, masks)`
    runs it with masks {path: (m [..., C], δ [...])}; matrices absent from `masks` use their own weight."""

    def __init__(self, target: nn.Module, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.target, self.tie = target, cfg.tie
        self.comps = install_components(target, cfg.modules)
        self.Cs = [comp.V.shape[1] for comp in self.comps.values()]
        self.ci_fn = ci_function(cfg, self.comps).to(self.target_device())
        check_ties(self.comps, self.tie)
        self.tie_weights()
        self.recon_loss = recon_loss  # on CUDA, compiled (compile_hot_paths)
        # the matrix of each channel of a source (routing is per matrix): ΣC mask channels, then M δ channels
        M = len(self.Cs)
        self.matrix_of = torch.tensor([i for i, C in enumerate(self.Cs) for _ in range(C)] + list(range(M)),
                                      device=self.target_device())

    @torch.no_grad()
    def tie_weights(self):
        """Tied matrices (cfg.tie: {b: a}, for targets with W_b = W_a^T) share their subcomponents:
        V_b = U_a^T and U_b = V_a^T. Only a's copy is trained (see tie_gradients); b's follows it."""
        for b, a in self.tie.items():
            self.comps[b].V.copy_(self.comps[a].U.T)
            self.comps[b].U.copy_(self.comps[a].V.T)

    def target_device(self):
        return next(iter(self.comps.values())).weight.device

    def forward(self, x):
        return output_logits(self.target(**x) if isinstance(x, dict) else self.target(x))

    def n_positions(self) -> int:
        """Positions (tokens, or toy samples) in the last target forward."""
        return next(iter(self.comps.values())).input[..., 0].numel()

    def split(self, t) -> dict:
        """[..., ΣC], every matrix's subcomponents side by side in sorted path order -> {path: [..., C]}."""
        return dict(zip(self.comps, t.split(self.Cs, -1)))

    def causal_importance(self):
        """CI from the inputs cached by the last target forward, [..., ΣC]: lower-leaky (for masks) and
        upper-leaky (for the minimality loss)."""
        z = self.ci_fn({path: comp.input for path, comp in self.comps.items()}, self.comps)
        return LowerLeakyHardSigmoid.apply(z), upper_leaky_hard_sigmoid(z)

    def masks(self, ci, source, routed=None) -> dict:
        """The masks {path: (m [..., C], δ [...])} that CI values ci [..., ΣC] leave to a source [..., ΣC + M]
        in [0, 1] (random for the stochastic loss, chosen by the adversary for the adversarial one):
        m = g + (1 - g) s on the first ΣC channels; the last M channels are the matrices' δ. Where
        routed [..., M] is False a matrix gets source 1, so m = 1 and δ = 1: W itself (W = (V U)^T + Δ).
        Routed and unrouted positions thus share one computation instead of computing both outputs."""
        if routed is not None:  # index_select: faster on a CPU than indexing with [..., matrix_of]
            source = torch.where(routed.index_select(-1, self.matrix_of), source, 1.0)
        s, delta = source.split([ci.shape[-1], len(self.Cs)], -1)   # split: its backward is one cat
        m = torch.lerp(s, s.new_ones(()), ci)                       # = g + (1 - g) s, one fused operation
        return {path: (m_path, delta[..., i]) for i, (path, m_path) in enumerate(self.split(m).items())}

    @contextmanager
    def cast_once(self, autocast):
        """Under autocast (bf16 on CUDA) V, U and W in its dtype once for all the passes of a training step,
        instead of in every pass: autocast casts the frozen W at every use and V, U once per autocast
        region, and a step has several (its backwards run outside them). Without autocast: nothing."""
        kind = self.target_device().type
        with autocast:
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        for comp in self.comps.values():
            comp.cast = (comp.V.to(dtype), comp.U.to(dtype), comp.W.to(dtype)) if dtype else None
        try:
            yield
        finally:
            for comp in self.comps.values():
                comp.cast = None

    def deltas(self):
        with torch.autocast(self.target_device().type, enabled=False):  # Δ ≈ 0 needs fp32
            return {path: comp.delta() for path, comp in self.comps.items()}

    def masked(self, x, masks: dict):
        for path, comp in self.comps.items():
            comp.mask = masks.get(path)
        try:
            return self(x)
        finally:
            for comp in self.comps.values():
                comp.mask = None


# -----------------------------------------------------------------------------
# §4 Losses and the adversaries

def faithfulness_loss(deltas: dict):
    """L_faith = Σ_l ||Δ_l||² / Σ_l numel(Δ_l): the subcomponents must add up to the weights."""
    return sum(d.pow(2).sum() for d in deltas.values()) / sum(d.numel() for d in deltas.values())


def importance_minimality_loss(ci_upper, p: float, beta: float, eps: float = 1e-12):
    """ci_upper [..., ΣC]: every subcomponent of every matrix side by side. Per subcomponent,
    s_c = Σ_positions (g + ε)^p and mean_c = s_c / #positions; L_imp = Σ_c mean_c (1 + β log2(1 + s_c)).
    p < 1 late in training favours few subcomponents fully on over many partly on; the β term penalises
    subcomponents that fire often, which splits those serving unrelated inputs. Under data parallelism s_c in
    the log is the sum over all processes (an all-reduce that autograd sees)."""
    s = (ci_upper + eps).pow(p).reshape(-1, ci_upper.shape[-1]).sum(0)  # [ΣC]
    mean = s / (ci_upper.numel() // ci_upper.shape[-1])
    return (mean * (1 + beta * torch.log2(1 + global_sum(s))) if beta else mean).sum()


def recon_loss(out, target_out, kind: str):
    """How far the masked model's output is from the target's: MSE (sum / numel) for toys, or for
    language models KL(target || masked) summed over the vocabulary, mean over positions."""
    if kind == "mse":
        return F.mse_loss(out.float(), target_out.float())
    assert kind == "kl", kind
    log_q, log_p = F.log_softmax(out.float(), -1), F.log_softmax(target_out.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def stochastic_recon_loss(dec, x, target_out, ci, cfg):
    """Masks m = g + (1 - g) u with u ~ U(0, 1) per (position, subcomponent), δ ~ U(0, 1) per position;
    one sample per step. Routing "all": every matrix masked everywhere; "uniform_k_subset" (VPD): a
    random k-subset of matrices per position; "layerwise" (SPD): the all-matrices pass plus the mean
    of M passes that mask one matrix at a time."""
    M = len(dec.comps)
    u = torch.rand(*ci.shape[:-1], ci.shape[-1] + M, device=ci.device)
    routed = uniform_k_subset(ci.shape[:-1], M, ci.device) if cfg.routing == "uniform_k_subset" else None
    masks = dec.masks(ci, u, routed)
    every = dec.recon_loss(dec.masked(x, masks), target_out, cfg.recon_loss)
    if cfg.routing != "layerwise":
        return every
    each = [dec.recon_loss(dec.masked(x, {n: masks[n]}), target_out, cfg.recon_loss) for n in masks]
    return every + sum(each) / len(each)


class Adversary:
    """Persistent PGD, the V in VPD: a source [*positions, ΣC + M] in [0, 1] (see Decomposition.masks) kept
    across training steps and moved by projected Adam *ascent* on the reconstruction loss, so the masks
    m = g + (1 - g) s find the ablations the model handles worst. All matrices share one tensor, so an
    ascent step is a handful of in-place operations however many matrices (on CUDA one compiled kernel)."""

    def __init__(self, betas=(0.5, 0.99), eps=1e-8):
        self.betas, self.eps = betas, eps
        self.sources, self.m, self.v, self.t = None, None, None, 0

    def leaves(self, shape, device):
        """The sources as a fresh leaf tensor that collects gradients, initialised U(0, 1) on first use or
        when a resumed run's batch has another shape."""
        if self.sources is None or self.sources.shape != shape:
            if self.sources is not None:
                print(f"adversary: saved sources {tuple(self.sources.shape)} do not fit batch "
                      f"{tuple(shape)}; starting afresh")
            self.sources = torch.rand(shape, device=device)
            self.m, self.v, self.t = torch.zeros_like(self.sources), torch.zeros_like(self.sources), 0
        return self.sources.detach().requires_grad_()

    @torch.no_grad()
    def ascend(self, grad, lr: float):
        self.t += 1
        b1, b2 = self.betas
        # step size and bias correction as tensors made on the device: one compiled graph serves every step
        scalars = [torch.full((), x, device=grad.device)
                   for x in (lr / (1 - b1 ** self.t), math.sqrt(1 - b2 ** self.t))]
        self.update(self.sources, self.m, self.v, grad, *scalars)

    def update(self, sources, m, v, grad, step_size, bias2):
        b1, b2 = self.betas
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        sources.addcdiv_(m * step_size, v.sqrt().div_(bias2).add_(self.eps)).clamp_(0, 1)

    def state_dict(self):
        return {"sources": self.sources, "m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, sd):
        self.sources, self.m, self.v, self.t = sd["sources"], sd["m"], sd["v"], sd["t"]


def adversarial_recon_loss(dec, x, target_out, ci, sources, cfg):
    routed = uniform_k_subset(ci.shape[:-1], len(dec.comps), ci.device) if cfg.adv_routing != "all" else None
    return dec.recon_loss(dec.masked(x, dec.masks(ci, sources, routed)), target_out, cfg.recon_loss)


def eval_adversary(dec, x, target_out, ci, cfg, milestones, step_size=0.1):
    """The evaluation adversary: one source [1, ..., 1, ΣC + M] shared by the whole batch and all
    positions (it must find systematic failures, not exploit noise), sign-gradient ascent.
    Returns {n_steps: loss after n_steps} for each milestone."""
    if not milestones:  # eval_adv_steps = []: no evaluation adversary
        return {}
    ci = ci.detach()
    sources = torch.rand(*[1] * (ci.dim() - 1), ci.shape[-1] + len(dec.comps), device=ci.device)
    found = {}
    for i in range(max(milestones) + 1):
        sources.requires_grad_()
        loss = dec.recon_loss(dec.masked(x, dec.masks(ci, sources)), target_out, cfg.recon_loss)
        if i in milestones:
            found[i] = loss.item()
        if i == max(milestones):
            break
        (grad,) = torch.autograd.grad(loss, [sources])
        with torch.no_grad():  # the sign of the gradient summed over all processes: one shared source
            sources = (sources + step_size * global_sum(grad).sign()).clamp(0, 1)
    return found


# -----------------------------------------------------------------------------
# §5 One training step, and train()

def training_losses(dec, x, adversary, cfg, p, adv_lr, autocast=nullcontext()):
    """Steps 1-4 of a training step on a batch x. Returns the loss terms and the adversary's sources of
    this step (leaves whose .grad the main backward fills, for step 8)."""
    with dec.cast_once(autocast):  # V, U, W in bf16 once for all the passes below
        # 1-2: the target, caching each decomposed matrix's input, then the causal importances
        with autocast:
            with torch.no_grad():
                target_out = dec(x)
            ci_lower, ci_upper = dec.causal_importance()                      # [..., ΣC]
        # 3: the persistent adversary's inner ascent steps (gradients w.r.t. the sources only)
        sources, shape = None, (*ci_lower.shape[:-1], ci_lower.shape[-1] + len(dec.comps))
        if cfg.adv_coeff:
            for _ in range(cfg.adv_steps):
                sources = adversary.leaves(shape, ci_lower.device)
                with autocast:
                    loss = adversarial_recon_loss(dec, x, target_out, ci_lower.detach(), sources, cfg)
                adversary.ascend(torch.autograd.grad(loss, [sources])[0], adv_lr)
            sources = adversary.leaves(shape, ci_lower.device)
        # 4: the losses
        losses = {"faith": faithfulness_loss(dec.deltas()),
                  "imp": importance_minimality_loss(ci_upper, p, cfg.beta)}
        with autocast:
            if cfg.stoch_coeff:
                losses["stoch"] = stochastic_recon_loss(dec, x, target_out, ci_lower, cfg)
            if cfg.adv_coeff:
                losses["adv"] = adversarial_recon_loss(dec, x, target_out, ci_lower, sources, cfg)
    return losses, sources


def total_loss(losses: dict, cfg: Config):
    """Step 5: the loss terms weighted by their coefficients, summed in fp32."""
    coeffs = {"faith": cfg.faith_coeff, "imp": cfg.imp_coeff, "stoch": cfg.stoch_coeff, "adv": cfg.adv_coeff}
    return sum(coeffs[k] * v.float() for k, v in losses.items())


def tie_gradients(dec):
    """Tied matrices: the trained copy gets the gradient of both uses; the follower none, so that the
    optimiser skips it (Decomposition.tie_weights copies it over after the step)."""
    for b, a in dec.tie.items():
        ca, cb = dec.comps[a], dec.comps[b]
        ca.V.grad += cb.U.grad.T
        ca.U.grad += cb.V.grad.T
        cb.V.grad = cb.U.grad = None


def faithfulness_warmup(dec, vu: list, cfg):
    """Before the first step of a fresh run: AdamW on V and U (vu) with L_faith alone, so that (V U)^T ≈ W
    before any mask is applied (random V, U would make every masked output noise)."""
    warm = torch.optim.AdamW(vu, lr=cfg.faith_warmup_lr, weight_decay=0)  # its moments are freed after
    for _ in range(cfg.faith_warmup_steps):
        warm.zero_grad(set_to_none=True)
        faithfulness_loss(dec.deltas()).backward()
        tie_gradients(dec)
        warm.step()
        dec.tie_weights()


def schedules(step: int, cfg: Config):
    """(p, lr, adversary lr) at a step: p linear from p_start to p_end; lr a linear warm-up, then cosine
    decay to lr * lr_final; the adversary's lr a linear warm-up over adv_warmup of the run."""
    p = cfg.p_start + (cfg.p_end - cfg.p_start) * step / max(1, cfg.steps - 1)
    lr = models.warmup_cosine(step, cfg.lr, int(cfg.lr_warmup * cfg.steps), cfg.steps, cfg.lr_final)
    return p, lr, cfg.adv_lr * min(1.0, (step + 1) / max(1.0, cfg.adv_warmup * cfg.steps))


def due(done: int, interval: int, steps: int) -> bool:
    """Whether a periodic action (log, checkpoint, evaluation) falls after `done` steps: every `interval`
    steps, and after the last (interval 0: after the last only)."""
    return done == steps or (interval > 0 and done % interval == 0)


def check_finite(total, losses: dict, step: int, last_good):
    """A non-finite loss stops every process (alone, the others would wait in an all-reduce) before it reaches
    the weights."""
    finite = torch.isfinite(total.detach()).float()
    if world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        raise FloatingPointError(f"step {step}: the loss is {total.item()} "
                                 f"({ {k: v.item() for k, v in losses.items()} }); {last_good()}")


def train(cfg: Config, target: nn.Module, get_batch, truth=None, run_config=None) -> dict:
    """Decompose `target`. get_batch(split, step) -> (x, y) gives the batch of a step ("train") or the i-th
    evaluation batch ("val"); x: the target's input, a tensor or a dict of keyword inputs (input_ids,
    attention_mask); y: next-token labels for language models, else None. truth: for toy models, what the
    decomposition should find (see models.py). Returns the last evaluation's metrics."""
    # 0: the decomposition (the same initial weights on every process), AdamW on V, U and the CI function, the
    # persistent adversary; the run's plumbing (Appendix B) resumes from out_dir's checkpoint, or a fresh run
    # starts with the faithfulness warm-up
    torch.manual_seed(cfg.seed)
    dec = Decomposition(target, cfg)
    vu = [p for comp in dec.comps.values() for p in (comp.V, comp.U)]
    params = vu + list(dec.ci_fn.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one kernel
    adversary = Adversary()
    run = Run(cfg, dec, opt, adversary, get_batch, truth, run_config)
    if run.start == 0:
        faithfulness_warmup(dec, vu, cfg)
    metrics = {}
    for step in run.steps():
        p, lr, adv_lr = schedules(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, _ = run.get_batch("train", step)
        # 1-4: the target, CI, the adversary's inner steps and the four losses
        losses, sources = training_losses(dec, x, adversary, cfg, p, adv_lr, run.autocast)
        # 5: their weighted sum in fp32; a non-finite one stops every process before it reaches the weights
        total = total_loss(losses, cfg)
        check_finite(total, losses, step, run.last_good)
        # 6-7: one backward gives the parameters' gradients and (through L_adv) the sources'; AdamW
        opt.zero_grad(set_to_none=True)
        total.backward()
        sync_gradients(params)
        tie_gradients(dec)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(vu, cfg.grad_clip)
        opt.step()
        dec.tie_weights()
        # 8: the adversary's outer step, with the gradient the main backward left on the sources
        if cfg.adv_coeff:
            adversary.ascend(sources.grad.div_(cfg.adv_coeff), adv_lr)
            sources.grad = None  # the step's graph keeps `sources` alive into the next step
        # log, checkpoint (before evaluating: a failed evaluation must not cost the steps), evaluate
        done = step + 1
        if due(done, cfg.log_interval, cfg.steps):
            run.log_losses(done, losses, total, p, lr)
        if due(done, cfg.ckpt_interval, cfg.steps):
            run.checkpoint(done)
        if cfg.eval_interval > 0 and due(done, cfg.eval_interval, cfg.steps):
            metrics = run.log_evaluation(done, evaluate(dec, run.get_batch, cfg, truth, run.autocast))
    if run.start >= cfg.steps:  # finished before (its last evaluation perhaps lost to a crash): evaluate it
        metrics = run.log_evaluation(run.start, evaluate(dec, run.get_batch, cfg, truth, run.autocast))
    run.close()  # the timing summary and the figures
    return metrics


# -----------------------------------------------------------------------------
# §6 Metrics

def lm_ce(logits, y):  # labels -1: no next token known
    return F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), ignore_index=-1).item()


def eval_masks(dec, ci, threshold) -> dict:
    """Six kinds of masks: the CI values, all ones, stochastic (with δ ~ U(0, 1)), random U(0, 1), rounded
    (CI > threshold -> 1) and all zeros; δ = 0 except for the stochastic ones."""
    none = torch.zeros(*ci.shape[:-1], ci.shape[-1] + len(dec.comps), device=ci.device)  # m = the CI, δ = 0
    return {"ci": dec.masks(ci, none), "ones": dec.masks(torch.ones_like(ci), none),
            "stoch": dec.masks(ci, torch.rand_like(none)), "random": dec.masks(torch.rand_like(ci), none),
            "rounded": dec.masks((ci > threshold).float(), none),
            "zero": dec.masks(torch.zeros_like(ci), none)}


def evaluate_batch(dec, x, y, cfg):
    """Metrics of one batch: reconstruction (and CE for language models) under each kind of mask,
    hidden-activation MSE, the evaluation adversary, L0. Also returns the batch's CI [..., ΣC]."""
    with torch.no_grad():
        target_out = dec(x)
        target_hidden = {path: F.linear(comp.input, comp.W, comp.bias) for path, comp in dec.comps.items()}
        ci, _ = dec.causal_importance()
    metrics = {"ce/target": lm_ce(target_out, y)} if y is not None else {}
    hidden = {}  # each decomposed matrix's output in the last masked forward
    hooks = [comp.register_forward_hook(lambda mod, inp, out, path=path: hidden.__setitem__(path, out))
             for path, comp in dec.comps.items()]
    try:
        for kind, masks in eval_masks(dec, ci, cfg.ci_threshold).items():
            with torch.no_grad():
                out = dec.masked(x, masks)
            metrics[f"recon/{kind}"] = recon_loss(out, target_out, cfg.recon_loss).item()
            if y is not None:
                metrics[f"ce/{kind}"] = lm_ce(out, y)
            if kind in ("ci", "stoch"):
                for path in hidden:
                    metrics[f"hidden_mse/{kind}/{path}"] = F.mse_loss(hidden[path].float(),
                                                                      target_hidden[path].float()).item()
    finally:
        for h in hooks:
            h.remove()
    for steps, loss in eval_adversary(dec, x, target_out, ci, cfg, cfg.eval_adv_steps).items():
        metrics[f"recon/adv{steps}"] = loss
    for n, g in dec.split(ci).items():
        metrics[f"l0/{n}"] = (g > cfg.ci_threshold).sum(-1).float().mean().item()
    return metrics, ci


def toy_feature_metrics(W, comp: Components):
    """MMCS and ML2R of a toy target matrix W [d_out, n_features] against its subcomponents: for each
    feature j, the best subcomponent's column U[c, :] V[j, c] by cosine similarity (MMCS: the mean of
    those best cosines), and its norm over the feature's (ML2R: their mean)."""
    cols = comp.V[:, :, None] * comp.U[None]                             # [n_features, C, d_out]
    feats = W.T[:, None, :]                                               # [n_features, 1, d_out]
    cos = F.cosine_similarity(cols, feats, dim=-1)                        # [n_features, C]
    best = cos.argmax(1)
    ratio = cols[torch.arange(len(best)), best].norm(dim=-1) / feats[:, 0].norm(dim=-1)
    return cos.max(1).values.mean().item(), ratio.mean().item(), best


def target_ci_error(ci, pattern, tol=0.1):
    """Entries of a CI matrix on one-hot probes (ci [n_features, C]) that miss the expected pattern by
    more than tol. ("identity", n): one subcomponent per feature, matched by linear assignment.
    ("dense", k): the same k subcomponents on for every feature, all others off.
    ("dense_count", k): Goodfire's looser reading of "dense" (their DenseCIPattern): the k columns of most
    CI mass (ties: the first) must each be on for at least one probe, the others never above tol: one error
    per such column never on, and per entry above tol in the other columns. It checks how many
    subcomponents a matrix uses, not whether they fire together."""
    kind, k = pattern
    if kind in ("dense", "dense_count") and k > ci.shape[1]:
        raise ValueError(f"a dense block of {k} subcomponents needs C >= {k}, got C = {ci.shape[1]}: "
                         f"give it C >= {k}")
    expected = torch.zeros_like(ci)
    if kind == "identity":
        from scipy.optimize import linear_sum_assignment  # the Hungarian method
        rows, cols = linear_sum_assignment(ci.numpy(), maximize=True)
        expected[rows, cols] = 1
    elif kind == "dense":
        expected[:, ci.mean(0).topk(k).indices] = 1
    elif kind == "dense_count":
        order = ci.sum(0).argsort(descending=True, stable=True)
        never_on = (ci[:, order[:k]].max(0).values < 1 - tol).sum()
        return int(never_on + (ci[:, order[k:]] > tol).sum())
    else:
        raise ValueError(f"unknown CI pattern {kind!r}")
    return int(((ci - expected).abs() > tol).sum())


@torch.no_grad()
def probe_ci(dec, probes):
    dec(probes)
    return {n: g.cpu() for n, g in dec.split(dec.causal_importance()[0]).items()}


def evaluate(dec, get_batch, cfg, truth=None, autocast=nullcontext()) -> dict:
    """The metrics averaged over `cfg.eval_batches` validation batches: L0 per matrix, layer and in total
    (subcomponents with CI above ci_threshold per position), alive subcomponents (mean CI above
    alive_threshold), KL or MSE and CE under each kind of mask, CE unrecovered ((CE_x - CE_target) /
    (CE_zero - CE_target)), the evaluation adversary, and for toys MMCS / ML2R and the target-CI error."""
    devices = [dec.target_device()] if dec.target_device().type == "cuda" else []
    metrics, ci_mass, n_pos = {}, 0, 0
    with torch.random.fork_rng(devices):  # evaluation must not move the training RNG (resume equality)
        torch.manual_seed(cfg.seed + 1)
        for i in range(cfg.eval_batches):
            x, y = get_batch("val", i)
            # training's precision, so that evaluation sees training's CI; cast_once first, since it enters
            # `autocast` itself, and a torch.autocast entered twice, nested, stays on when the outer block
            # exits
            with dec.cast_once(autocast), autocast:
                batch, ci = evaluate_batch(dec, x, y, cfg)
            for k, v in batch.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.eval_batches
            ci_mass, n_pos = ci_mass + ci.float().reshape(-1, ci.shape[-1]).sum(0), n_pos + ci[..., 0].numel()
    keys = sorted(metrics)  # each process evaluated its own shard of the validation data: average them
    metrics = dict(zip(keys, mean_over_processes(
        torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=dec.target_device())).tolist()))
    metrics["l0/total"] = sum(metrics[f"l0/{n}"] for n in dec.comps)
    for path in dec.comps:  # per layer: a path up to its first number (h.3.attn.q_proj belongs to layer h.3)
        parts = path.split(".")
        layer = next((".".join(parts[:i + 1]) for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        if layer:
            metrics[f"l0_layer/{layer}"] = metrics.get(f"l0_layer/{layer}", 0.0) + metrics[f"l0/{path}"]
    if "ce/target" in metrics:
        gap = metrics["ce/zero"] - metrics["ce/target"]  # 0 where ablating the matrices costs nothing
        for kind in ("ci", "ones", "stoch", "random", "rounded", "zero"):  # the share of that gap left
            excess = metrics[f"ce/{kind}"] - metrics["ce/target"]
            metrics[f"ce_unrecovered/{kind}"] = excess / gap if gap else math.nan
    mean_ci = global_sum(ci_mass) / (n_pos * world_size())
    for n, mean in dec.split(mean_ci).items():
        metrics[f"alive/{n}"] = int((mean > cfg.alive_threshold).sum())
    metrics["alive/total"] = sum(metrics[f"alive/{n}"] for n in dec.comps)
    if truth is not None:  # toy models: the decomposition that should come out is known
        if "features" in truth and truth["features"][0] in dec.comps:
            path, W = truth["features"]
            metrics["mmcs"], metrics["ml2r"], _ = toy_feature_metrics(W, dec.comps[path])
        ci = probe_ci(dec, truth["probes"])
        patterns = {n: pattern for n, pattern in truth["patterns"].items() if n in dec.comps}  # decomposed
        for n, pattern in patterns.items():
            metrics[f"ci_error/{n}"] = target_ci_error(ci[n], pattern)
            if pattern[0] == "dense":  # also by Goodfire's count-only reading, to compare with their numbers
                metrics[f"ci_error_count/{n}"] = target_ci_error(ci[n], ("dense_count", pattern[1]))
        metrics["ci_error/total"] = sum(metrics[f"ci_error/{n}"] for n in patterns)
    return metrics


# -----------------------------------------------------------------------------
# §7 Attribution graphs: which subcomponents compute one prediction, and how they drive each other

@contextmanager
def detached_subcomponents(dec, delta=True):
    """The forward that attribution graphs differentiate. Every mask is 1, so the output is the target's, but
    each matrix's subcomponent activations a = x V go on as a detached leaf copy a': out = a' U + Δx + bias
    (without Δx when delta is False). A gradient thus reaches a subcomponent only through the residual stream,
    norms, nonlinearities, attention and Δ, never through another subcomponent: the paper's stop-gradient on
    every non-source subcomponent. The first nn.Embedding's output is detached the same way. Yields {path or
    "embed": (a [..., C] attached, a' leaf)}, filled by each forward."""
    acts = {}
    # Δ is a constant of this forward: computed once, not per matrix per forward
    deltas = {path: comp.delta().detach() for path, comp in dec.comps.items()} if delta else {}

    def matrix(path, comp, module, inputs, out):
        x = inputs[0]
        a = x @ comp.V
        acts[path] = (a, a.detach().requires_grad_())
        out = acts[path][1] @ comp.U + (F.linear(x, deltas[path].to(x.dtype)) if delta else 0)
        return out if comp.bias is None else out + comp.bias

    def embedding(module, inputs, out):
        acts["embed"] = (out, out.detach().requires_grad_())
        return acts["embed"][1]
    embed = next((m for m in dec.target.modules() if isinstance(m, nn.Embedding)), None)
    hooks = [comp.register_forward_hook(partial(matrix, path, comp)) for path, comp in dec.comps.items()]
    hooks += [embed.register_forward_hook(embedding)] if embed is not None else []
    try:
        yield acts
    finally:
        for h in hooks:
            h.remove()


def by_position(t):  # [B, *positions, C] -> [B, P, C]: toy inputs have one position, sequences T
    return t.reshape(t.shape[0], -1, t.shape[-1])


def repeat(x, k: int):  # one input (a tensor or a dict of keyword inputs) k times along the batch
    if torch.is_tensor(x):
        return x.expand(k, *x.shape[1:])
    return {n: v.expand(k, *v.shape[1:]) for n, v in x.items()}


def attribution_forward(dec, x, delta=True):
    """Runs `detached_subcomponents` on x; a toy input without an embedding becomes the input leaf itself."""
    with detached_subcomponents(dec, delta) as acts:
        if torch.is_tensor(x) and x.is_floating_point():
            x = x.detach().clone().requires_grad_()
            acts["embed"] = (x, x)
        out = dec(x)
    return out, acts


def links(dec, x) -> dict:
    """Which node kinds reach which without passing through another subcomponent, found by probing gradients
    with Δ off (only the residual stream, norms, nonlinearities and attention carry them): {target: {source:
    whether across positions}}, the target "output" being the model's output. In a transformer the links
    across positions are k/v -> o of one attention block."""
    out, acts = attribution_forward(dec, x, delta=False)
    found = {}
    for target, value in [(n, acts[n][0]) for n in dec.comps] + [("output", out)]:
        sources = [s for s in acts if s != target]
        grads = torch.autograd.grad(by_position(value)[:, -1].sum(), [acts[s][1] for s in sources],
                                    retain_graph=True, allow_unused=True)
        found[target] = {s: bool(by_position(g)[:, :-1].abs().sum() > 0) for s, g in zip(sources, grads)
                         if g is not None and g.abs().sum() > 0}
    return found


def attribution_graph(dec, x, position=-1, threshold=0.0, ci=None, ci_weighted=True, logits=True,
                      output_prob=0.01, max_outputs=15, max_edges=20_000, batch=64) -> dict:
    """The attribution graph of one input x ([1, T] tokens, a dict of them, or a toy's [1, d]) for its
    prediction at `position`. Nodes: (matrix, position, c) with CI > threshold at positions up to `position`
    (ci [1, ..., ΣC]: the CI function's unless given, e.g. an optimised one); one input node per position (the
    embedding's output, summed over its width; a toy's input); output nodes: with logits, the tokens whose
    probability under CI masks exceeds output_prob, at most max_outputs; else the max_outputs largest output
    coordinates. Edges: attr(s -> t) = ∂a_t/∂a'_s · a'_s · g_s, g_s the source's CI (the paper's formula;
    ci_weighted=False leaves it out, as Goodfire's app does), between nodes at one position, or across
    positions where `links` finds them. Returns {"position", "nodes", "edges"}: the max_edges strongest edges
    by |attribution|."""
    with torch.no_grad():
        dec(x)
        a = {n: by_position(comp.input @ comp.V)[0] for n, comp in dec.comps.items()}     # {path: [P, C]}
        ci = dec.causal_importance()[0] if ci is None else ci
        none = torch.zeros(*ci.shape[:-1], ci.shape[-1] + len(dec.Cs), device=ci.device)  # m = the CI, δ = 0
        out_ci = by_position(dec.masked(x, dec.masks(ci, none)))
    P, device = by_position(ci).shape[1], ci.device
    p = position % P
    cis = {n: by_position(g)[0] for n, g in dec.split(ci).items()}                          # {path: [P, C]}
    alive = {n: (g > threshold) & (torch.arange(P, device=device)[:, None] <= p) for n, g in cis.items()}
    score = out_ci[0, p].float().softmax(-1) if logits else out_ci[0, p].abs()
    top = score.topk(min(max_outputs, len(score)))
    outputs = top.indices[(top.values > output_prob) if logits else slice(None)].tolist()
    targets = [(n, s, c) for n in dec.comps for s, c in alive[n].nonzero().tolist()]
    targets += [("output", p, o) for o in outputs]
    link = links(dec, x)
    sources = ["embed", *dec.comps]
    found = torch.zeros(0, 5)  # the strongest edges so far: source, s_in, c_in, target, attribution
    for start in range(0, len(targets), batch):
        chunk = targets[start:start + batch]
        out, acts = attribution_forward(dec, repeat(x, len(chunk)))
        values = {n: by_position(a) for n, (a, _) in acts.items()} | {"output": by_position(out)}
        total = sum(values[t][k, s, c] for k, (t, s, c) in enumerate(chunk))
        present = [n for n in sources if n in acts]
        grads = torch.autograd.grad(total, [acts[n][1] for n in present], allow_unused=True)
        pos = torch.arange(P, device=device)
        at = torch.tensor([s for _, s, _ in chunk], device=device)[:, None]                 # [K, 1]
        for source, grad in zip(present, grads):
            if grad is None:
                continue
            attr = by_position(grad) * by_position(acts[source][1]).detach()                  # [K, P, C]
            if source == "embed":
                attr, ok = attr.sum(-1, keepdim=True), torch.ones(P, 1, dtype=torch.bool, device=device)
            else:
                attr, ok = attr * cis[source] if ci_weighted else attr, alive[source]
            cross = torch.tensor([link[t].get(source, False) for t, _, _ in chunk], device=device)[:, None]
            linked = torch.tensor([source in link[t] for t, _, _ in chunk], device=device)[:, None]
            where = ((pos == at) | (cross & (pos <= at))) & linked                              # [K, P]
            k, s, c = (where[..., None] & ok).nonzero(as_tuple=True)
            new = torch.stack([torch.full_like(k, sources.index(source)), s, c, k + start]).float().T
            found = torch.cat([found, torch.cat([new, attr[k, s, c].detach().float()[:, None]], 1).cpu()])
        found = found[found[:, 4].abs().argsort(descending=True)[:max_edges]]
    def name(n, s, c):
        return f"embed@{s}" if n == "embed" else f"output:{c}@{s}" if n == "output" else f"{n}:{c}@{s}"
    nodes = [{"id": f"embed@{s}", "layer": "embed", "position": s} for s in range(p + 1)]
    nodes += [{"id": name(n, s, c), "layer": n, "position": s, "c": c, "ci": cis[n][s, c].item(),
               "act": a[n][s, c].item()} for n, s, c in targets if n != "output"]
    nodes += [{"id": name("output", p, o), "layer": "output", "position": p, "c": o, "score": score[o].item()}
              for o in outputs]
    edges = [{"source": name(sources[int(n)], int(s), int(c)), "target": name(*targets[int(t)]),
              "attribution": v} for n, s, c, t, v in found.tolist() if v != 0]
    return {"position": p, "nodes": nodes, "edges": edges}


def label_ce(dec, x, masks, label: int, position: int):
    """Cross-entropy of one token at one position of a language model, under masks."""
    logits = by_position(dec.masked(x, masks))[:, position].float()
    return F.cross_entropy(logits, torch.full((len(logits),), label, device=logits.device))


def prompt_adversary(dec, x, ci, label: int, position: int, steps=4, step_size=1.0, free=None):
    """Sources [..., ΣC + M] that raise the label's CE under masks g + (1 - g) s: a random start, then
    sign-gradient steps, each clamped to [0, 1]. Unlike training's adversary, one per entry (not shared), with
    Δ's channels at 0 (no Δ), and 0 outside `free` [..., ΣC] when given (those entries then keep m = g)."""
    keep = torch.cat([torch.ones_like(ci) if free is None else free.to(ci.dtype),
                      torch.zeros(*ci.shape[:-1], len(dec.Cs), device=ci.device)], -1)
    sources = torch.rand_like(keep) * keep
    for _ in range(steps):
        sources.requires_grad_()
        loss = label_ce(dec, x, dec.masks(ci.detach(), sources), label, position)
        (grad,) = torch.autograd.grad(loss, [sources])
        sources = ((sources + step_size * grad.sign()).clamp(0, 1) * keep).detach()
    return sources


def optimise_ci(dec, x, label: int, position=-1, steps=500, lr=1e-2, imp_coeff=0.05, p=0.3, adv_steps=4,
                threshold=0.0, seed=0):
    """The paper's optimised ("post-hoc") CI of one prompt: AdamW on the pre-sigmoid CI of the alive entries
    (CI > threshold at positions up to `position`, starting from the CI function's; the rest fixed at 0) to
    keep the label's CE low under stochastic masks (δ random) and under a small fresh adversary
    (`prompt_adversary` over the alive entries), plus imp_coeff · importance minimality at p. Returns the
    optimised CI [1, ..., ΣC], whose nonzero entries are the nodes that survive."""
    torch.manual_seed(seed)
    with torch.no_grad():
        dec(x)
        z0 = dec.ci_fn({path: comp.input for path, comp in dec.comps.items()}, dec.comps)
    P = by_position(z0).shape[1]
    before = (torch.arange(P, device=z0.device) <= position % P).reshape(*z0.shape[1:-1], 1)
    alive = (LowerLeakyHardSigmoid.apply(z0) > threshold) & before
    z = z0.clone().requires_grad_()
    opt = torch.optim.AdamW([z], lr=lr, weight_decay=0)
    for _ in range(steps):
        zz = torch.where(alive, z, 0.0)
        g = LowerLeakyHardSigmoid.apply(zz)
        u = torch.rand(*g.shape[:-1], g.shape[-1] + len(dec.Cs), device=g.device)
        loss = label_ce(dec, x, dec.masks(g, u), label, position)
        loss = loss + imp_coeff * importance_minimality_loss(upper_leaky_hard_sigmoid(zz), p, 0.0)
        if adv_steps:
            sources = prompt_adversary(dec, x, g, label, position, adv_steps, free=alive)
            loss = loss + label_ce(dec, x, dec.masks(g, sources), label, position)
        (z.grad,) = torch.autograd.grad(loss, [z])
        opt.step()
    return LowerLeakyHardSigmoid.apply(torch.where(alive, z, 0.0)).detach()


@torch.no_grad()
def faithfulness(dec, x, label: int, ci, position=-1, alive=None, adv_steps=4, seed=0) -> dict:
    """The label's probability under the target, CI masks (δ = 0), one stochastic sample (m = g + (1 - g) u,
    δ ~ U(0, 1)) and a fresh adversary (`prompt_adversary`) over the alive entries (`alive` [..., ΣC], default
    CI > 0; for an optimised graph, those alive before it was pruned): what the graph keeps at g + (1 - g) s,
    what it pruned at s, the rest ablated. A faithful graph keeps all four high."""
    torch.manual_seed(seed)
    prob = lambda masks: label_ce(dec, x, masks, label, position).neg().exp().item()
    channels = (*ci.shape[:-1], ci.shape[-1] + len(dec.Cs))
    alive = ci > 0 if alive is None else alive
    with torch.enable_grad():
        adversary = prompt_adversary(dec, x, ci, label, position, adv_steps, free=alive)
    target = by_position(dec(x))[:, position].float().softmax(-1)[0, label].item()
    return {"target": target, "ci": prob(dec.masks(ci, torch.zeros(channels, device=ci.device))),
            "stochastic": prob(dec.masks(ci, torch.rand(channels, device=ci.device))),
            "adversarial": prob(dec.masks(ci, adversary))}


# -----------------------------------------------------------------------------
# Appendix A: data parallelism. Each rank runs its own batch; V, U and the CI function stay identical.

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over all processes; the backward sums the incoming gradients the same way, so every
    process's share gets the gradient of every process's loss."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def global_sum(x):
    return _AllReduceSum.apply(x) if world_size() > 1 else x


@torch.no_grad()
def mean_over_processes(x):
    """For logging: the mean of x over all processes."""
    if world_size() > 1:
        dist.all_reduce(x)
        x /= world_size()
    return x


def sync_gradients(params):
    """The masked forwards run outside any DDP wrapper, so average the gradients of V, U and the CI
    function by hand, as one flat all-reduce."""
    if world_size() == 1:
        return
    flat = torch.cat([prm.grad.flatten() for prm in params])
    dist.all_reduce(flat)
    flat /= world_size()
    for prm, g in zip(params, flat.split([prm.numel() for prm in params])):
        prm.grad.copy_(g.view_as(prm))


# -----------------------------------------------------------------------------
# Appendix B: checkpoints, resume and the log

def save_checkpoint(path: str, ckpt: dict):
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, keys=("config", "step", "components", "target", "ci_fn", "optimizer",
                                     "adversary", "rng")) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"there is no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message would suggest unsafe loading, which a corrupt file never needs
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is corrupt (a torn "
                           "copy?) or not a vpd.py checkpoint") from None
    missing = set(keys) - set(ckpt)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {sorted(missing)}; it is not a vpd.py checkpoint")
    return ckpt


def load_decomposition_state(dec, ckpt: dict, path="the checkpoint"):
    """The target, V, U and the CI function of a checkpoint, into a Decomposition built with its config."""
    mine = {path: tuple(comp.V.shape) for path, comp in dec.comps.items()}
    theirs = {n: tuple(c["V"].shape) for n, c in ckpt["components"].items()}
    if mine != theirs:
        diff = {n: f"{theirs.get(n, 'absent')} there, {mine.get(n, 'absent')} here" for n in {*mine, *theirs}
                if mine.get(n) != theirs.get(n)}
        raise ValueError(f"{path} decomposes other matrices or other C (V [d_in, C]: {diff}); resume with "
                         "the config it was written with (its config.json), or start afresh in another "
                         "out_dir")
    state = dict(ckpt["target"])
    for n, comp in ckpt["components"].items():
        state[f"{n}.V"], state[f"{n}.U"] = comp["V"], comp["U"]
    dec.target.load_state_dict(state)
    try:
        dec.ci_fn.load_state_dict(ckpt["ci_fn"])
    except RuntimeError as e:
        raise ValueError(f"{path} holds another CI function (ci_fn and its sizes must match the config):"
                         f"\n{e}") from None


def load_decomposition(path: str, device="cpu"):
    """A vpd.py checkpoint -> (the plain target, its Decomposition on a copy of it, {path: {"V", "U"}},
    the target's config, the decomposition's config). The plain target is what edits are applied to and
    saved from; the decomposition gives CI."""
    ckpt = load_checkpoint(path, keys=("config", "components", "target", "ci_fn"))  # no optimizer needed
    known = {f.name for f in dataclasses.fields(models.TargetConfig)}
    tcfg = models.TargetConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    target = models.build_model(tcfg)
    target.load_state_dict(ckpt["target"])
    target.to(device).eval().requires_grad_(False)
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    dec = Decomposition(copy.deepcopy(target), cfg)
    load_decomposition_state(dec, ckpt, path)
    dec.to(device).eval()
    components = {path: {"V": comp.V.detach(), "U": comp.U.detach()} for path, comp in dec.comps.items()}
    return target, dec, components, tcfg, cfg


def import_goodfire(run: str, out_dir: str, n_heads: int = None) -> str:
    """Goodfire's saved decomposition -> out_dir/ckpt.pt, a checkpoint that load_decomposition and edit.py
    read. run: a directory with model_<step>.pth and final_config.yaml (older runs) or run_meta.yaml, or
    "wandb:entity/project/runs/id" (downloaded once into out/goodfire/). Their state dict holds
    target_model.<the target's keys>, _components.<path, "-" for ".">.{V, U} in our orientation, and
    ci_fn._global_ci_fn.* for their global shared transformer: an input projector, pre-norm blocks with
    parameter-free RMSNorms, separate q, k, v, out projections, an MLP with biases, no final norm, an output
    head; their Linear stores W as [in, out]. Only that CI function, the leaky-hard sigmoid and a
    LlamaSimpleMLP target; anything else is refused by name. n_heads: the target's, which the decomposition's
    files do not hold (a model_config.yaml beside them is read if present)."""
    import yaml
    if run.startswith("wandb:"):
        yamls = ("final_config.yaml", "run_meta.yaml", "model_config.yaml")
        run = os.path.dirname(models.download_wandb(run, r"model_(\d+)\.pth", yamls, out_dir="out/goodfire"))
    steps = {int(m[1]): f for f in glob.glob(f"{run}/model_*.pth")
             if (m := re.fullmatch(r"model_(\d+)\.pth", os.path.basename(f)))}
    meta = [f for f in (f"{run}/run_meta.yaml", f"{run}/final_config.yaml") if os.path.exists(f)]
    if not steps or not meta:
        held = sorted(os.listdir(run)) if os.path.isdir(run) else "nothing (no directory)"
        raise FileNotFoundError(f"{run} should hold Goodfire's model_<step>.pth and final_config.yaml or "
                                f"run_meta.yaml; it holds {held}")
    raw = yaml.safe_load(open(meta[0]))
    if "pd" in raw:  # run_meta.yaml, after their refactor
        pd, data, targets = raw["pd"], raw.get("data", {}), raw["pd"]["decomposition_targets"]
        target_class = raw["target"]["spec"]["model_class"]
    else:            # final_config.yaml
        pd, data, targets = raw, raw.get("task_config", {}), raw["module_info"]
        target_class = raw.get("pretrained_model_class", "")
    ci = pd["ci_config"]
    sizes = ci.get("simple_transformer_ci_cfg") or {}
    attn = sizes.get("attn_config") or {}
    hidden = sizes.get("mlp_hidden_dim") or [4 * sizes.get("d_model", 0)]  # null: their default, 4 d_model
    refused = {f"ci_config.fn_type {ci.get('fn_type')}": ci.get("fn_type") != "global_shared_transformer",
               f"sigmoid_type {pd.get('sigmoid_type')}": pd.get("sigmoid_type", "leaky_hard") != "leaky_hard",
               f"target class {target_class}": not target_class.endswith("LlamaSimpleMLP"),
               "identity targets": bool(pd.get("identity_module_info")
                                        or pd.get("identity_decomposition_targets")),
               "use_delta_component false": pd.get("use_delta_component", True) is False,
               "an MLP of other than one hidden layer": len(hidden) != 1,
               f"attn_config.rope_base {attn.get('rope_base')}": attn.get("rope_base", 10000.0) != 10000.0}
    if any(refused.values()):
        raise ValueError(f"{meta[0]}: vpd.py imports Goodfire's global_shared_transformer CI with the "
                         "leaky_hard sigmoid (RoPE base 1e4, one MLP hidden layer) on a LlamaSimpleMLP "
                         "target with the delta component and no identity targets; not supported here: "
                         + ", ".join(k for k, bad in refused.items() if bad))
    step = max(steps)
    state = torch.load(steps[step], map_location="cpu", weights_only=True)
    parts = {prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
             for prefix in ("target_model.", "_components.", "ci_fn._global_ci_fn.")}
    if sum(map(len, parts.values())) != len(state):
        other = next(k for k in state if not k.startswith(tuple(parts)))
        raise ValueError(f"{steps[step]} holds keys of no global CI transformer decomposition, e.g. {other}")
    target, theirs, comps = parts["target_model."], parts["ci_fn._global_ci_fn."], {}
    for k, v in parts["_components."].items():  # .bias is the target's own, in target_model
        name, _, kind = k.rpartition(".")
        if kind in ("V", "U"):
            comps.setdefault(name.replace("-", "."), {})[kind] = v
    n_blocks, d_model = sizes["n_blocks"], sizes["d_model"]
    try:  # their names -> ours; their Linear's W [in, out] -> ours [out, in]; q, k, v fused into one matrix
        ci_state = {"proj_in.weight": theirs.pop("_input_projector.W").T,
                    "proj_in.bias": theirs.pop("_input_projector.b"),
                    "proj_out.weight": theirs.pop("_output_head.W").T,
                    "proj_out.bias": theirs.pop("_output_head.b")}
        for i in range(n_blocks):
            b, ours = f"_blocks.{i}.", f"blocks.{i}."
            ci_state[ours + "qkv.weight"] = torch.cat([theirs.pop(f"{b}attn.{n}_proj.weight") for n in "qkv"])
            ci_state[ours + "proj.weight"] = theirs.pop(b + "attn.out_proj.weight")
            inv_freq = theirs.pop(b + "attn.rope.inv_freq")  # models.rope's: base 1e4 over the whole head
            half = len(inv_freq)
            if not torch.allclose(inv_freq.float(), 1e4 ** (-torch.arange(half) / half), rtol=1e-5):
                raise ValueError(f"{steps[step]}: block {i}'s RoPE frequencies are not base 1e4's")
            for j in (0, 2):
                ci_state[f"{ours}mlp.{j}.weight"] = theirs.pop(f"{b}mlp.{j}.W").T
                ci_state[f"{ours}mlp.{j}.bias"] = theirs.pop(f"{b}mlp.{j}.b")
            ci_state[ours + "norm1.weight"] = ci_state[ours + "norm2.weight"] = torch.ones(d_model)
    except KeyError as e:
        raise ValueError(f"{steps[step]} lacks the CI transformer's key "
                         f"ci_fn._global_ci_fn.{e.args[0]}") from None
    if theirs:
        raise ValueError(f"{steps[step]}: CI function keys no {n_blocks}-block transformer has: "
                         f"{sorted(theirs)[:4]}")
    if os.path.exists(f"{run}/model_config.yaml"):  # the target run's own config, if downloaded beside it
        target_cfg = yaml.safe_load(open(f"{run}/model_config.yaml"))
        if n_heads not in (None, target_cfg["n_head"]):
            raise ValueError(f"--n_heads={n_heads}, but {run}/model_config.yaml says n_head "
                             f"{target_cfg['n_head']}")
        n_heads = target_cfg["n_head"]
        ours = {"rotary_base": 10000, "rotary_adjacent_pairs": False, "n_key_value_heads": n_heads,
                "rms_norm_eps": 1e-6}
        other = {k: target_cfg[k] for k, v in ours.items() if target_cfg.get(k, v) not in (v, None)}
        if other:
            raise ValueError(f"{run}/model_config.yaml describes a target models.LlamaSimpleMLP is not: "
                             f"{other}")
    if n_heads is None:
        raise ValueError(f"{run} does not say the target's number of attention heads: pass --n_heads "
                         "(Pile-4L: 6)")
    vocab, d = target["wte.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in target if k.startswith("h."))
    tcfg = models.TargetConfig(model="llama_simple_mlp", n_layers=n_layers, d_model=d, n_heads=n_heads,
                               d_mlp=target["h.0.mlp.c_fc.weight"].shape[0], vocab_size=vocab,
                               seq_len=data.get("max_seq_len", 512),
                               dataset=data.get("dataset_name", "random"), train_target=False)
    cfg = Config(out_dir=out_dir, modules={t["module_pattern"]: t["C"] for t in targets}, ci_fn="transformer",
                 ci_d_model=d_model, ci_n_blocks=n_blocks, ci_n_heads=attn["n_heads"],
                 ci_d_mlp=hidden[0], ci_mlp_bias=True, ci_final_norm=False, recon_loss="kl",
                 ci_threshold=0.0, steps=pd.get("steps", step), batch_size=pd.get("batch_size", 1))
    ckpt = {"config": {**dataclasses.asdict(cfg), **dataclasses.asdict(tcfg)}, "step": step,
            "components": comps, "target": target, "ci_fn": ci_state}
    with torch.device("meta"):  # every tensor where our model expects it, before anything is written
        dec = Decomposition(models.build_model(tcfg), cfg)
    want = {"components": {n: {"V": c.V.shape, "U": c.U.shape} for n, c in dec.comps.items()},
            "target": {k: v.shape for k, v in dec.target.state_dict().items()
                       if not k.endswith((".V", ".U"))},
            "ci_fn": {k: v.shape for k, v in dec.ci_fn.state_dict().items()}}
    for part, shapes in want.items():
        got = {k: {kk: vv.shape for kk, vv in v.items()} if part == "components" else v.shape
               for k, v in ckpt[part].items()}
        if got != shapes:
            diff = sorted(k for k in {*got, *shapes} if got.get(k) != shapes.get(k))
            raise ValueError(f"{steps[step]}: its {part} do not fit the translated config, at {diff[:4]}")
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), ckpt)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(ckpt["config"], f, indent=1)
    return os.path.join(out_dir, "ckpt.pt")


class Run:
    """The plumbing of one train() call: each process's own noise, compilation, the memory plan and a step's
    FLOPs (Appendix C); out_dir's files: ckpt.pt (and under torchrun each further rank's ckpt_rank{r}.pt, its
    own adversary and noise) and metrics.jsonl, set aside by a fresh run or loaded on resume; the log, the
    timing and the figures."""

    def __init__(self, cfg: Config, dec, opt, adversary, get_batch, truth=None, run_config=None):
        self.cfg, self.dec, self.opt, self.adversary, self.truth = cfg, dec, opt, adversary, truth
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.rank:  # each process its own masks, routing and adversary; rank 0 the single-process stream
            torch.manual_seed(cfg.seed + 1_000_003 * self.rank)
        self.get_batch, device = unpadded(get_batch), dec.target_device()
        bf16 = cfg.dtype == "bfloat16" and device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        if cfg.compile:
            compile_hot_paths(dec, adversary)
        self.flops, self.peak = preflight(dec, cfg, self.get_batch, self.autocast, truth, self.rank == 0)
        self.run_config = run_config or dataclasses.asdict(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.rank_path = os.path.join(cfg.out_dir, f"ckpt_rank{self.rank}.pt")
        self.written = None    # the step of the last checkpoint this run wrote or resumed from
        self.evaluated = None  # the step of the last evaluation in metrics.jsonl
        self.start = self.resume() if cfg.init_from == "resume" else self.fresh()
        if self.start >= cfg.steps:
            print(f"step {self.start} of {cfg.steps}: nothing to train; evaluating the decomposition")
        self.step_ms = []

    def fresh(self) -> int:
        """A new run: set an earlier run's files aside (its checkpoint kept, where no resume will take it)."""
        if self.rank == 0 and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        if self.rank == 0 and os.path.exists(self.ckpt_path):
            os.replace(self.ckpt_path, self.ckpt_path + ".prev")
            print(f"a fresh run: the earlier {self.ckpt_path} is now {self.ckpt_path}.prev")
        if self.rank == 0:  # every rank's file: a world of another size left some no rank of this one writes
            for path in glob.glob(os.path.join(self.cfg.out_dir, "ckpt_rank*.pt")):
                os.replace(path, path + ".prev")
        return 0

    def resume(self) -> int:
        ckpt = load_checkpoint(self.ckpt_path)
        load_decomposition_state(self.dec, ckpt, self.ckpt_path)
        self.opt.load_state_dict(ckpt["optimizer"])
        for group in self.opt.param_groups:  # the config's, not the saved one (lr is set at every step)
            group["weight_decay"] = self.cfg.weight_decay
        start = self.written = ckpt["step"]
        if ckpt["config"].get("steps") != self.cfg.steps:  # the schedules are functions of step / steps
            print(f"resuming a run of {ckpt['config'].get('steps')} steps as one of {self.cfg.steps}: the p, "
                  "lr and adversary schedules now span the new length")
        own = ckpt  # rank 0's adversary and noise; the other ranks' are in their own files
        if self.rank:
            exists = os.path.exists(self.rank_path)
            own = load_checkpoint(self.rank_path, ("step", "adversary", "rng")) if exists else {"step": None}
        device = self.dec.target_device()
        if own["step"] == start:
            self.adversary.load_state_dict({k: v.to(device) if torch.is_tensor(v) else v
                                            for k, v in own["adversary"].items()})
            torch.set_rng_state(own["rng"]["cpu"])
            if device.type == "cuda" and "cuda" in own["rng"]:  # absent when the run moved from the CPU
                torch.cuda.set_rng_state(own["rng"]["cuda"], device)
        else:  # no file of this rank at this step (another world size, or a crash between the writes)
            print(f"rank {self.rank}: no state at step {start} in {self.rank_path}; its adversary and noise "
                  "start afresh")
        if self.rank == 0 and os.path.exists(self.metrics_path):  # drop what was logged after the checkpoint,
            with open(self.metrics_path) as f:                   # and a last line a crash tore (no newline)
                kept = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= start]
            self.evaluated = max((r["step"] for r in map(json.loads, kept) if "l0/total" in r), default=None)
            with open(self.metrics_path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.metrics_path + ".tmp", self.metrics_path)
        if self.rank == 0:
            print(f"resuming from {self.ckpt_path} at step {start}")
        return start

    def steps(self):
        """The steps left, with a progress bar; the clock runs while they train, not while they log, save or
        evaluate."""
        self.t, self.t_step = time.perf_counter(), self.start
        bar = tqdm(range(self.start, self.cfg.steps), initial=self.start, total=self.cfg.steps,
                   disable=self.rank > 0, dynamic_ncols=True)
        for step in bar:
            yield step
            if any(due(step + 1, interval, self.cfg.steps) for interval in
                   (self.cfg.log_interval, self.cfg.ckpt_interval, self.cfg.eval_interval)):
                self.t, self.t_step = time.perf_counter(), step + 1

    def last_good(self) -> str:
        if self.written is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.ckpt_path} (step {self.written})"

    def checkpoint(self, step):
        dec, params = self.dec, [p for p in self.dec.parameters() if p.requires_grad]
        if not all(torch.isfinite(prm).all() for prm in params):  # a finite loss can leave NaN gradients
            raise FloatingPointError(f"step {step}: non-finite weights; {self.last_good()}")
        device = dec.target_device()
        own = {"step": step, "adversary": self.adversary.state_dict(), "rng": {"cpu": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}}
        if self.rank:
            save_checkpoint(self.rank_path, own)
        if world_size() > 1:
            dist.barrier()  # the other ranks' files are written before ckpt.pt moves on to this step
        if self.rank == 0:
            state = dec.target.state_dict()
            save_checkpoint(self.ckpt_path, {
                "config": self.run_config, **own,
                "components": {path: {"V": comp.V.detach().cpu(), "U": comp.U.detach().cpu()}
                               for path, comp in dec.comps.items()},
                "target": {k: v.cpu() for k, v in state.items() if not k.endswith((".V", ".U"))},
                "ci_fn": dec.ci_fn.state_dict(), "optimizer": self.opt.state_dict()})
        self.written = step

    def log_losses(self, step, losses: dict, total, p, lr):
        """The loss terms (mean over processes), p, lr, and the speed since the last log line: ms per step,
        positions (tokens) per second, TFLOP/s and MFU per process, peak memory."""
        values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach()])
        values = mean_over_processes(values)
        device = self.dec.target_device()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, n = time.perf_counter() - self.t, step - self.t_step
        self.step_ms.append(1000 * dt / n)
        self.tokens_per_step = self.dec.n_positions() * world_size()  # every step's batch has the same shape
        tflops = self.flops * n / dt / 1e12
        self.log({"step": step, **dict(zip([*losses, "total"], values.tolist())), "p": p, "lr": lr,
                  "ms_per_step": self.step_ms[-1], "tokens_per_s": self.tokens_per_step * n / dt,
                  "tflops": tflops, **({"mfu": tflops / self.peak} if self.peak else {}),
                  "peak_mem_gb": peak_memory_gb(device)})

    def log_evaluation(self, step, metrics: dict) -> dict:
        metrics = {"step": step, **metrics}
        self.log(metrics, eval_line=True)
        return metrics

    def log(self, record, eval_line=False):
        if self.rank or (eval_line and record["step"] == self.evaluated):  # an evaluation is logged once
            return
        if eval_line:
            self.evaluated = record["step"]
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if eval_line:  # the headline metrics; all of them are in metrics.jsonl
            record = {k: v for k, v in record.items()
                      if "/" not in k or k.endswith("total") or k.startswith(("recon", "ce/"))}
        tqdm.write(("eval " if eval_line else "") + " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def close(self):
        """The median speed over the logged intervals (the first, with warm-up and compilation, left out) and
        the figures."""
        if self.rank == 0 and len(self.step_ms) > 1:
            ms = sorted(self.step_ms[1:])[len(self.step_ms[1:]) // 2]
            tflops = self.flops / ms / 1e9
            speed = (f"{tflops:.1f} TFLOP/s, MFU {tflops / self.peak:.1%} of {self.peak} TFLOP/s" if self.peak
                     else f"{1000 * tflops:.1f} GFLOP/s per process")
            print(f"median ms/step {ms:.1f} over {len(self.step_ms) - 1} logged intervals (the first, with "
                  f"warm-up and compilation, left out): {self.tokens_per_step / ms * 1000:.0f} tokens/s, "
                  + speed)
        if self.rank == 0:
            save_figures(self.dec, self.truth, self.cfg.out_dir)
        if world_size() > 1:  # every process leaves together: none tears down its process group, or reads
            dist.barrier()    # out_dir, while rank 0 is still writing it


# -----------------------------------------------------------------------------
# Appendix C: before training: compilation, the memory plan, the FLOPs of a step

def compile_hot_paths(dec, adversary):
    """The CI function with both sigmoids, fused (modules untouched: state-dict keys stay the same); on
    CUDA also the reconstruction loss (the logits' fp32 cast, log-softmaxes, KL over [B, T, vocab]) and
    the adversary's Adam step over [B, T, ΣC + M]: a few fused kernels instead of a pass per operation,
    which gains nothing on a CPU."""
    dec.causal_importance = torch.compile(dec.causal_importance)
    if dec.target_device().type == "cuda":
        dec.recon_loss = torch.compile(recon_loss, dynamic=True)
        adversary.update = torch.compile(adversary.update)


def preflight(dec, cfg, get_batch, autocast, truth=None, verbose=True):
    """Before the first step: the memory plan (stops a run that cannot fit), the FLOPs of one step and the
    device's peak (for MFU), and what would otherwise fail only at the first evaluation: a missing
    validation split, or a toy's expected dense block larger than C."""
    if truth is not None:  # a toy's expected CI patterns, scored on the untrained CI: fail now if they cannot
        with torch.compiler.set_stance("force_eager"):
            ci = probe_ci(dec, truth["probes"])
        for path, pattern in truth["patterns"].items():
            if path in dec.comps:
                try:
                    target_ci_error(ci[path], pattern)
                except ValueError as e:
                    raise ValueError(f"{path}: {e}") from None
    if verbose and cfg.dtype == "bfloat16" and dec.target_device().type != "cuda":
        print("dtype bfloat16 means autocast on CUDA; this run on the CPU is float32")
    x = get_batch("train", 0)[0]
    activations, flops = measure_step(dec, cfg, x, autocast)
    check_memory(memory_plan(dec, cfg, x, activations), dec.target_device(), cfg, verbose)
    peak = peak_tflops(cfg, dec.target_device())
    if verbose:
        print(f"one training step: {flops / 1e9:.1f} GFLOP per process"
              + (f"; peak {peak} TFLOP/s" if peak else ""))
    if cfg.eval_interval > 0:
        get_batch("val", 0)
    return flops, peak


def unpadded(get_batch):
    """get_batch, checked: padded positions (attention_mask 0) would count in every loss and metric but the
    CE, and the CI transformer would attend to them, so batches must hold whole sequences (packed text, as
    models.token_batches gives)."""
    def checked(split, step):
        x, y = get_batch(split, step)
        if isinstance(x, dict) and "attention_mask" in x and not bool(x["attention_mask"].all()):
            raise ValueError(f"the {split} batch of step {step} is padded (attention_mask has zeros): vpd.py "
                             "needs whole sequences; pack the text into rows of seq_len tokens instead of "
                             "padding")
        return x, y
    return checked


def first_samples(x, n: int):
    """The first n samples (sequences) of a batch: a tensor, or a dict of keyword inputs [B, ...]."""
    return x[:n] if torch.is_tensor(x) else {k: v[:n] for k, v in x.items()}


def n_samples(x) -> int:
    return len(x) if torch.is_tensor(x) else len(next(iter(x.values())))


def measure_step(dec, cfg, x, autocast=nullcontext()):
    """(activation bytes, FLOPs) of one training step on batch x per process: both measured on the first
    one and two samples and extrapolated linearly (Δ's V U does not grow with the batch), so any target
    and CI function is covered. Eager, so that FlopCounterMode sees every matmul (the losses, the inner
    ascent steps, the backward) and no graph is compiled for these sizes. Bytes: the CUDA allocator's
    peak beyond the weights, the gradients and the adversary's state (counted apart), the backward's
    transients included; 0 on a CPU, which keeps no such statistics."""
    device, measured = dec.target_device(), []
    cuda = device.type == "cuda"
    for samples in (1, 2):
        if cuda:
            for p in dec.parameters():  # as in training, where a step's gradients live until the next one
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        adversary = Adversary()
        with (torch.random.fork_rng([device] if cuda else []), torch.compiler.set_stance("force_eager"),
              FlopCounterMode(display=False) as counter):
            losses, _ = training_losses(dec, first_samples(x, samples), adversary, cfg, cfg.p_start, 0.0,
                                        autocast)
            sum(losses.values()).backward()
        dec.zero_grad(set_to_none=True)
        state = 12 * adversary.sources.numel() if adversary.sources is not None else 0
        measured.append((torch.cuda.max_memory_allocated(device) - base - state if cuda else 0,
                         counter.get_total_flops()))
    (b1, f1), (b2, f2) = measured
    return b1 + (b2 - b1) * (n_samples(x) - 1), f1 + (f2 - f1) * (n_samples(x) - 1)


def memory_plan(dec, cfg, x, activations: int) -> dict:
    """Bytes one process needs for training, by item."""
    trainable = sum(p.numel() for p in dec.parameters() if p.requires_grad)
    positions = next(iter(dec.comps.values())).input[0, ..., 0].numel() * n_samples(x)  # per process
    frozen = sum(p.numel() * p.element_size() for p in dec.target.parameters() if not p.requires_grad)
    sources = positions * (sum(dec.Cs) + len(dec.Cs)) if cfg.adv_coeff else 0
    plan = {"target weights": frozen, "V, U, CI function": 4 * trainable,
            "gradients and AdamW moments": 12 * trainable, "adversary sources and moments": 12 * sources,
            "activations": activations}
    if world_size() > 1:
        plan["gradient all-reduce buffer"] = 4 * trainable  # the flat copy sync_gradients reduces
    plan["total"] = sum(plan.values())
    return plan


def check_memory(plan: dict, device, cfg: Config, verbose=True):
    """Print the plan; stop when it does not fit in 90% of the free memory (the plan can fall a few percent
    short of the peak: RESULTS.md)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the plan's own measurement left blocks in the allocator's cache
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)  # the plan counts it
    elif os.path.exists("/proc/meminfo"):  # Linux: what the OS can give without swapping, page cache included
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    else:
        free = float("inf")  # no portable way to ask: trust the user
    if verbose:
        print("memory plan per process: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in plan.items())
              + f" (free: {free / 2**30:.1f} GiB" + (")" if device.type == "cuda" else
                                                      "; activations not measured)"))
    usable = 0.9 * free
    if cfg.memory_check and plan["total"] > usable:
        fixed = plan["total"] - plan["adversary sources and moments"] - plan["activations"]
        fits = int(cfg.batch_size * (usable - fixed) / max(1, plan["total"] - fixed))
        bf16 = ", or use dtype='bfloat16'" if device.type == "cuda" and cfg.dtype != "bfloat16" else ""
        raise SystemExit(f"this run needs about {plan['total'] / 2**30:.1f} GiB per process, more than 90% "
                         f"of the {free / 2**30:.1f} GiB free: lower batch_size (per process) to about "
                         f"{max(fits, 0)}, spread the batch over more GPUs with torchrun{bf16} "
                         "(--memory_check=False runs anyway)")


# dense peak TFLOP/s (bf16 tensor cores, fp32) of common GPUs by name; the first match counts
PEAK_TFLOPS = [("H100 PCIe", 756, 51), ("H100 NVL", 835, 60), ("H200 NVL", 835, 60), ("H100", 989, 67),
               ("H200", 989, 67), ("A100", 312, 19.5), ("L40S", 362, 91.6), ("L40", 181, 90.5),
               ("L4", 121, 30.3), ("RTX 4090", 165, 82.6), ("RTX 3090", 71, 35.6)]


def peak_tflops(cfg, device) -> float:
    """The peak that MFU divides by: cfg.peak_tflops, else the GPU's from PEAK_TFLOPS in the run's precision;
    0 when unknown (CPUs), and the log then shows only the achieved TFLOP/s."""
    if cfg.peak_tflops or device.type != "cuda":
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((bf16 if cfg.dtype == "bfloat16" else fp32 for key, bf16, fp32 in PEAK_TFLOPS if key in name),
                0.0)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# -----------------------------------------------------------------------------
# Appendix D: figures, written to out_dir at the end of a run

def save_figures(dec, truth, out_dir):
    """Toys: CI on one-hot probes per matrix, and (TMS) the target's feature vectors beside the best
    subcomponents'. Every run: losses and L0 over training, CI density per matrix, alive counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if truth is not None:
        ci = probe_ci(dec, truth["probes"])
        fig, axes = plt.subplots(1, len(ci), figsize=(4.5 * len(ci), 3.5), squeeze=False)
        for ax, (n, g) in zip(axes[0], ci.items()):
            fire = (g.max(0).values > 0).nonzero()[:, 0]  # columns that never fire are left out
            im = ax.imshow(g[:, fire], vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
            step = max(1, len(fire) // 12)  # at most ~12 labels, each the subcomponent's own index
            ax.set(title=f"{n}: CI on one-hot probes", xlabel=f"subcomponent ({len(fire)} that fire)",
                   ylabel="feature", xticks=range(0, len(fire), step), xticklabels=fire[::step].tolist(),
                   yticks=range(len(g)))
        fig.colorbar(im, ax=axes[0].tolist(), label="CI")
        fig.savefig(os.path.join(out_dir, "ci_probes.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    if truth is not None and "features" in truth and truth["features"][0] in dec.comps:
        path, W = truth["features"]
        _, _, best = toy_feature_metrics(W, dec.comps[path])
        comp, lim = dec.comps[path], W.abs().max().item()
        found = (comp.V[torch.arange(len(best)), best][:, None] * comp.U[best]).detach().cpu()  # [n, d_out]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, vecs, title in ((axes[0], W.T.cpu(), "target W columns"),
                                (axes[1], found, "best subcomponents")):
            if vecs.shape[1] == 2:
                for j, v in enumerate(vecs):
                    ax.arrow(0, 0, v[0], v[1], color=f"C{j % 10}", width=0.01, length_includes_head=True)
                ax.set(xlim=(-1.1 * lim, 1.1 * lim), ylim=(-1.1 * lim, 1.1 * lim), aspect="equal")
            else:
                ax.imshow(vecs.T, cmap="RdBu", vmin=-lim, vmax=lim)
                ax.set(xlabel="feature", ylabel="hidden dim")
            ax.set_title(f"{path}: {title}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "features.png"), dpi=120)
        plt.close(fig)
    path = os.path.join(out_dir, "metrics.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    logs, evals = [r for r in records if "total" in r], [r for r in records if "l0/total" in r]
    if not logs:
        return
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.6))
    for key in ("stoch", "adv", "faith"):  # a resumed run may have switched a term on or off
        if any(key in r for r in logs):
            axes[0].plot(*zip(*[(r["step"], r[key]) for r in logs if key in r]), label=f"L_{key}")
    axes[0].set(yscale="log", xlabel="step", title="losses")
    axes[0].legend()
    groups = sorted({k for r in evals for k in r if k.startswith("l0_layer/")}) or ["l0/total"]
    for key in groups:
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key.split("/")[-1])
    axes[1].set(xlabel="step", title="L0 per position (evaluation)")
    axes[1].legend(fontsize=7)
    if evals:
        n = list(dec.comps)
        axes[2].barh(n, [evals[-1][f"l0/{m}"] for m in n])
        axes[2].set(title="L0 per matrix (last evaluation)")
        axes[3].barh(n, [evals[-1][f"alive/{m}"] for m in n], label="alive")
        axes[3].barh(n, dec.Cs, fill=False, label="C")
        axes[3].set(title="alive subcomponents of C")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "training.png"), dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Appendix E: configurator and entry point: python vpd.py [config.py] [--key=value ...]

def configure(argv: list, *configs):
    """nanoGPT-style configuration onto dataclass instances: config files (plain Python that sets
    variables), then the --key=value overrides wherever they stand, parsed as Python literals or else
    taken as strings. Unknown keys and values of the wrong type are errors."""
    fields = {f.name: (cfg, f.type, f.default) for cfg in configs for f in dataclasses.fields(cfg)}

    def assign(key, value, where):
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            raise SystemExit(f"unknown config key {key!r} in {where}"
                             + (f"; did you mean {near[0]!r}?" if near else ""))
        cfg, kind, default = fields[key]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind and not (value is None and default is None):  # None: where the default is
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise SystemExit(f"config key {key!r} in {where} takes {article} {kind.__name__}, "
                             f"got {value!r} ({type(value).__name__})")
        setattr(cfg, key, value)

    for arg in sorted(argv, key=lambda a: a.startswith("--")):  # stable: files first, each group in order
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError):
                value = text  # a bare string such as --out_dir=out/x
            if key in fields and fields[key][1] is str and not isinstance(value, str):
                value = text  # a string key keeps its text: --out_dir=2024
            assign(key, value, "the command line")
        else:
            if not os.path.exists(arg):
                raise SystemExit(f"config file {arg!r} does not exist")
            namespace = {"__file__": arg}  # a config may exec() another one next to it
            exec(compile(open(arg).read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    assign(key, value, arg)
    return configs


def main(argv):
    if argv[:1] == ["import"]:  # python vpd.py import <Goodfire run, a directory or wandb:...> <out_dir>
        run, out_dir, *rest = argv[1:] + [None] * (2 - len(argv[1:]))
        if out_dir is None or any(not a.startswith("--n_heads=") for a in rest):
            raise SystemExit("usage: python vpd.py import <Goodfire run directory or "
                             "wandb:entity/project/runs/id> <out_dir> [--n_heads=N]")
        t0 = time.perf_counter()
        path = import_goodfire(run, out_dir, *[int(a.partition("=")[2]) for a in rest])
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s "
              f"(peak memory {peak_memory_gb(torch.device('cpu')):.1f} GiB)")
        return
    # the masks, logits and their gradients differ in size between the losses: segments that grow in place
    # instead of cached blocks of fixed sizes leave less memory stranded (set before CUDA starts)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if all(arg.startswith("--") for arg in argv):
        default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tms_5_2.py")
        print(f"no config file given: using {os.path.relpath(default)}")
        argv = [default, *argv]
    cfg, tcfg = configure(argv, Config(), models.TargetConfig())
    check_config(cfg)  # and the module patterns once the target is built: before a missing one is trained
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.device == "cuda" and dist.is_initialized():
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    if cfg.compile is None:
        cfg.compile = cfg.device.startswith("cuda")
    target, get_batch, truth = models.build(tcfg, cfg, check=lambda model: find_matrices(model, cfg.modules))
    run_config = {**dataclasses.asdict(cfg), **dataclasses.asdict(tcfg)}  # after build: hf: sets vocab_size
    if rank == 0:
        print(json.dumps(run_config, indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=1)
    metrics = train(cfg, target, get_batch, truth, run_config)
    if rank == 0:
        print("final: " + json.dumps({k: round(v, 5) if isinstance(v, float) else v
                                      for k, v in metrics.items()}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
