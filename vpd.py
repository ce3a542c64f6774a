"""
vpd.py: adversarial Parameter Decomposition (VPD) in one file.

Every decomposed weight matrix W [d_out, d_in] of a frozen target network is rewritten as C rank-1
subcomponents plus a remainder, W = (V U)^T + Δ. A learned causal-importance (CI) function says, at
every input position, which subcomponents the target needs there. Training keeps the model faithful
when the unneeded ones are ablated, at random (stochastic loss) or by an adversary (adversarial loss),
while needing as few as possible (importance minimality).

Sections follow the method (shared/METHOD.md): config, §1-2 components and the masked forward,
§3 causal importance, §4 losses and the adversary, §6 metrics, §5 training, then the entry point.

    python vpd.py                                   # TMS 5-2: trains the toy target, then decomposes it
    python vpd.py configs/resid_mlp1.py --steps=5000
    python vpd.py configs/tms_5_2.py --init_from=resume
    python vpd.py configs/fortunes.py               # a small language model, offline on a CPU
    torchrun --standalone --nproc_per_node=8 vpd.py configs/pile4l.py   # the paper's Pile-4L run
"""
import ast
import dataclasses
import difflib
import fnmatch
import json
import math
import os
import re
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm


# -----------------------------------------------------------------------------
# Config: every knob of a decomposition. configs/*.py and --key=value override the defaults.

@dataclass
class Config:
    # run
    out_dir: str = "out/run"
    init_from: str = "scratch"       # "resume": continue from out_dir/ckpt.pt
    seed: int = 0
    device: str = "auto"             # "auto": cuda when available, else cpu
    dtype: str = "float32"           # "bfloat16": autocast on CUDA (Δ and L_faith stay fp32)
    compile: bool = None             # torch.compile the hot paths; None: on for CUDA, off on CPU
    memory_check: bool = True        # stop before training when the memory plan exceeds free memory
    peak_tflops: float = 0.0         # the device's peak, for the MFU in the log; 0: the GPU's from PEAK_TFLOPS
    # §1 what to decompose: module-path pattern -> number of subcomponents C
    modules: dict = field(default_factory=lambda: {"linear1": 20, "linear2": 20})
    tie: dict = field(default_factory=dict)  # {"linear2": "linear1"}: for a target with W2 = W1^T, V2 = U1^T, U2 = V1^T
    # §3 causal importance function
    ci_fn: str = "mlp"               # "mlp": one tiny MLP per subcomponent; "transformer": global shared
    ci_hidden: int = 16              # mlp: hidden width
    ci_d_model: int = 2048           # transformer sizes (Pile-4L recipe)
    ci_n_blocks: int = 8
    ci_n_heads: int = 16
    ci_d_mlp: int = 8192
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


# the keys that take one of a few words, and those words
CHOICES = {"init_from": ("scratch", "resume"), "dtype": ("float32", "bfloat16"), "ci_fn": ("mlp", "transformer"),
           "recon_loss": ("mse", "kl"), "routing": ("all", "uniform_k_subset", "layerwise"),
           "adv_routing": ("all", "uniform_k_subset")}


def check_choices(cfg: Config):
    for key, options in CHOICES.items():
        if getattr(cfg, key) not in options:
            raise ValueError(f"{key} must be one of {options}, got {getattr(cfg, key)!r}")


# -----------------------------------------------------------------------------
# §1-2 Components and the masked forward

def is_conv1d(module) -> bool:
    """transformers' Conv1D (GPT-2's projections): an nn.Linear whose weight is stored transposed,
    [d_in, d_out]. Known by its name, so that vpd.py needs no transformers."""
    return type(module).__name__ == "Conv1D" and module.weight.shape == (module.nx, module.nf)


class Components(nn.Module):
    """A target nn.Linear or Conv1D (weight W [d_out, d_in], frozen) rewritten as C rank-1 subcomponents
    and a remainder: W = (V U)^T + Δ. Subcomponent c's weight is (V[:, c] ⊗ U[c, :])^T."""

    def __init__(self, linear: nn.Module, C: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the target's own tensors (state-dict keys kept)
        self.transposed = is_conv1d(linear)
        d_out, d_in = self.W.shape
        device = self.weight.device
        self.V = nn.Parameter(torch.randn(d_in, C, device=device) / math.sqrt(d_in))  # read directions
        self.U = nn.Parameter(torch.randn(C, d_out, device=device) / math.sqrt(C))    # write directions
        self.mask = None   # None: the target's weight; else (m [..., C], δ [...])
        self.input = None  # input of the last forward through the target's weight: what CI reads
        self.cast = None   # (V, U, W) in autocast's dtype, made once per training step (Decomposition.cast_once)

    @property
    def W(self):  # [d_out, d_in], the nn.Linear convention for either kind of module (a view, no copy)
        return self.weight.T if self.transposed else self.weight

    def delta(self):  # [d_out, d_in], in fp32: what the faithfulness loss drives to zero
        return self.W.float() - (self.V @ self.U).T

    def forward(self, x):  # x [..., d_in]
        V, U, W = self.cast or (self.V, self.U, self.W)
        if self.mask is None:
            self.input = x
            return F.linear(x, W, self.bias)
        # Σ_c m_c (x·V_c) U_c + δ Δx, with Δx = Wx - (V U)^T x written out: Δ is never built here, and
        # m = δ = 1 gives Wx exactly (that is how unrouted positions get the target's own output)
        m, d = self.mask
        d = d.unsqueeze(-1)                                                                  # [..., 1]
        out = torch.addcmul(((x @ V) * (m - d)) @ U, d, F.linear(x, W))
        return out if self.bias is None else out + self.bias


def install_components(model: nn.Module, modules: dict) -> dict:
    """Freeze `model` (no gradients; eval mode, so no dropout) and replace each nn.Linear or Conv1D matched
    by a pattern of `modules` ({"h.*.mlp.c_fc": 3072}) with Components. A fused matrix (GPT-2's c_attn,
    GPT-NeoX's query_key_value) is one matrix: decomposed whole. Returns {path: Components} in sorted path
    order, the order used everywhere."""
    model.requires_grad_(False).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    comps = {}
    for pattern, C in modules.items():
        matched = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            near = difflib.get_close_matches(pattern, list(linears), n=3, cutoff=0.3)
            raise ValueError(f"module pattern {pattern!r} matches no nn.Linear or Conv1D of the target; "
                             f"closest such paths: {near or sorted(linears)[:5]}")
        for path in matched:
            if path in comps:
                raise ValueError(f"module {path!r} is matched by two patterns of `modules`")
            comps[path] = Components(linears[path], C)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, comps[path])
    return dict(sorted(comps.items()))


