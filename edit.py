"""
edit.py: edit a model through its parameter components; the German-removal experiment.

A decomposition written by vpd.py rewrites each decomposed matrix as W = Σ_c (V[:, c] ⊗ U[c, :])^T + Δ, so
every subcomponent is an edit handle: a scalar m_c that adds (m_c - 1) g (x · V[:, c]) U[c, :] to its matrix's
output (Δ and biases untouched), where the gate g says where the edit acts:

    plain   g = 1: a weight edit, W' = W + (m_c - 1) (V[:, c] ⊗ U[c, :])^T, baked into a copy of the model
    act     g = 1[|x · V[:, c]| > θ_c], θ_c a high quantile of the keep language's |x · V[:, c]|, fixed before
            any edit: a plain module, one more nonlinearity, saved, loaded and run without the decomposition
    ci      g = 1[CI_c > τ]: a runtime edit that runs the decomposition's CI function beside the model

m = 1 changes nothing, 0 removes the subcomponent, -1 inverts it. A subcomponent is named "<module path>:<c>".

    python edit.py configs/edit_fortunes_quick.py    # remove German from the fortunes model, minutes on a CPU
    python edit.py configs/edit_fortunes.py          # the full token-budget sweep

Sections: config; §1 edits (scalars, LoRA, gates) as forward hooks, baked and saved; §2 what each subcomponent
does, per language; §3 the causal frontier; §4 the edit objective and its training; §5 the sweep; §6 the
summary (summary.json, which notebooks/editing.py tabulates and draws, and frontier.png). Left out on purpose:
hand-written write vectors, and autointerp (every text's language is known, so labels come from statistics
with thresholds fixed before any edit). The toy edit on TMS is in notebooks/tms_method.py.
"""
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import models
import vpd

# Edit methods, "<handles>[_<gate>]", the gate "ci" or "act" (none: a weight edit):
#   one             Goodfire's procedure: the top "<remove>-only" subcomponent by mean-CI difference,
#                   from m = 1
#   top, only       the top_k ranked subcomponents' scalars, or every "<remove>-only" one's, from m = 1
#   best            the causal frontier's best subcomponent for the gate, from its m, as m = sign · exp(u)
#   random          a control for best: a random alive subcomponent outside the ranked ones, from best's m,
#                   under a gate of the same kind (its own)
#   lora<r>_all     rank-r LoRA on every decomposed matrix (no gate)
#   lora<r>_matrix  rank-r LoRA on one matrix: one's without a gate; with a gate, best's matrix under
#                   best's gate
METHOD = re.compile(r"(one|top|only|best|random|lora([1-9][0-9]*)_(all|matrix))(?:_(ci|act))?")
FORMS = ("plain", "ci", "act")


@dataclass
class EditConfig:
    ckpt: str = "out/fortunes/ckpt.pt"     # a vpd.py checkpoint: the target and its decomposition
    out_dir: str = "out/edit_fortunes"
    device: str = "auto"                   # "auto": cuda when available
    # text (models.language_splits): splits train (edit training), val (what components do), dev (the frontier
    # and hyper-parameters), test (everything reported)
    data: str = "data/fortunes"
    tokenizer: str = "gpt2"                # "gpt2" (data/fortunes' truncated BPE), "hf:<name or dir>", "ids"
    sources: dict = field(default_factory=dict)  # lang -> Hugging Face dataset "name[:subset]", streamed
    split_tokens: int = 200_000            # tokens per split of a streamed language
    languages: list = field(default_factory=lambda: ["en", "de", "es", "it"])
    remove: str = "de"
    keep: str = "en"
    seq_len: int = 64
    # §2 labels and gates, fixed before any edit; shares are of the mean CI summed over languages
    analysis_windows: int = 200            # held-out windows per language
    fire_threshold: float = 0.1            # a subcomponent fires where its CI exceeds this
    dead_freq: float = 1e-3                # dead: fires on fewer positions than this in every language
    only_share: float = 0.8                # "<lang>-only"
    pair_share: float = 0.8                # "<lang>+<lang>"
    foreign_share: float = 0.1             # "foreign": the keep language's share at most this
    top_k: int = 16                        # ranked by mean CI on `remove` minus on `keep`
    n_contexts: int = 2                    # top-activating contexts per language and ranked subcomponent
    ci_tau: float = 0.5                    # the CI gate: where CI > ci_tau
    act_quantile: float = 0.99             # the activation gate: where |x·V_c| > this quantile on `keep`
    # §3 the frontier on dev windows: every alive subcomponent (or the frontier_top ranked) x gate x m
    frontier_windows: int = 8
    frontier_grid: list = field(default_factory=lambda: [-100.0, -30.0, -10.0, -1.0, 0.0, 3.0, 10.0, 30.0])
    frontier_top: int = 0                  # 0: every alive subcomponent
    # §4-5 the edits: each from the unedited model (best, random: from the frontier's m), Adam, a grid on dev
    methods: list = field(default_factory=lambda: ["one", "top", "best", "best_act", "best_ci", "lora1_all"])
    budgets: list = field(default_factory=lambda: [2 ** i for i in range(11)])  # supervised tokens to remove
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 40                        # Adam steps per edit
    keep_batch: int = 8                    # windows of the keep language per step, for the KL, taken in turn
    keep_windows: int = 128                # a fixed set of training windows, their original logits cached
    scalar_lrs: list = field(default_factory=lambda: [0.1, 0.3])   # m itself
    log_lrs: list = field(default_factory=lambda: [0.03, 0.1])     # u in m = sign · exp(u): moves by factors
    lora_lrs: list = field(default_factory=lambda: [3e-3, 1e-2])
    lambdas: list = field(default_factory=lambda: [0.1, 1.0, 10.0])
    eval_windows: int = 96                 # dev and test windows per language
    max_damage: float = 0.1                # nats of keep-language CE an edit may cost (selection, to chance)
    chance_fraction: float = 0.95          # "at chance": this far from the base CE to ln(vocabulary)
    save_budget: int = 64                  # the budget whose seed-0 edits are saved
    decomposition_processes: int = 1       # processes the decomposition ran on (torchrun), for its cost


# -----------------------------------------------------------------------------
# §1 Edits: scalar prefactors and LoRA as forward hooks, their gates, baking and saving

def all_keys(components: dict) -> list:
    """Every subcomponent's "<module path>:<c>" key, in the order of the CI's last dimension [ΣC]."""
    return [f"{path}:{c}" for path, comp in components.items() for c in range(comp["V"].shape[1])]


def chosen(keys: list, components: dict) -> dict:
    """ "<module path>:<c>" keys, checked against the decomposition -> {path: ([positions in keys], [c])}."""
    out = {}
    for i, key in enumerate(keys):
        path, _, c = key.rpartition(":")
        if path not in components:
            raise KeyError(f"subcomponent {key!r}: {path!r} is not a decomposed matrix; decomposed: "
                           f"{list(components)}")
        C = components[path]["V"].shape[1]
        if not c.isdigit() or int(c) >= C:
            raise KeyError(f"subcomponent {key!r}: index must be an integer in [0, {C}) for {path}")
        out.setdefault(path, ([], []))[0].append(i)
        out[path][1].append(int(c))
    return out


class Gate:
    """Where an edit acts, one gate per subcomponent of `keys`: where |x · V[:, c]| exceeds its threshold
    ("act"), or where its CI exceeds tau ("ci": the CI of an unedited run of the decomposition on the same
    input, which `read` computes before each edited forward)."""

    def __init__(self, kind: str, keys: list, components: dict, thresholds: dict, dec=None, tau=0.5):
        self.kind, self.dec, self.tau, self.ci = kind, dec, tau, None
        column = {key: i for i, key in enumerate(all_keys(components))}
        self.where = {}  # path -> (V[:, cs] [d_in, k], thresholds [k], columns of the CI [k])
        for path, (ms, cs) in chosen(keys, components).items():
            V = components[path]["V"][:, cs]
            theta = torch.tensor([thresholds[keys[i]] for i in ms], device=V.device) if kind == "act" else 0
            self.where[path] = (V, theta, [column[f"{path}:{c}"] for c in cs])

    @torch.no_grad()
    def read(self, x):
        self.dec(x)
        self.ci = self.dec.causal_importance()[0]                              # [B, T, ΣC]

    def __call__(self, path, x):  # x [..., d_in] -> [..., k]: 1 where the edit acts
        V, theta, columns = self.where[path]
        on = (x @ V).abs() > theta if self.kind == "act" else self.ci[..., columns] > self.tau
        return on.to(x.dtype)


class ScalarEdit(nn.Module):
    """A prefactor m_k per chosen subcomponent c_k: its matrix's output gets Σ_k (m_k - 1) g_k (x · V[:, c_k])
    U[c_k, :]. init: the starting m (1: no change). log_scale: m = sign(init) exp(u), so that Adam moves m by
    factors and reaches |m| of tens in a few steps (from m = 1 it sits on a ridge: the target was trained
    there)."""

    def __init__(self, components: dict, keys: list, init=1.0, gate: Gate = None, log_scale=False):
        super().__init__()
        self.keys, self.gate, self.log_scale = list(keys), gate, log_scale
        init = torch.full((len(self.keys),), float(init), device=next(iter(components.values()))["V"].device)
        self.sign = torch.where(init < 0, -1.0, 1.0)
        self.u = nn.Parameter(init.abs().clamp(min=1e-2).log() if log_scale else init)
        # path -> (positions in m, V[:, cs] [d_in, k], U[cs] [k, d_out]): sliced once, only u is trained
        self.where = {path: (ms, components[path]["V"][:, cs], components[path]["U"][cs])
                      for path, (ms, cs) in chosen(self.keys, components).items()}

    def m(self):
        return self.sign * self.u.exp() if self.log_scale else self.u

    def factors(self) -> dict:  # path -> (P [d_in, k], Q [k, d_out]): the edit adds ((x P) ⊙ g) Q
        m = self.m()
        return {path: (V * (m[ms] - 1), U) for path, (ms, V, U) in self.where.items()}

    def prefactors(self) -> dict:
        return dict(zip(self.keys, self.m().tolist()))


class LoRA(nn.Module):
    """W' = W + (A B)^T per matrix, A [d_in, r] random, B [r, d_out] zero: no change until B moves. With a
    gate (of one subcomponent of its one matrix), the update acts only where that gate is on."""

    def __init__(self, model: nn.Module, paths: list, rank: int, seed: int, gate: Gate = None):
        super().__init__()
        g, self.paths, self.gate = torch.Generator().manual_seed(seed), list(paths), gate
        shapes = [vpd.weight_of(model.get_submodule(p)).shape for p in self.paths]  # [d_out, d_in]
        device = next(model.parameters()).device
        self.A = nn.ParameterList((torch.randn(d_in, rank, generator=g) / math.sqrt(d_in)).to(device)
                                  for _, d_in in shapes)
        self.B = nn.ParameterList(torch.zeros(rank, d_out, device=device) for d_out, _ in shapes)

    def factors(self) -> dict:
        return {p: (A, B) for p, A, B in zip(self.paths, self.A, self.B)}


def ci_gated(edit: nn.Module) -> bool:
    """Whether the edit runs the decomposition's CI function at inference (and so cannot be baked)."""
    return edit.gate is not None and edit.gate.kind == "ci"