def uniform_k_subset(pos_shape, M: int, device) -> torch.Tensor:
    """VPD routing: per position draw k ~ U{1..M}, then a uniformly random k-subset of the M matrices.
    A given matrix is routed with probability E[k]/M = (M + 1) / 2M. Returns bool [*pos_shape, M]."""
    k = torch.randint(1, M + 1, pos_shape, device=device)
    rank = torch.rand(*pos_shape, M, device=device).argsort(-1).argsort(-1)  # a random permutation
    return rank < k.unsqueeze(-1)


class Masks(torch.autograd.Function):
    """Every matrix's mask m = g + (1 - g) s [..., C] and the δ channels [..., M], from CI values g [..., ΣC]
    and a source s [..., ΣC + M] (see Decomposition.masks). The same as splitting lerp(s, 1, g), but the
    backward writes each input's gradient in one pass: autograd's own concatenated the matrices' gradients
    and spent five more passes over [..., ΣC] in lerp's backward (a masked pass's masks, forward and
    backward, took 34-58 ms on a CPU thread at bench_cpu's size; 24-30 ms this way)."""

    @staticmethod
    def forward(ctx, g, source, Cs: list):
        ctx.save_for_backward(g, source)
        ctx.Cs, one = Cs, g.new_ones(())
        s = source.split([*Cs, len(Cs)], -1)
        return s[-1].contiguous(), *(torch.lerp(s_i, one, g_i) for s_i, g_i in zip(s, g.split(Cs, -1)))

    @staticmethod
    def backward(ctx, grad_d, *grad_m):
        g, source = ctx.saved_tensors
        sizes, n = [*ctx.Cs, len(ctx.Cs)], g.shape[-1]
        shape = torch.broadcast_shapes(g.shape[:-1], source.shape[:-1])  # a source may be shared by all positions
        grad_g = g.new_empty(*shape, n) if ctx.needs_input_grad[0] else None
        grad_s = source.new_empty(*shape, source.shape[-1]) if ctx.needs_input_grad[1] else None
        none = [None] * len(ctx.Cs)
        for gm, g_i, s_i, out_g, out_s in zip(grad_m, g.split(ctx.Cs, -1), source.split(sizes, -1),
                                              none if grad_g is None else grad_g.split(ctx.Cs, -1),
                                              none if grad_s is None else grad_s.split(sizes, -1)):
            if out_g is not None:  # ∂m/∂g = 1 - s, ∂m/∂s = 1 - g, computed as lerp's backward does (the same
                torch.mul(gm, 1 - s_i, out=out_g)  # bits), straight into their columns: no concatenation
            if out_s is not None:
                torch.mul(gm, 1 - g_i, out=out_s)
        if grad_s is not None:  # δ has the source's own shape: its gradient is not summed over positions
            grad_s[..., n:] = 0
            grad_s = grad_s.sum_to_size(source.shape)
            grad_s[..., n:] = grad_d
        return None if grad_g is None else grad_g.sum_to_size(g.shape), grad_s, None


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
        # the regions as float arithmetic, sign(z)⁺ = 1[z > 0]: boolean masks are slow on a CPU, in eager
        # code and in compiled code alike (TMS 5-2 at batch 4096: compiled CI forward 3.8 ms with them, 2.0 without)
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


def rope(x, base=10000.0):
    """Rotary position embedding over the whole head, half-split pairs (i, i + D/2). x [B, H, T, D]."""
    T, D = x.shape[-2:]
    freqs = base ** (-torch.arange(D // 2, device=x.device, dtype=torch.float32) / (D // 2))
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).type_as(x)


class Block(nn.Module):
    """Pre-norm transformer block with RoPE attention and a GELU MLP. causal=False sees all positions."""

    def __init__(self, d: int, n_heads: int, d_mlp: int, causal: bool = False):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp, bias=False), nn.GELU(), nn.Linear(d_mlp, d, bias=False))

    def forward(self, x):  # [B, T, d]
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=self.causal)  # [B, H, T, D]
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.norm2(x))


class CITransformer(nn.Module):
    """VPD's CI function: RMS-normalise each decomposed matrix's input (no learned scale), concatenate
    them in sorted module order, and let a bidirectional transformer map them to ΣC scores per position."""

    def __init__(self, d_ins: dict, Cs: dict, d_model: int, n_blocks: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.d_ins = d_ins
        self.proj_in = nn.Linear(sum(d_ins.values()), d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp) for _ in range(n_blocks))
        self.norm = nn.RMSNorm(d_model)
        self.proj_out = nn.Linear(d_model, sum(Cs.values()))

    def forward(self, inputs: dict, comps: dict = None) -> dict:
        x = torch.cat([F.rms_norm(inputs[n], (d,)) for n, d in self.d_ins.items()], -1)  # [B, T, Σd_in]
        flat = x.dim() == 2  # toy inputs [B, d]: one position per sample
        # the residual stream in fp32: under bf16 autocast the matmuls still run in bf16, and RMSNorm
        # (fp32 weight) keeps its fused kernel, which refuses a bf16 input
        x = self.proj_in(x[:, None] if flat else x).float()                              # [B, T, d_model]
        for block in self.blocks:
            x = block(x)
        z = self.proj_out(self.norm(x)).float()                                          # [B, T, ΣC]
        return z[:, 0] if flat else z