@contextmanager
def applied(edit: nn.Module, model: nn.Module):
    """Run `model` with the edit as forward hooks, out += ((x P) ⊙ g) Q: the weights are never copied, and the
    factors are built once for everything run inside the block."""
    gate = edit.gate

    def hook(path, P, Q, module, inputs, out):
        h = inputs[0] @ P
        return out + (h if gate is None else h * gate(path, inputs[0])) @ Q
    hooks = [model.get_submodule(path).register_forward_hook(partial(hook, path, P, Q))
             for path, (P, Q) in edit.factors().items()]
    if ci_gated(edit):  # the decomposition's CI of each input, before its forward
        hooks.append(model.register_forward_pre_hook(lambda module, args: gate.read(args[0])))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


class ActivationGated(nn.Module):
    """A matrix with an activation-gated edit written in: linear(x) + ((x P) ⊙ 1[|x R| > θ]) Q. Plain tensors:
    it needs no decomposition to run, save or load."""

    def __init__(self, linear: nn.Module, P, Q, R, theta):
        super().__init__()
        self.linear = linear
        for name, t in (("P", P), ("Q", Q), ("R", R), ("theta", theta)):
            self.register_buffer(name, t.detach().clone())

    def forward(self, x):
        return self.linear(x) + ((x @ self.P) * ((x @ self.R).abs() > self.theta)) @ self.Q


@torch.no_grad()
def bake(edit: nn.Module, model: nn.Module) -> nn.Module:
    """An ordinary copy of the model with the edit written in: into the weights, W' = W + (P Q)^T, or for an
    activation gate as ActivationGated modules. A CI gate runs the decomposition at inference: no bake."""
    if ci_gated(edit):
        raise ValueError("a CI-gated edit runs the decomposition's CI function at inference: it cannot be "
                         "baked")
    baked = copy.deepcopy(model)
    for path, (P, Q) in edit.factors().items():
        module = baked.get_submodule(path)
        if edit.gate is None:
            vpd.weight_of(module).add_((P @ Q).T)
        else:
            V, theta, _ = edit.gate.where[path]
            baked.set_submodule(path, ActivationGated(module, P, Q, V, theta))
    return baked


def save_edited(path: str, baked: nn.Module):
    """A plain state dict; with activation gates, {"model": the target's state dict, "gates": their
    tensors}."""
    gated = {n: m for n, m in baked.named_modules() if isinstance(m, ActivationGated)}
    state = baked.state_dict()
    for name in gated:  # the target's own keys, the gates apart
        state = {k.replace(f"{name}.linear.", f"{name}."): v for k, v in state.items()
                 if k.rpartition(".")[0] != name}
    gates = {n: dict(m.named_buffers()) for n, m in gated.items()}
    vpd.save_checkpoint(path, {"model": state, "gates": gates} if gated else state)


def load_edited(path: str, tcfg: models.TargetConfig) -> nn.Module:
    """What save_edited wrote, into the target's own class (torch.load with weights_only)."""
    saved, model = torch.load(path, map_location="cpu", weights_only=True), models.build_model(tcfg)
    model.load_state_dict(saved["model"] if "gates" in saved else saved)
    for name, buffers in saved.get("gates", {}).items():
        model.set_submodule(name, ActivationGated(model.get_submodule(name), **buffers))
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# §2 What each subcomponent does, per language

@torch.no_grad()
def ci_and_activations(dec, w, columns=None, batch=32):
    """CI and |x · V[:, c]| of the subcomponents (all, or the given columns of ΣC) at every position of
    windows w [N, T + 1], chunk by chunk: pairs of [B, T, k]."""
    for chunk in w.split(batch):
        dec(chunk[:, :-1])
        ci = dec.causal_importance()[0]
        acts = torch.cat([comp.input @ comp.V for comp in dec.comps.values()], -1).abs()
        yield (ci, acts) if columns is None else (ci[..., columns], acts[..., columns])


def component_stats(dec, texts: dict, fire_threshold: float):
    """Per language: mean CI per position and firing frequency of every subcomponent, each [L, ΣC]."""
    mean, freq = [], []
    for w in texts.values():
        stats = [(ci.flatten(0, -2).sum(0), (ci > fire_threshold).flatten(0, -2).sum(0))
                 for ci, _ in ci_and_activations(dec, w)]
        mean.append(sum(s for s, _ in stats) / w[:, :-1].numel())
        freq.append(sum(f for _, f in stats) / w[:, :-1].numel())
    return torch.stack(mean), torch.stack(freq)


def activation_thresholds(dec, w, quantile: float) -> torch.Tensor:
    """The `quantile` of |x · V[:, c]| over every position of windows w, per subcomponent [ΣC] (a running
    top-k of the largest values: memory ΣC·k, not ΣC·positions), set 1e-4 below that attained value: a gate
    computed by another matmul, with other rounding, must not flip where a position has exactly that value."""
    k, top = max(1, round((1 - quantile) * w[:, :-1].numel())), None
    for _, acts in ci_and_activations(dec, w):
        acts = acts.flatten(0, -2) if top is None else torch.cat([top, acts.flatten(0, -2)])
        top = acts.topk(min(k, len(acts)), 0).values
    return top[-1] * (1 - 1e-4)