class Decomposition(nn.Module):
    """A frozen target with components on the matched nn.Linear (or Conv1D) modules, and the CI function.
    `dec(x)` runs the target (caching each matrix's input); `dec.masked(x, masks)` runs it with
    masks {path: (m [..., C], δ [...])}; matrices absent from `masks` use their original weight."""

    def __init__(self, target: nn.Module, cfg: Config):
        super().__init__()
        check_choices(cfg)
        self.target = target
        self.comps = install_components(target, cfg.modules)
        Cs = {n: c.V.shape[1] for n, c in self.comps.items()}
        if cfg.ci_fn == "mlp":
            self.ci_fn = SubcomponentMLPs(Cs, cfg.ci_hidden)
        else:
            d_ins = {n: c.V.shape[0] for n, c in self.comps.items()}
            self.ci_fn = CITransformer(d_ins, Cs, cfg.ci_d_model, cfg.ci_n_blocks, cfg.ci_n_heads, cfg.ci_d_mlp)
        self.ci_fn.to(self.target_device())
        self.Cs = list(Cs.values())
        self.tie = cfg.tie
        self.recon = recon_loss  # compiled on CUDA (see train)
        for b, a in self.tie.items():
            if a not in self.comps or b not in self.comps:
                raise ValueError(f"tie {b!r} -> {a!r}: both must be decomposed matrices, i.e. in {list(self.comps)}")
            if not torch.equal(self.comps[b].W, self.comps[a].W.T) or Cs[a] != Cs[b]:
                raise ValueError(f"tie {b!r} -> {a!r} needs {b}'s weight to be {a}'s transposed, with the same C")
        self.tie_weights()
        # which matrix each source channel belongs to (routing is per matrix): ΣC mask channels, then M δ channels
        M = len(Cs)
        self.matrix_of = torch.cat([torch.arange(M).repeat_interleave(torch.tensor(self.Cs)),
                                    torch.arange(M)]).to(self.target_device())

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
        """The target's output on x, a tensor or a dict of keyword inputs (input_ids, attention_mask). Of a
        model that returns a tuple, its first element; of a Hugging Face ModelOutput, its .logits."""
        out = self.target(**x) if isinstance(x, dict) else self.target(x)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, tuple) else out

    def n_positions(self) -> int:
        """Positions (tokens, or toy samples) in the last target forward."""
        return next(iter(self.comps.values())).input[..., 0].numel()

    def split(self, t) -> dict:
        """[..., ΣC], every matrix's subcomponents side by side in sorted path order -> {path: [..., C]}."""
        return dict(zip(self.comps, t.split(self.Cs, -1)))

    def causal_importance(self):
        """CI from the inputs cached by the last target forward, [..., ΣC]: lower-leaky (for masks) and
        upper-leaky (for the minimality loss)."""
        z = self.ci_fn({n: c.input for n, c in self.comps.items()}, self.comps)
        return LowerLeakyHardSigmoid.apply(z), upper_leaky_hard_sigmoid(z)

    def masks(self, ci, source, routed=None) -> dict:
        """The masks {path: (m [..., C], δ [...])} that CI values ci [..., ΣC] leave to a source [..., ΣC + M]
        in [0, 1] (random for the stochastic loss, chosen by the adversary for the adversarial one):
        m = g + (1 - g) s on the first ΣC channels; the last M channels are the matrices' δ. Where
        routed [..., M] is False a matrix gets source 1, so m = 1 and δ = 1: W itself (W = (V U)^T + Δ).
        Routed and unrouted positions thus share one computation instead of computing both outputs."""
        if routed is not None:  # index_select: 2x faster than indexing with [..., matrix_of] on a CPU
            source = torch.where(routed.index_select(-1, self.matrix_of), source, 1.0)
        d, *m = Masks.apply(ci, source, self.Cs)
        return {n: (m_n, d[..., i]) for i, (n, m_n) in enumerate(zip(self.comps, m))}

    @contextmanager
    def cast_once(self, autocast):
        """Under autocast (bf16 on CUDA) the matrices' V, U and W in its dtype once for all the passes of a
        training step, instead of in every pass: autocast casts the frozen W at every use and V, U once per
        autocast region, and the step has several (its backward must run outside them). Autograd flows
        through the one cast of each V and U. Without autocast nothing changes."""
        kind = self.target_device().type
        with autocast:
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        for c in self.comps.values():
            c.cast = (c.V.to(dtype), c.U.to(dtype), c.W.to(dtype)) if dtype else None
        try:
            yield
        finally:
            for c in self.comps.values():
                c.cast = None

    def deltas(self):
        with torch.autocast(self.target_device().type, enabled=False):  # Δ ≈ 0 needs fp32
            return {n: c.delta() for n, c in self.comps.items()}

    def masked(self, x, masks: dict):
        for n, c in self.comps.items():
            c.mask = masks.get(n)
        try:
            return self(x)
        finally:
            for c in self.comps.values():
                c.mask = None


# -----------------------------------------------------------------------------
# §4 Losses and the adversary

def faithfulness_loss(deltas: dict):
    """L_faith = Σ_l ||Δ_l||² / Σ_l numel(Δ_l)."""
    return sum(d.pow(2).sum() for d in deltas.values()) / sum(d.numel() for d in deltas.values())


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


def importance_minimality_loss(ci_upper, p: float, beta: float, eps: float = 1e-12):
    """ci_upper [..., ΣC]: every subcomponent of every matrix side by side. Per subcomponent,
    s_c = Σ_positions (g + ε)^p and mean_c = s_c / #positions; L_imp = Σ_c mean_c (1 + β log2(1 + s_c)).
    The β term penalises subcomponents that fire often, which splits subcomponents serving unrelated
    inputs. Under data parallelism s_c inside the log is the global sum over processes, and averaging
    the processes' gradients gives the exact gradient."""
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
    if cfg.routing == "all":
        return dec.recon(dec.masked(x, dec.masks(ci, u)), target_out, cfg.recon_loss)
    if cfg.routing == "uniform_k_subset":
        masks = dec.masks(ci, u, uniform_k_subset(ci.shape[:-1], M, ci.device))
        return dec.recon(dec.masked(x, masks), target_out, cfg.recon_loss)
    masks = dec.masks(ci, u)  # "layerwise"
    every = dec.recon(dec.masked(x, masks), target_out, cfg.recon_loss)
    each = [dec.recon(dec.masked(x, {n: masks[n]}), target_out, cfg.recon_loss) for n in masks]
    return every + sum(each) / len(each)


class Adversary:
    """Persistent PGD: a source [*positions, ΣC + M] in [0, 1] (see Decomposition.masks), kept across
    training steps and moved by projected Adam *ascent* on the reconstruction loss. All matrices share
    one tensor, so an ascent step is a handful of in-place operations however many matrices (on CUDA
    one compiled kernel: see train)."""

    def __init__(self, betas=(0.5, 0.99), eps=1e-8):
        self.betas, self.eps = betas, eps
        self.sources, self.m, self.v, self.t = None, None, None, 0

    def leaves(self, shape, device):
        """The sources as a fresh leaf tensor that collects gradients, initialised U(0, 1) on first use or
        when a resumed run's batch has another shape."""
        if self.sources is None or self.sources.shape != shape:
            if self.sources is not None:
                print(f"adversary: saved sources {tuple(self.sources.shape)} do not fit batch {tuple(shape)}; "
                      "starting afresh")
            self.sources = torch.rand(shape, device=device)
            self.m, self.v, self.t = torch.zeros_like(self.sources), torch.zeros_like(self.sources), 0
        return self.sources.detach().requires_grad_()

    @torch.no_grad()
    def ascend(self, grad, lr: float):
        self.t += 1
        b1, b2 = self.betas
        # the step size and bias correction as tensors, so that compiled code takes each step's values (made by
        # torch.full on the device: torch.tensor would copy from the host and wait for the GPU)
        scalars = [torch.full((), x, device=grad.device) for x in (lr / (1 - b1 ** self.t), math.sqrt(1 - b2 ** self.t))]
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
    return dec.recon(dec.masked(x, dec.masks(ci, sources, routed)), target_out, cfg.recon_loss)


def eval_adversary(dec, x, target_out, ci, cfg, milestones, step_size=0.1):
    """The evaluation adversary: one source [1, ..., 1, ΣC + M] shared by the whole batch and all
    positions (it must find systematic failures, not exploit noise), sign-gradient ascent.
    Returns {n_steps: loss after n_steps} for each milestone."""
    ci = ci.detach()
    sources = torch.rand(*[1] * (ci.dim() - 1), ci.shape[-1] + len(dec.comps), device=ci.device)
    found = {}
    for i in range(max(milestones) + 1):
        sources.requires_grad_()
        loss = dec.recon(dec.masked(x, dec.masks(ci, sources)), target_out, cfg.recon_loss)
        if i in milestones:
            found[i] = loss.item()
        if i == max(milestones):
            break
        (grad,) = torch.autograd.grad(loss, [sources])
        with torch.no_grad():  # the sign of the gradient summed over all processes: one shared source
            sources = (sources + step_size * global_sum(grad).sign()).clamp(0, 1)
    return found


# -----------------------------------------------------------------------------
# §6 Metrics

def toy_feature_metrics(W, comp: Components):
    """MMCS and ML2R of a toy target matrix W [d_out, n_features] against its subcomponents: for each
    feature j, the best subcomponent's column U[c, :] V[j, c] by cosine similarity, and its norm ratio."""
    cols = comp.V[:, :, None] * comp.U[None]                             # [n_features, C, d_out]
    feats = W.T[:, None, :]                                               # [n_features, 1, d_out]
    cos = F.cosine_similarity(cols, feats, dim=-1)                        # [n_features, C]
    best = cos.argmax(1)
    ratio = cols[torch.arange(len(best)), best].norm(dim=-1) / feats[:, 0].norm(dim=-1)
    return cos.max(1).values.mean().item(), ratio.mean().item(), best


def target_ci_error(ci, pattern, tol=0.1):
    """Entries of a CI matrix on one-hot probes (ci [n_features, C]) that miss the expected pattern by
    more than tol. ("identity", n): one subcomponent per feature, matched by linear assignment.
    ("dense", k): the same k subcomponents on for every feature, all others off (METHOD.md §6).
    ("dense_count", k): Goodfire's looser reading of "dense" (their DenseCIPattern): the k columns of most
    CI mass (ties: the first) must each be on for at least one probe, the others never above tol: one error
    per such column never on, and per entry above tol in the other columns. It checks how many
    subcomponents a matrix uses, not whether they fire together."""
    kind, k = pattern
    if kind in ("dense", "dense_count") and k > ci.shape[1]:
        raise ValueError(f"a dense pattern of {k} subcomponents needs C >= {k}, got C = {ci.shape[1]}")
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


def eval_masks(dec, ci, threshold) -> dict:
    """The six kinds of masks of METHOD.md §6; δ = 0 except for the stochastic ones."""
    none = torch.zeros(*ci.shape[:-1], ci.shape[-1] + len(dec.comps), device=ci.device)  # m = the CI given, δ = 0
    return {"ci": dec.masks(ci, none), "ones": dec.masks(torch.ones_like(ci), none),
            "stoch": dec.masks(ci, torch.rand_like(none)), "random": dec.masks(torch.rand_like(ci), none),
            "rounded": dec.masks((ci > threshold).float(), none), "zero": dec.masks(torch.zeros_like(ci), none)}


def evaluate_batch(dec, x, y, cfg):
    """Metrics of one batch: reconstruction (and CE for language models) under each kind of mask,
    hidden-activation MSE, the evaluation adversary, L0. Also returns the batch's CI [..., ΣC]."""
    with torch.no_grad():
        target_out = dec(x)
        target_hidden = {n: F.linear(c.input, c.W, c.bias) for n, c in dec.comps.items()}
        ci, _ = dec.causal_importance()
    metrics = {"ce/target": lm_ce(target_out, y)} if y is not None else {}
    hidden = {}  # each decomposed matrix's output in the last masked forward
    hooks = [c.register_forward_hook(lambda mod, inp, out, n=n: hidden.__setitem__(n, out))
             for n, c in dec.comps.items()]
    try:
        for kind, masks in eval_masks(dec, ci, cfg.ci_threshold).items():
            with torch.no_grad():
                out = dec.masked(x, masks)
            metrics[f"recon/{kind}"] = recon_loss(out, target_out, cfg.recon_loss).item()
            if y is not None:
                metrics[f"ce/{kind}"] = lm_ce(out, y)
            if kind in ("ci", "stoch"):
                for n in hidden:
                    metrics[f"hidden_mse/{kind}/{n}"] = F.mse_loss(hidden[n].float(), target_hidden[n].float()).item()
    finally:
        for h in hooks:
            h.remove()
    for steps, loss in eval_adversary(dec, x, target_out, ci, cfg, cfg.eval_adv_steps).items():
        metrics[f"recon/adv{steps}"] = loss
    for n, g in dec.split(ci).items():
        metrics[f"l0/{n}"] = (g > cfg.ci_threshold).sum(-1).float().mean().item()
    return metrics, ci