def labels_of(mean, freq, languages: list, cfg: EditConfig) -> list:
    """A language-selectivity label per subcomponent from its per-language statistics [L, ΣC]."""
    share = mean / mean.sum(0).clamp(min=1e-12)                       # [L, ΣC]
    top2 = share.topk(2, dim=0)
    keep = languages.index(cfg.keep)
    out = []
    for c in range(mean.shape[1]):
        first, second = (languages[i] for i in top2.indices[:, c].tolist())
        if freq[:, c].max() < cfg.dead_freq:
            out.append("dead")
        elif top2.values[0, c] >= cfg.only_share:
            out.append(f"{first}-only")
        elif top2.values[:, c].sum() >= cfg.pair_share:
            out.append("+".join(sorted([first, second])))
        elif share[keep, c] <= cfg.foreign_share:
            out.append("foreign")
        else:
            out.append("general")
    return out


def top_contexts(dec, texts: dict, indices: list, decode, n: int, width=20) -> dict:
    """For each subcomponent in `indices` (of ΣC), its n positions of highest CI in each language,
    decoded as "<lang> (CI): ... [[token]] ...", with `width` tokens before the firing token."""
    found = {i: [] for i in indices}
    for lang, w in texts.items():
        ci = torch.cat([ci for ci, _ in ci_and_activations(dec, w, indices)])   # [N, T, k]
        values, flat = ci.flatten(0, 1).topk(min(n, ci.shape[0] * ci.shape[1]), dim=0)  # [n, k]
        for k, i in enumerate(indices):
            for v, f in zip(values[:, k].tolist(), flat[:, k].tolist()):
                t, row = f % ci.shape[1], w[f // ci.shape[1]]
                found[i].append(f"{lang} (CI {v:.2f}): " + decode(row[max(0, t - width):t].tolist()) + "[["
                                + decode(row[t:t + 1].tolist()) + "]]" + decode(row[t + 1:t + 6].tolist()))
    return found


# -----------------------------------------------------------------------------
# §3 The causal frontier: what one subcomponent's scalar does, for every candidate, gate and m

def window_ce(model, w):
    """Next-token cross-entropy of each window w [N, T + 1], summed over its positions: [N]."""
    logits = vpd.output_logits(model(w[:, :-1])).float()
    return F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").sum(1)


@torch.no_grad()
def ce_by_language(model, texts: dict, edit=None, batch=32) -> dict:
    """Mean next-token cross-entropy per language, with the edit applied when one is given."""
    out = {}
    with applied(edit, model) if edit is not None else nullcontext():
        for lang, w in texts.items():
            total = sum(window_ce(model, c).sum().item() for c in w.split(batch))
            out[lang] = total / w[:, 1:].numel()
    return out


@torch.no_grad()
def frontier(model, dec, components, keys: list, texts: dict, grid: list, thresholds: dict, tau: float,
             batch=64):
    """The CE change per language when one subcomponent's scalar alone is set to each m of the grid, for every
    key and gate: {form: {key: {lang: [ΔCE per m]}}}. One edited window per row, many (subcomponent, m) pairs
    per batch. A window where the gate is never on is the unedited one, so only the others run."""
    column = {key: i for i, key in enumerate(all_keys(components))}
    theta = torch.tensor([thresholds[k] for k in keys])
    out = {form: {k: {} for k in keys} for form in FORMS}
    bar = tqdm(total=len(texts) * len(keys) * len(FORMS), desc="frontier", unit="screen", dynamic_ncols=True)
    for lang, w in texts.items():
        base = torch.cat([window_ce(model, chunk) for chunk in w.split(batch)])            # [N]
        pairs = list(ci_and_activations(dec, w, [column[k] for k in keys]))
        ci, acts = torch.cat([c for c, _ in pairs]), torch.cat([a for _, a in pairs])           # [N, T, K]
        gates = {"plain": torch.ones_like(ci), "ci": (ci > tau).float(),
                 "act": (acts > theta.to(acts.device)).float()}
        for path, (ms, cs) in chosen(keys, components).items():
            V, U = components[path]["V"][:, cs].T, components[path]["U"][cs]         # [k, d_in], [k, d_out]
            for form in FORMS:
                g = gates[form][..., ms]                                            # [N, T, k]
                rows = [(j, i, m) for j in range(len(cs)) for i in g[..., j].any(1).nonzero()[:, 0].tolist()
                        for m in range(len(grid))]
                diff = torch.zeros(len(cs), len(grid))
                for chunk in torch.tensor(rows, dtype=torch.long).split(batch) if rows else []:
                    j, i, m = chunk.T
                    coef = (torch.tensor(grid)[m] - 1).to(w.device)[:, None] * g[i, :, j]  # [R, T]

                    def edited(module, inputs, out):  # row r: its subcomponent's scalar, gate and m
                        h = torch.einsum("rtd,rd->rt", inputs[0], V[j])
                        return out + (coef * h)[..., None] * U[j][:, None]
                    hook = model.get_submodule(path).register_forward_hook(edited)
                    try:
                        ce = window_ce(model, w[i])
                    finally:
                        hook.remove()
                    diff.index_put_((j.cpu(), m.cpu()), (ce - base[i]).cpu(), accumulate=True)
                for j, key in enumerate(keys[k] for k in ms):
                    out[form][key][lang] = (diff[j] / w[:, 1:].numel()).tolist()
                bar.update(len(cs))
    bar.close()
    return out


def best_point(de: list, en: list, gap: float, max_damage: float) -> int:
    """The grid point that moves the language to remove furthest towards chance (gap nats away) within
    max_damage on the keep language, ties to the least damage; with none within max_damage, the least
    damage."""
    ok = [i for i in range(len(de)) if en[i] <= max_damage]
    if not ok:
        return min(range(len(de)), key=lambda i: en[i])
    return max(ok, key=lambda i: (min(de[i], gap), -en[i]))


# -----------------------------------------------------------------------------
# §4 The edit objective and its training

def edit_objective(logits_remove, labels_remove, logits_keep, logits_keep_original, lam: float,
                   chance: float):
    """relu(chance - CE on the language to remove) + λ KL(original || edited) on the language to keep:
    German is pushed towards the uniform distribution's CE, ln(vocabulary), and never rewarded beyond it."""
    ce = F.cross_entropy(logits_remove.float().flatten(0, -2), labels_remove.flatten(), ignore_index=-1)
    kl = vpd.recon_loss(logits_keep, logits_keep_original, "kl")
    return F.relu(chance - ce) + lam * kl, ce, kl


def budget_batch(tokens: torch.Tensor, n: int, T: int, seed: int, device="cpu"):
    """ceil(n / T) random windows of the language to remove, labelled on exactly n positions (the last
    ones, which see the most context); the other labels are -1. Returns (x [k, T], y [k, T])."""
    w = models.windows(tokens, -(-n // T), T, torch.Generator().manual_seed(seed))
    x, y = w[:, :-1], w[:, 1:].clone()
    y.view(-1)[:y.numel() - n] = -1
    return x.to(device), y.to(device)


def train_edit(model, edit, x_remove, y_remove, keep, lr, lam, chance, cfg: EditConfig):
    """Adam on the edit's parameters for cfg.steps steps. keep: (windows [N, T], their original logits),
    of which each step takes the next keep_batch."""
    keep_x, keep_logits = keep
    opt = torch.optim.Adam(edit.parameters(), lr=lr)
    for step in range(cfg.steps):
        i = torch.arange(step * cfg.keep_batch, (step + 1) * cfg.keep_batch) % len(keep_x)
        with applied(edit, model):
            logits = vpd.output_logits(model(torch.cat([x_remove, keep_x[i]])))  # one forward, both languages
        loss, _, _ = edit_objective(logits[:len(x_remove)], y_remove, logits[len(x_remove):], keep_logits[i],
                                    lam, chance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return edit


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# §5 The sweep

def resumable(path: str, inputs: dict, compute) -> dict:
    """The JSON file at `path` when it was computed from the same inputs, else compute() written there
    atomically; never another run's (a sweep of other inputs must not mix its results with these)."""
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump({**compute(), "inputs": inputs}, f, indent=1)
        os.replace(path + ".tmp", path)
    saved = json.load(open(path))
    if saved.get("inputs") != inputs:
        old = saved.get("inputs", {})
        changed = sorted(k for k in {*old, *inputs} if old.get(k) != inputs.get(k))
        raise ValueError(f"{os.path.dirname(path)} holds a sweep of other inputs (differing: {changed}): "
                         f"give another out_dir, or delete its {os.path.basename(path)} to start afresh")
    return saved


class Editing:
    """Everything the sweep needs, loaded once: the target, its components, the texts of every split and
    language and the base CE; then the analysis (labels, ranking, the gates' thresholds), the frontier and the
    cells."""

    def __init__(self, cfg: EditConfig):
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        loaded = vpd.load_decomposition(cfg.ckpt, cfg.device)
        self.target, self.dec, self.components, self.tcfg, self.vcfg = loaded
        if self.tcfg.model != "llama_simple_mlp" and not self.tcfg.model.startswith("hf:"):
            raise ValueError(f"{cfg.ckpt} decomposes a {self.tcfg.model!r} model; edit.py edits a language "
                             "model")
        for lang in (cfg.remove, cfg.keep):
            if lang not in cfg.languages:
                raise ValueError(f"{lang!r} must be one of languages={cfg.languages}")
        self.vocab = self.tcfg.vocab_size  # what the logits span (an hf: model's padded rows included)
        self.chance = math.log(self.vocab)  # the uniform distribution's CE
        self.keys = all_keys(self.components)
        T, device = cfg.seq_len, cfg.device
        text = {lang: models.language_splits(lang, cfg.data, cfg.sources, cfg.tokenizer, cfg.split_tokens)
                for lang in cfg.languages}
        for lang, splits in text.items():
            if max(t.max().item() for t in splits.values()) >= self.vocab:
                raise ValueError(f"{lang} text holds token ids beyond the model's vocabulary of "
                                 f"{self.vocab}: it was tokenized for another model")
        self.train = text[cfg.remove]["train"]
        keep = models.windows(text[cfg.keep]["train"], cfg.keep_windows, T, torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.keep = (keep[:, :-1].to(device), vpd.output_logits(self.target(keep[:, :-1].to(device))))
        def sample(split, n, langs):
            return {lang: models.windows(text[lang][split], n, T).to(device) for lang in langs}
        pair = (cfg.remove, cfg.keep)
        self.val = sample("val", cfg.analysis_windows, cfg.languages)
        self.test = sample("test", cfg.eval_windows, cfg.languages)
        self.dev = sample("dev", cfg.eval_windows, pair)
        self.screen = sample("dev", cfg.frontier_windows, pair)   # the frontier's windows
        self.base_dev = ce_by_language(self.target, self.dev)
        self.base_test = ce_by_language(self.target, self.test)

    def inputs(self) -> dict:
        """What the analysis and every cell depend on: the decomposition (a checksum of V, whatever its path)
        and the settings, but not the methods, budgets and seeds, which a resumed sweep may extend."""
        extendable = {"ckpt", "out_dir", "device", "methods", "budgets", "seeds", "save_budget",
                      "decomposition_processes"}
        return {**{k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in extendable},
                "V_checksum": sum(c["V"].cpu().double().sum().item() for c in self.components.values())}

    def analyse(self, decode) -> dict:
        """Labels, ranking and the activation gates' thresholds, fixed before any edit is trained."""
        cfg = self.cfg
        mean, freq = component_stats(self.dec, self.val, cfg.fire_threshold)
        labels = labels_of(mean, freq, cfg.languages, cfg)
        score = mean[cfg.languages.index(cfg.remove)] - mean[cfg.languages.index(cfg.keep)]
        order = score.argsort(descending=True).tolist()
        top = order[:cfg.top_k]
        contexts = top_contexts(self.dec, self.val, top, decode, cfg.n_contexts)
        ranked = [{"key": self.keys[i], "label": labels[i], "score": score[i].item(), "contexts": contexts[i],
                   "mean_ci": dict(zip(cfg.languages, mean[:, i].tolist())),
                   "freq": dict(zip(cfg.languages, freq[:, i].tolist()))} for i in top]
        only = [r["key"] for r in ranked if r["label"] == f"{cfg.remove}-only"]
        alive = [self.keys[i] for i in order if mean[:, i].mean() > self.vcfg.alive_threshold]  # by rank
        thresholds = activation_thresholds(self.dec, self.val[cfg.keep], cfg.act_quantile).tolist()
        return {"ckpt": cfg.ckpt, "labels": dict(zip(self.keys, labels)), "ranked": ranked,
                "rank": {self.keys[i]: r + 1 for r, i in enumerate(order)},
                "chosen": only[0] if only else ranked[0]["key"], "chosen_is_only": bool(only), "alive": alive,
                "alive_others": [k for k in alive if k not in {r["key"] for r in ranked}],
                "thresholds": dict(zip(self.keys, thresholds))}

    def frontier(self, analysis: dict) -> dict:
        """The frontier on the dev split's screen windows: each (subcomponent, gate) at its best m
        (best_point), and the best per gate."""
        cfg, t0 = self.cfg, time.perf_counter()
        keys = analysis["alive"][:cfg.frontier_top or None]
        keys += [analysis["chosen"]] * (analysis["chosen"] not in keys)  # Goodfire's pick, to compare with
        raw = frontier(self.target, self.dec, self.components, keys, self.screen, cfg.frontier_grid,
                       analysis["thresholds"], cfg.ci_tau)
        base = ce_by_language(self.target, self.screen)
        gap = self.chance - base[cfg.remove]
        entries, best = [], {}
        for form in FORMS:
            for key in keys:
                de, en = raw[form][key][cfg.remove], raw[form][key][cfg.keep]
                i = best_point(de, en, gap, cfg.max_damage)
                entries.append({"key": key, "form": form, "label": analysis["labels"][key],
                                "rank": analysis["rank"][key], "m": cfg.frontier_grid[i], "remove": de[i],
                                "keep": en[i], "grid": {"remove": de, "keep": en}})
                old = best.get(form, entries[-1])
                best[form] = entries[-1] if best_point([old["remove"], de[i]], [old["keep"], en[i]], gap,
                                                       cfg.max_damage) == 1 else old
        return {"grid": cfg.frontier_grid, "base": base, "gap": gap, "windows": cfg.frontier_windows,
                "remove_tokens": self.screen[cfg.remove][:, 1:].numel(), "candidates": len(keys),
                "seconds": time.perf_counter() - t0, "best": best, "goodfire_pick": analysis["chosen"],
                "entries": entries}

    def edit_for(self, method: str, analysis: dict, front: dict, seed: int) -> nn.Module:
        handles, rank, scope, form = METHOD.fullmatch(method).groups()
        best = front["best"][form or "plain"]

        def gate(keys):
            return form and Gate(form, keys, self.components, analysis["thresholds"], self.dec,
                                 self.cfg.ci_tau)
        if rank:
            if scope == "all" and form:
                raise ValueError(f"method {method!r}: a gate belongs to one subcomponent, so to "
                                 "lora<r>_matrix only")
            key = best["key"] if form else analysis["chosen"]
            paths = list(self.components) if scope == "all" else [key.rpartition(":")[0]]
            return LoRA(self.target, paths, int(rank), seed, gate([key]))
        if handles in ("best", "random"):  # random: one alive subcomponent outside the ranked ones per seed
            pool = analysis["alive_others"]
            if handles == "random" and not pool:
                raise ValueError(f"method {method!r}: no alive subcomponent outside the top {self.cfg.top_k}")
            key = best["key"] if handles == "best" else pool[torch.randint(
                len(pool), (1,), generator=torch.Generator().manual_seed(seed)).item()]
            return ScalarEdit(self.components, [key], init=best["m"], gate=gate([key]), log_scale=True)
        if handles == "only":  # the decomposition's German parts together
            keys = [k for k, label in analysis["labels"].items() if label == f"{self.cfg.remove}-only"]
            if not keys:
                raise ValueError(f"method {method!r}: no subcomponent is labelled {self.cfg.remove}-only")
        else:
            keys = [analysis["chosen"]] if handles == "one" else [r["key"] for r in analysis["ranked"]]
        return ScalarEdit(self.components, keys, gate=gate(keys))

    def cell(self, method: str, n: int, seed: int, analysis: dict, front: dict) -> dict:
        """One method at one budget and seed: every grid point trained on the same n tokens, the one chosen on
        dev (most CE on the language to remove within max_damage on the keep language), then tested."""
        cfg, t0 = self.cfg, time.perf_counter()
        x, y = budget_batch(self.train, n, cfg.seq_len, seed, cfg.device)
        kind = self.edit_for(method, analysis, front, seed)
        lrs = cfg.lora_lrs if isinstance(kind, LoRA) else cfg.log_lrs if kind.log_scale else cfg.scalar_lrs
        grid = []
        for lr in lrs:
            for lam in cfg.lambdas:
                edit = self.edit_for(method, analysis, front, seed)
                train_edit(self.target, edit, x, y, self.keep, lr, lam, self.chance, cfg)
                dev = ce_by_language(self.target, self.dev, edit)
                grid.append({"lr": lr, "lam": lam, "dev": dev, "edit": edit})
        best = grid[best_point([g["dev"][cfg.remove] - self.base_dev[cfg.remove] for g in grid],
                               [g["dev"][cfg.keep] - self.base_dev[cfg.keep] for g in grid],
                               self.chance - self.base_dev[cfg.remove], cfg.max_damage)]
        test = ce_by_language(self.target, self.test, best["edit"])
        row = {"method": method, "n": n, "seed": seed, "lr": best["lr"], "lam": best["lam"], "test": test,
               "damage": test[cfg.keep] - self.base_test[cfg.keep],
               "progress": (test[cfg.remove] - self.base_test[cfg.remove])
                           / (self.chance - self.base_test[cfg.remove]),
               "dev_grid": [{k: g[k] for k in ("lr", "lam", "dev")} for g in grid],
               "seconds": time.perf_counter() - t0}
        if isinstance(best["edit"], ScalarEdit):
            row["prefactors"] = best["edit"].prefactors()
        if n == cfg.save_budget and seed == 0 and not ci_gated(best["edit"]):  # it needs the decomposition
            save_edited(os.path.join(cfg.out_dir, f"edited_{method}.pt"), bake(best["edit"], self.target))
        return row

    def costs(self, analysis: dict, front: dict) -> dict:
        """Tokens of the language to remove and FLOPs: of the decomposition (its training), its analysis and
        frontier, one edit; per method the parameters trained and the inference FLOPs per token over the
        target's, as deployed (baked where it can be; a CI gate with the decomposition's CI function beside
        it)."""
        cfg, vcfg = self.cfg, self.vcfg
        meta = os.path.join(self.tcfg.dataset, "meta.json")  # the decomposition's data, not the edit's text
        share = json.load(open(meta)).get("train_share", {}).get(cfg.remove) if os.path.exists(meta) else None
        dec_tokens = vcfg.steps * vcfg.batch_size * cfg.decomposition_processes * self.tcfg.seq_len
        x = self.val[cfg.remove][:vcfg.batch_size, :-1]            # one process's batch, or what there is
        with torch.enable_grad():  # vpd's own count: the four losses, the adversary's steps, the backward
            dec_step = vpd.measure_step(self.dec, vcfg, x)[1]
        xr, yr = budget_batch(self.train, cfg.save_budget, cfg.seq_len, 0, cfg.device)
        grid = len(cfg.scalar_lrs) * len(cfg.lambdas)
        one_step = dataclasses.replace(cfg, steps=1)
        edit_step = flops_of(lambda: train_edit(self.target, self.edit_for("one", analysis, front, 0), xr, yr,
                                                self.keep, 0.1, 1.0, self.chance, one_step))
        probe, methods = self.test[cfg.keep][:2, :-1], {}
        with torch.no_grad():
            target_flops = flops_of(lambda: self.target(probe))
            for method in cfg.methods:
                edit = self.edit_for(method, analysis, front, 0)
                deployed = (applied(edit, self.target) if ci_gated(edit)
                            else nullcontext(bake(edit, self.target)))
                with deployed as model:
                    methods[method] = {"parameters": sum(p.numel() for p in edit.parameters()),
                                       "inference": flops_of(lambda: model(probe)) / target_flops}
        return {"decomposition_tokens": dec_tokens,
                "decomposition_remove_tokens": dec_tokens * share if share else None,
                "decomposition_flops": dec_step * dec_tokens / self.tcfg.seq_len / len(x),
                "analysis_tokens": sum(w[:, :-1].numel() for w in self.val.values()),
                "analysis_remove_tokens": self.val[cfg.remove][:, :-1].numel(),
                "analysis_flops": flops_of(lambda: component_stats(self.dec, self.val, cfg.fire_threshold)),
                "frontier_remove_tokens": front["remove_tokens"], "frontier_seconds": front["seconds"],
                "edit_remove_tokens": cfg.save_budget, "edit_flops": edit_step * cfg.steps * grid,
                "edit_flops_note": f"one method at n = {cfg.save_budget}: {cfg.steps} steps x {grid} grid "
                                   "points",
                "methods": methods}


def sweep(cfg: EditConfig):
    unknown = [m for m in cfg.methods if not METHOD.fullmatch(m)]
    if unknown:  # before minutes of loading text and analysing components
        raise ValueError(f"unknown methods {unknown}: see METHOD in edit.py")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ed = Editing(cfg)
    decode = models.token_decoder(cfg.tokenizer, ed.vocab)
    inputs = ed.inputs()
    analysis = resumable(os.path.join(cfg.out_dir, "components.json"), inputs, lambda: ed.analyse(decode))
    print(f"Goodfire's pick {analysis['chosen']} ({analysis['labels'][analysis['chosen']]})"
          + ("" if analysis["chosen_is_only"] else
             f"; none of the top {cfg.top_k} is labelled {cfg.remove}-only"))
    front = resumable(os.path.join(cfg.out_dir, "frontier.json"), inputs, lambda: ed.frontier(analysis))
    for form, b in front["best"].items():
        print(f"frontier, {form}: {b['key']} ({b['label']}, rank {b['rank']}) at m = {b['m']:g}: "
              f"{cfg.remove} {b['remove']:+.2f} ({b['remove'] / front['gap']:.0%} of the way to chance), "
              f"{cfg.keep} {b['keep']:+.3f}")
    for method in cfg.methods:  # a method that cannot be built fails before any cell
        ed.edit_for(method, analysis, front, 0)
    results = os.path.join(cfg.out_dir, "results.jsonl")
    done = set()
    if os.path.exists(results):  # resumable: skip what is done (a torn last line is dropped)
        with open(results) as f:
            rows = [json.loads(line) for line in f if line.endswith("}\n")]
        done = {(r["method"], r["n"], r["seed"]) for r in rows}
        with open(results + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(results + ".tmp", results)
    todo = [(m, n, s) for n in cfg.budgets for s in cfg.seeds for m in cfg.methods if (m, n, s) not in done]
    for method, n, seed in tqdm(todo, desc="edits", dynamic_ncols=True):
        row = ed.cell(method, n, seed, analysis, front)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"{method:>16} n {n:5d} seed {seed}: {cfg.remove} CE {row['test'][cfg.remove]:.3f} "
                   f"({row['progress']:.0%} to chance), {cfg.keep} {row['damage']:+.3f}, lr {row['lr']:g} "
                   f"λ {row['lam']:g}")
    summarise(cfg, ed, analysis, front,  # methods=[] screens only: no edits, no results.jsonl
              [json.loads(line) for line in open(results)] if os.path.exists(results) else [])


# -----------------------------------------------------------------------------
# §6 The summary: summary.json (notebooks/editing.py tabulates and draws it) and the frontier's figure

def summarise(cfg: EditConfig, ed: Editing, analysis: dict, front: dict, rows: list):
    """Per method and budget the mean over seeds and, per method, the tokens to chance, into summary.json with
    the costs; a table of them on the terminal; frontier.png."""
    base, chance, methods = ed.base_test, ed.chance, {}
    for method in cfg.methods:
        by_n, methods[method] = {}, {"by_n": {}, "tokens_to_chance": None}
        for r in rows:
            if r["method"] == method and r["n"] in cfg.budgets:
                by_n.setdefault(r["n"], []).append(r)
        for n in sorted(by_n):
            mean = {lang: float(np.mean([r["test"][lang] for r in by_n[n]])) for lang in by_n[n][0]["test"]}
            damage = mean[cfg.keep] - base[cfg.keep]
            progress = (mean[cfg.remove] - base[cfg.remove]) / (chance - base[cfg.remove])
            methods[method]["by_n"][n] = {"ce": mean, "damage": damage, "progress": progress,
                                          "seeds": len(by_n[n]),
                                          "prefactors": [r.get("prefactors") for r in by_n[n]]}
            at_chance = progress >= cfg.chance_fraction and damage <= cfg.max_damage
            if methods[method]["tokens_to_chance"] is None and at_chance:
                methods[method]["tokens_to_chance"] = n
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump({"ckpt": cfg.ckpt, "base_test": base, "chance": chance, "remove": cfg.remove,
                   "keep": cfg.keep, "max_damage": cfg.max_damage, "methods": methods,
                   "cost": ed.costs(analysis, front),
                   "frontier_best": front["best"], "goodfire_pick": analysis["chosen"]}, f, indent=1)
    print(f"test split, mean over seeds: share of the way to chance, {cfg.keep} damage; tokens to chance")
    for method, s in methods.items():
        cells = "  ".join(f"n={n} {v['progress']:.0%} {v['damage']:+.3f}" for n, v in s["by_n"].items())
        print(f"{method:>16}: {cells}  | {s['tokens_to_chance'] or 'not reached'}")
    draw_frontier(cfg, analysis, front)
    print(f"wrote {cfg.out_dir}/summary.json, results.jsonl, components.json, frontier.json, frontier.png")


def draw_frontier(cfg: EditConfig, analysis: dict, front: dict):
    """The gain on the language to remove against the keep language's damage, a dot per subcomponent at its
    best m, one panel per gate; Goodfire's pick and the frontier's best marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {f"{cfg.remove}-only": "C3", "foreign": "C1", "general": "C7", f"{cfg.keep}-only": "C0"}
    fig, axes = plt.subplots(1, len(FORMS), figsize=(5.2 * len(FORMS), 4.4), sharey=True)
    for ax, form in zip(axes, FORMS):
        entries = [e for e in front["entries"] if e["form"] == form]
        others = iter(("C2", "C4", "C5", "C6", "C8", "C9"))   # the mixed labels, e.g. de+es
        for label in sorted({e["label"] for e in entries}):
            es = [e for e in entries if e["label"] == label]
            ax.scatter([e["keep"] for e in es], [e["remove"] / front["gap"] for e in es], s=9, alpha=0.6,
                       color=colours.get(label) or next(others, "C9"), label=label)
        pick = next(e for e in entries if e["key"] == analysis["chosen"])
        for e, style, name in ((pick, "*", "Goodfire's pick"), (front["best"][form], "o", "best")):
            xy = (e["keep"], e["remove"] / front["gap"])
            right = xy[0] > cfg.max_damage / 2     # write the label towards the panel's middle
            ax.scatter(*xy, s=160, marker=style, facecolors="none", edgecolors="k")
            ax.annotate(f"{name}: {e['key']}, m = {e['m']:g}", xy, textcoords="offset points", fontsize=7,
                        xytext=(-6 if right else 6, -10 if style == "*" else 6),
                        ha="right" if right else "left")
        ax.axvline(cfg.max_damage, color="k", ls="--", lw=0.8)
        ax.axhline(1.0, color="k", ls=":", lw=0.8)
        ax.set(xlabel=f"{cfg.keep} CE increase (nats, dev)", title=f"gate: {form}")
    axes[0].set_ylabel(f"{cfg.remove} CE increase / gap to chance (dev)")
    axes[0].legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "frontier.png"), dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Entry point: python edit.py config.py [--key=value ...]

if __name__ == "__main__":
    (cfg,) = vpd.configure(sys.argv[1:], EditConfig())
    sweep(cfg)