def evaluate(dec, get_batch, cfg, truth=None, autocast=nullcontext()) -> dict:
    """The metrics of METHOD.md §6 averaged over `cfg.eval_batches` validation batches, with L0 per
    matrix, layer and in total, alive subcomponents, CE unrecovered (language models), and for toys
    MMCS / ML2R and the target-CI error."""
    devices = [dec.target_device()] if dec.target_device().type == "cuda" else []
    metrics, ci_mass, n_pos = {}, 0, 0
    with torch.random.fork_rng(devices):  # evaluation must not move the training RNG (resume equality)
        torch.manual_seed(cfg.seed + 1)
        for i in range(cfg.eval_batches):
            x, y = get_batch("val", i)
            with autocast, dec.cast_once(autocast):  # training's precision, so that evaluation sees training's CI
                batch, ci = evaluate_batch(dec, x, y, cfg)
            for k, v in batch.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.eval_batches
            ci_mass, n_pos = ci_mass + ci.float().reshape(-1, ci.shape[-1]).sum(0), n_pos + ci[..., 0].numel()
    keys = sorted(metrics)  # each process evaluated its own shard of the validation data: average them
    metrics = dict(zip(keys, mean_over_processes(
        torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=dec.target_device())).tolist()))
    metrics["l0/total"] = sum(metrics[f"l0/{n}"] for n in dec.comps)
    for n in dec.comps:  # per layer: paths such as h.3.attn.q_proj belong to layer h.3
        layer = re.match(r"(.*?\.\d+)\.", n)
        if layer:
            metrics[f"l0_layer/{layer[1]}"] = metrics.get(f"l0_layer/{layer[1]}", 0.0) + metrics[f"l0/{n}"]
    if "ce/target" in metrics:
        for kind in ("ci", "ones", "stoch", "random", "rounded", "zero"):  # share of the zero-ablation CE gap left
            metrics[f"ce_unrecovered/{kind}"] = ((metrics[f"ce/{kind}"] - metrics["ce/target"])
                                                 / (metrics["ce/zero"] - metrics["ce/target"]))
    mean_ci = global_sum(ci_mass) / (n_pos * world_size())
    for n, mean in dec.split(mean_ci).items():
        metrics[f"alive/{n}"] = int((mean > cfg.alive_threshold).sum())
    metrics["alive/total"] = sum(metrics[f"alive/{n}"] for n in dec.comps)
    if truth is not None:  # toy models: the decomposition that should come out is known
        if "features" in truth:
            path, W = truth["features"]
            metrics["mmcs"], metrics["ml2r"], _ = toy_feature_metrics(W, dec.comps[path])
        ci = probe_ci(dec, truth["probes"])
        for n, pattern in truth["patterns"].items():
            metrics[f"ci_error/{n}"] = target_ci_error(ci[n], pattern)
            if pattern[0] == "dense":  # also by Goodfire's count-only reading, to compare with their numbers
                metrics[f"ci_error_count/{n}"] = target_ci_error(ci[n], ("dense_count", pattern[1]))
        metrics["ci_error/total"] = sum(metrics[f"ci_error/{n}"] for n in truth["patterns"])
    return metrics


def lm_ce(logits, y):  # labels -1: no next token known
    return F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), ignore_index=-1).item()


def save_figures(dec, truth, out_dir):
    """The CI matrix on one-hot probes, and for TMS the target's feature vectors beside the best
    matching subcomponents' vectors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ci = probe_ci(dec, truth["probes"])
    fig, axes = plt.subplots(1, len(ci), figsize=(4 * len(ci), 3.5), squeeze=False)
    for ax, (n, g) in zip(axes[0], ci.items()):
        alive = g.max(0).values > 0  # columns that never fire are left out
        ax.imshow(g[:, alive], vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set(title=f"{n}: CI on one-hot probes", xlabel=f"subcomponent ({int(alive.sum())} that fire)",
               ylabel="feature")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ci_probes.png"), dpi=120)
    plt.close(fig)
    if "features" in truth:
        path, W = truth["features"]
        _, _, best = toy_feature_metrics(W, dec.comps[path])
        comp = dec.comps[path]
        found = (comp.V[torch.arange(len(best)), best][:, None] * comp.U[best]).detach().cpu()  # [n, d_out]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, vecs, title in ((axes[0], W.T.cpu(), "target W columns"), (axes[1], found, "best subcomponents")):
            if vecs.shape[1] == 2:
                for j, v in enumerate(vecs):
                    ax.arrow(0, 0, v[0], v[1], color=f"C{j % 10}", width=0.01, length_includes_head=True)
                lim = 1.1 * W.abs().max().item()
                ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
            else:
                ax.imshow(vecs.T, cmap="RdBu", vmin=-W.abs().max().item(), vmax=W.abs().max().item())
                ax.set(xlabel="feature", ylabel="hidden dim")
            ax.set_title(f"{path}: {title}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "features.png"), dpi=120)
        plt.close(fig)


# -----------------------------------------------------------------------------
# §5 Training

def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay from lr to lr * lr_final."""
    warmup = int(cfg.lr_warmup * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: str, ckpt: dict):
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, keys=("config", "step", "components", "target", "ci_fn", "optimizer", "adversary",
                                     "rng")) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from='resume' but there is no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt "
                           "or not a vpd.py checkpoint") from e
    missing = set(keys) - set(ckpt)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {sorted(missing)}; it is not a vpd.py checkpoint")
    return ckpt


def load_decomposition_state(dec, ckpt: dict):
    """The target, V, U and the CI function of a checkpoint, into a Decomposition built with its config."""
    state = dict(ckpt["target"])
    for n, comp in ckpt["components"].items():
        state[f"{n}.V"], state[f"{n}.U"] = comp["V"], comp["U"]
    dec.target.load_state_dict(state)
    dec.ci_fn.load_state_dict(ckpt["ci_fn"])


def training_losses(dec, x, adversary, cfg, p, adv_lr, autocast=nullcontext()):
    """Steps 1-4 of a VPD training step (METHOD.md §5) on a batch x. Returns the loss terms and the
    adversary's sources of this step (leaves whose .grad the main backward fills, for step 8)."""
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
        losses = {"faith": faithfulness_loss(dec.deltas()), "imp": importance_minimality_loss(ci_upper, p, cfg.beta)}
        with autocast:
            if cfg.stoch_coeff:
                losses["stoch"] = stochastic_recon_loss(dec, x, target_out, ci_lower, cfg)
            if cfg.adv_coeff:
                losses["adv"] = adversarial_recon_loss(dec, x, target_out, ci_lower, sources, cfg)
    return losses, sources


def tie_gradients(dec):
    """Tied matrices: the trained copy gets the gradient of both uses; the follower none, so that the
    optimiser skips it (Decomposition.tie_weights copies it over after the step)."""
    for b, a in dec.tie.items():
        ca, cb = dec.comps[a], dec.comps[b]
        ca.V.grad += cb.U.grad.T
        ca.U.grad += cb.V.grad.T
        cb.V.grad = cb.U.grad = None


def sync_gradients(params):
    """Data parallelism: the masked forwards run outside any DDP wrapper, so average the gradients of
    V, U and the CI function by hand, as one flat all-reduce."""
    if world_size() == 1:
        return
    flat = torch.cat([prm.grad.flatten() for prm in params])
    dist.all_reduce(flat)
    flat /= world_size()
    for prm, g in zip(params, flat.split([prm.numel() for prm in params])):
        prm.grad.copy_(g.view_as(prm))


def train(cfg: Config, target: nn.Module, get_batch, truth=None, run_config=None) -> dict:
    """Decompose `target`. get_batch(split, step) -> (x, y) gives the batch of a step ("train") or the
    i-th evaluation batch ("val"); x: the target's input, a tensor or a dict of keyword inputs (input_ids,
    attention_mask); y: next-token labels for language models, else None. truth: for toy
    models, what the decomposition should find (see models.py). Returns the final metrics."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    rank_path = os.path.join(cfg.out_dir, f"ckpt_rank{rank}.pt")  # ranks > 0: their own RNG and adversary
    torch.manual_seed(cfg.seed)
    dec = Decomposition(target, cfg)  # the same initial weights on every rank
    if rank:  # but each rank its own masks, routing and adversary; rank 0 keeps the single-process stream
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
    device = dec.target_device()
    vu = [p for c in dec.comps.values() for p in (c.V, c.U)]
    params = vu + list(dec.ci_fn.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one kernel, not a loop
    adversary = Adversary()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" and device.type == "cuda"
                else nullcontext())
    if cfg.compile:  # the CI function with both sigmoids, fused; modules untouched: state-dict keys stay the same
        dec.causal_importance = torch.compile(dec.causal_importance)
        if device.type == "cuda":  # a few fused kernels instead of a pass per operation over [B, T, vocab] (the
            dec.recon = torch.compile(recon_loss, dynamic=True)  # logits' fp32 cast, log-softmaxes, KL) and
            adversary.update = torch.compile(adversary.update)   # [B, T, ΣC + M] (Adam); no gain on a CPU
    plan = memory_plan(dec, cfg, get_batch("train", 0)[0], autocast)
    check_memory(plan, device, cfg, verbose=master)
    flops, peak = step_flops(dec, cfg, get_batch("train", 0)[0], autocast), peak_tflops(cfg, device)
    if master:
        print(f"one training step: {flops / 1e9:.1f} GFLOP per process" + (f"; peak {peak} TFLOP/s" if peak else ""))
    if cfg.eval_interval > 0:
        get_batch("val", 0)  # a missing validation split fails now, not after eval_interval steps

    start = 0
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        load_decomposition_state(dec, ckpt)
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        own = ckpt  # rank 0's adversary and noise state; the other ranks' are in their own files
        if not master:
            own = load_checkpoint(rank_path, ("step", "adversary", "rng")) if os.path.exists(rank_path) else {"step": None}
        if own["step"] == start:
            adversary.load_state_dict({k: v.to(device) if torch.is_tensor(v) else v for k, v in own["adversary"].items()})
            torch.set_rng_state(own["rng"]["cpu"])
            if device.type == "cuda" and "cuda" in own["rng"]:  # absent when the run moved from the CPU
                torch.cuda.set_rng_state(own["rng"]["cuda"], device)
        else:  # no file of this rank at this step (another world size, or a crash between the writes)
            print(f"rank {rank}: no state at step {start} in {rank_path}; its adversary and noise start afresh")
        if master and os.path.exists(metrics_path):  # drop what the interrupted run logged after the checkpoint
            with open(metrics_path) as f:  # (and a last line the crash tore: it has no newline)
                kept = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= start]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics_path + ".tmp", metrics_path)
        if master:
            print(f"resuming from {ckpt_path} at step {start}")
    else:
        if master and os.path.exists(metrics_path):
            os.remove(metrics_path)
        if master and os.path.exists(ckpt_path):  # an earlier run's: kept, but where no resume will take it
            os.replace(ckpt_path, ckpt_path + ".prev")
            print(f"a fresh run: the earlier {ckpt_path} is now {ckpt_path}.prev")
        warm = torch.optim.AdamW(vu, lr=cfg.faith_warmup_lr, weight_decay=0)
        for _ in range(cfg.faith_warmup_steps):  # faithfulness warm-up: start from (V U)^T ≈ W
            warm.zero_grad(set_to_none=True)
            faithfulness_loss(dec.deltas()).backward()
            tie_gradients(dec)
            warm.step()
            dec.tie_weights()
        del warm  # its moments (8 bytes per entry of V and U) would stay allocated for the whole run

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(step):
        if not all(torch.isfinite(prm).all() for prm in params):  # a finite loss can still leave NaN gradients
            raise FloatingPointError(f"step {step}: non-finite weights; the last good checkpoint is {ckpt_path}")
        own = {"step": step, "adversary": adversary.state_dict(), "rng": {"cpu": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}}
        if not master:
            save_checkpoint(rank_path, own)
        if world_size() > 1:
            dist.barrier()  # the other ranks' files are written before ckpt.pt moves on to this step
        if master:
            sd = dec.target.state_dict()
            save_checkpoint(ckpt_path, {
                "config": run_config or dataclasses.asdict(cfg), **own,
                "components": {n: {"V": c.V.detach().cpu(), "U": c.U.detach().cpu()} for n, c in dec.comps.items()},
                "target": {k: v.cpu() for k, v in sd.items() if not k.endswith((".V", ".U"))},
                "ci_fn": dec.ci_fn.state_dict(), "optimizer": opt.state_dict()})

    t_last, step_last, n_tok, metrics, step_ms = time.perf_counter(), start, 0, {}, []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not master, dynamic_ncols=True)
    for step in bar:
        frac = step / max(1, cfg.steps - 1)
        p = cfg.p_start + (cfg.p_end - cfg.p_start) * frac
        lr = lr_at(step, cfg)
        adv_lr = cfg.adv_lr * min(1.0, (step + 1) / max(1.0, cfg.adv_warmup * cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, _ = get_batch("train", step)
        losses, sources = training_losses(dec, x, adversary, cfg, p, adv_lr, autocast)
        coeffs = {"faith": cfg.faith_coeff, "imp": cfg.imp_coeff, "stoch": cfg.stoch_coeff, "adv": cfg.adv_coeff}
        total = sum(coeffs[k] * v.float() for k, v in losses.items())  # 5: the weighted sum in fp32
        finite = torch.isfinite(total.detach()).float()
        if world_size() > 1:  # one rank's NaN stops every rank (alone, the others would hang in all-reduce)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            raise FloatingPointError(f"step {step}: the loss is {total.item()} "
                                     f"({ {k: v.item() for k, v in losses.items()} }); the last good checkpoint "
                                     f"is {ckpt_path}")
        # 6-7: one backward gives the parameters' gradients and (through L_adv) the sources' gradients
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
            sources = None  # its gradient [*positions, ΣC + M] would live on through the next step's losses

        positions = dec.n_positions() * world_size()
        n_tok += positions
        done = step + 1
        log_now = done == cfg.steps or (cfg.log_interval > 0 and done % cfg.log_interval == 0)
        eval_now = cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.steps)
        ckpt_now = done == cfg.steps or (cfg.ckpt_interval > 0 and done % cfg.ckpt_interval == 0)
        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_last
            values = mean_over_processes(torch.stack([v.detach().float() for v in losses.values()] + [total.detach()]))
            tflops = flops * (done - step_last) / dt / 1e12  # per process
            record = {"step": done, **dict(zip([*losses, "total"], values.tolist())), "p": p, "lr": lr,
                      "ms_per_step": 1000 * dt / (done - step_last), "tokens_per_s": n_tok / dt,
                      "tflops": tflops, **({"mfu": tflops / peak} if peak else {}), "peak_mem_gb": peak_memory_gb(device)}
            step_ms.append(record["ms_per_step"])
            log(record)
            if master:
                bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if ckpt_now:  # before evaluating: an evaluation that fails must not cost the steps since the last one
            checkpoint(done)
        if eval_now:
            metrics = {"step": done, **evaluate(dec, get_batch, cfg, truth, autocast)}
            log(metrics)
            if master:
                bar.write("eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                             if "/" not in k or k.endswith("total") or k.startswith(("recon", "ce/"))))
        if log_now or eval_now or ckpt_now:  # the timer measures training steps only
            t_last, step_last, n_tok = time.perf_counter(), done, 0
    if master and len(step_ms) > 1:
        ms = sorted(step_ms[1:])[len(step_ms[1:]) // 2]
        tflops = flops / ms / 1e9
        print(f"median ms/step {ms:.1f} over {len(step_ms) - 1} logged intervals (the first, with warm-up and "
              f"compilation, left out): {positions / ms * 1000:.0f} tokens/s, "
              + (f"{tflops:.1f} TFLOP/s, MFU {tflops / peak:.1%} of {peak} TFLOP/s" if peak else
                 f"{1000 * tflops:.1f} GFLOP/s per process"))
    if master and truth is not None:
        save_figures(dec, truth, cfg.out_dir)
    return metrics


def activation_bytes(dec, cfg, x, autocast=nullcontext()) -> int:
    """Bytes that one training step on batch x needs besides the weights, the gradients of V, U and the CI
    function, and the optimiser's and the adversary's state. On CUDA: the allocator's peak over the losses
    (the adversary's inner steps included) and the backward, so the backward's transient gradients count,
    and the CI function runs compiled when training compiles it. Elsewhere there are no allocator
    statistics: what autograd saves for the backward, without the transients, a lower bound."""
    device = dec.target_device()
    with torch.random.fork_rng([device] if device.type == "cuda" else []):
        if device.type == "cuda":
            for p in dec.parameters():  # as in training, where a step's gradients live until the next backward
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            adversary = Adversary()
            losses, _ = training_losses(dec, x, adversary, cfg, cfg.p_start, 0.0, autocast)
            sum(losses.values()).backward()
            dec.zero_grad(set_to_none=True)
            state = 3 * adversary.sources.numel() * 4 if adversary.sources is not None else 0
            return torch.cuda.max_memory_allocated(device) - base - state
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        # eager, so that no graph is compiled for these batch sizes; the inner ascent steps free their graphs
        # before the losses are built: leave them out
        with torch.compiler.set_stance("force_eager"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_losses(dec, x, Adversary(), dataclasses.replace(cfg, adv_steps=0), cfg.p_start, 0.0, autocast)
    params = {p.untyped_storage().data_ptr() for p in dec.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params)


def first_samples(x, n: int):
    """The first n samples (sequences) of a batch: a tensor, or a dict of keyword inputs [B, ...]."""
    return x[:n] if torch.is_tensor(x) else {k: v[:n] for k, v in x.items()}


def n_samples(x) -> int:
    return len(x) if torch.is_tensor(x) else len(next(iter(x.values())))


def memory_plan(dec, cfg, x, autocast=nullcontext()) -> dict:
    """Bytes one process needs for training, by item, printed at the start so that a run that cannot fit
    stops before it begins. Activations: measured on the first one and two samples (sequences) of the
    batch and extrapolated linearly to the whole batch, so that any target and CI function is covered
    (on CUDA with the backward's transient gradients, elsewhere without: see activation_bytes)."""
    one = activation_bytes(dec, cfg, first_samples(x, 1), autocast)
    pos = dec.n_positions() * n_samples(x)  # per process
    two = activation_bytes(dec, cfg, first_samples(x, 2), autocast)
    trainable = sum(p.numel() for p in dec.parameters() if p.requires_grad)
    plan = {
        "target weights": sum(p.numel() * p.element_size() for p in dec.target.parameters() if not p.requires_grad),
        "V, U, CI function": 4 * trainable,
        "gradients and AdamW moments": 12 * trainable,
        "adversary sources and moments": 12 * pos * (sum(dec.Cs) + len(dec.Cs)) if cfg.adv_coeff else 0,
        "activations": one + (two - one) * (n_samples(x) - 1),
    }
    if world_size() > 1:
        plan["gradient all-reduce buffer"] = 4 * trainable  # the flat copy sync_gradients reduces
    plan["total"] = sum(plan.values())
    return plan


def check_memory(plan: dict, device, cfg: Config, verbose=True):
    """Stop before training when the plan does not fit in 90% of the free memory: on an H100 the plan of
    pile4l at batch 24 fell 6% short of the peak (62.5 of 66.4 GiB)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the plan's own measurement left blocks in the allocator's cache
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)  # the plan counts these
    elif os.path.exists("/proc/meminfo"):  # Linux: what the OS can give without swapping, page cache included
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    else:
        free = float("inf")  # no portable way to ask: trust the user
    if verbose:
        print("memory plan per process: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in plan.items())
              + f" (free: {free / 2**30:.1f} GiB)")
    usable = 0.9 * free
    if cfg.memory_check and plan["total"] > usable:
        fixed = plan["total"] - plan["adversary sources and moments"] - plan["activations"]
        fits = int(cfg.batch_size * (usable - fixed) / max(1, plan["total"] - fixed))
        bf16 = ", or use dtype='bfloat16'" if device.type == "cuda" and cfg.dtype != "bfloat16" else ""
        raise SystemExit(f"this run needs about {plan['total'] / 2**30:.1f} GiB per process, more than 90% of the "
                         f"{free / 2**30:.1f} GiB free: lower batch_size (per process) to about {max(fits, 0)}, spread "
                         f"the batch over more GPUs with torchrun{bf16} (--memory_check=False runs anyway)")


def step_flops(dec, cfg, x, autocast=nullcontext()) -> int:
    """FLOPs of one training step on batch x per process, as MFU counts them (matmuls and attention: the
    losses, the adversary's inner steps, the backward), counted with FlopCounterMode on the first one and
    two samples and extrapolated linearly (Δ's V U in the faithfulness loss does not grow with the batch)."""
    def count(xb):
        device = dec.target_device()
        with (torch.random.fork_rng([device] if device.type == "cuda" else []), torch.compiler.set_stance("force_eager"),
              FlopCounterMode(display=False) as counter):
            losses, _ = training_losses(dec, xb, Adversary(), cfg, cfg.p_start, 0.0, autocast)
            sum(losses.values()).backward()
        dec.zero_grad(set_to_none=True)
        return counter.get_total_flops()
    one, two = count(first_samples(x, 1)), count(first_samples(x, 2))
    return one + (two - one) * (n_samples(x) - 1)


# dense peak TFLOP/s (bf16 tensor cores, fp32) of common GPUs by name; the first match counts
PEAK_TFLOPS = [("H100 PCIe", 756, 51), ("H100 NVL", 835, 60), ("H200 NVL", 835, 60), ("H100", 989, 67),
               ("H200", 989, 67), ("A100", 312, 19.5), ("L40S", 362, 91.6), ("L40", 181, 90.5), ("L4", 121, 30.3),
               ("RTX 4090", 165, 82.6), ("RTX 3090", 71, 35.6)]


def peak_tflops(cfg, device) -> float:
    """The peak that MFU divides by: cfg.peak_tflops, else the GPU's from PEAK_TFLOPS in the run's precision;
    0 when unknown (CPUs), and the log then shows only the achieved TFLOP/s."""
    if cfg.peak_tflops or device.type != "cuda":
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((bf16 if cfg.dtype == "bfloat16" else fp32 for key, bf16, fp32 in PEAK_TFLOPS if key in name), 0.0)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# -----------------------------------------------------------------------------
# Entry point: python vpd.py [config.py] [--key=value ...]

def configure(argv: list, *configs):
    """nanoGPT-style configuration onto dataclass instances: config files (plain Python that sets
    variables), then the --key=value overrides wherever they stand, parsed as Python literals or else
    taken as strings. Unknown keys and values of the wrong type are errors."""
    fields = {f.name: (cfg, f.type, f.default) for cfg in configs for f in dataclasses.fields(cfg)}

    def assign(key, value, where):
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            raise SystemExit(f"unknown config key {key!r} in {where}" + (f"; did you mean {near[0]!r}?" if near else ""))
        cfg, kind, default = fields[key]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind and not (value is None and default is None):  # None: only where it is the default
            raise SystemExit(f"config key {key!r} in {where} takes a {kind.__name__}, "
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
            assign(key, value, "the command line")
        else:
            if not os.path.exists(arg):
                raise SystemExit(f"config file {arg!r} does not exist")
            namespace = {"__file__": arg}  # a config may exec() another one next to it
            exec(compile(open(arg).read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not type(value).__name__ == "module":
                    assign(key, value, arg)
    return configs


def main(argv):
    import models  # the toy and language-model targets, their data and their training
    # the masks, logits and their gradients differ in size between the losses: segments that grow in place
    # instead of cached blocks of fixed sizes leave less memory stranded (set before CUDA starts)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if all(arg.startswith("--") for arg in argv):
        default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tms_5_2.py")
        print(f"no config file given: using {os.path.relpath(default)}")
        argv = [default, *argv]
    cfg, tcfg = configure(argv, Config(), models.TargetConfig())
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
    run_config = {**dataclasses.asdict(cfg), **dataclasses.asdict(tcfg)}
    if rank == 0:
        print(json.dumps(run_config, indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=1)
    target, get_batch, truth = models.build(tcfg, cfg)
    metrics = train(cfg, target, get_batch, truth, run_config)
    if rank == 0:
        print("final: " + json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
