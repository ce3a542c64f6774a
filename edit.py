"""
edit.py: edit a model through its parameter components.

A decomposition written by vpd.py rewrites each decomposed matrix as W = Σ_c (V[:, c] ⊗ U[c, :])^T + Δ,
so every subcomponent is an edit handle: a scalar prefactor m_c,

    W' = W + Σ_c (m_c - 1) (V[:, c] ⊗ U[c, :])^T        (Δ and biases untouched)

m = 1 leaves the model as it is, 0 removes the subcomponent, -1 inverts it, m > 1 amplifies it. A
subcomponent is named "<module path>:<c>", e.g. "h.1.attn.v_proj:57".

    python edit.py configs/edit_tms.py --ckpt=out/tms_5_2/ckpt.pt   # the toy edit, seconds
    python edit.py configs/edit_fortunes_quick.py                    # remove German, minutes on a CPU
    python edit.py configs/edit_fortunes.py                          # the full token-budget sweep

Sections: config; §1 edit handles (scalars and LoRA as forward hooks) and baking them into weights;
§2 what each subcomponent does, per language; §3 ranking and the causal screen; §4 the edit objective
and its training; §5 the token-budget sweep; §6 report and figures; §7 the toy edit on TMS; entry point.
Left out on purpose: runtime edits gated by CI, hand-written write vectors, and autointerp (we know every
text's language, so labels come from statistics with thresholds fixed before any edit).
"""
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import models
import vpd

# edit methods: one scalar, the top-k scalars, all "<remove>-only" scalars, a random scalar (a control),
# LoRA of a given rank on all decomposed matrices or on the chosen subcomponent's matrix alone
METHOD = re.compile(r"one|top|only|random|lora([1-9][0-9]*)_(all|matrix)")
METHODS = "one, top, only, random, lora<rank>_all, lora<rank>_matrix"
NAMES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian", "fr": "French"}


@dataclass
class EditConfig:
    ckpt: str = "out/fortunes/ckpt.pt"     # a vpd.py checkpoint: the target and its decomposition
    out_dir: str = "out/edit_fortunes"
    task: str = "language"                 # "language": remove one language; "tms": the toy edit of §7
    device: str = "auto"                   # "auto": cuda when available
    # text: {split}_{lang}.bin uint16 token files in `data` (data/fortunes/prepare.py); splits: train
    # (edit training), val (what components do), dev (hyper-parameters), test (everything reported)
    data: str = "data/fortunes"
    tokenizer: str = "gpt2"                # "gpt2" (data/fortunes' truncated BPE), "hf:<name or dir>", "ids"
    sources: dict = field(default_factory=dict)  # lang -> Hugging Face dataset "name[:subset]", streamed
    split_tokens: int = 200_000            # tokens per split of a streamed language
    languages: list = field(default_factory=lambda: ["en", "de", "es", "it"])
    remove: str = "de"
    keep: str = "en"
    seq_len: int = 64
    # §2 labels, fixed here before any edit is trained; shares are of the mean CI summed over languages
    analysis_windows: int = 200            # held-out windows per language
    fire_threshold: float = 0.1            # a subcomponent fires where its CI exceeds this
    dead_freq: float = 1e-3                # dead: fires on fewer positions than this in every language
    only_share: float = 0.8                # "<lang>-only"
    pair_share: float = 0.8                # "<lang>+<lang>"
    foreign_share: float = 0.1             # "foreign": the keep language's share at most this
    top_k: int = 16                        # ranked by mean CI on `remove` minus on `keep`; screened one by one
    n_contexts: int = 2                    # top-activating contexts per language and ranked subcomponent
    # §4-5 the edits: every method starts from the unedited model, same optimiser, steps and grid size
    methods: list = field(default_factory=lambda: ["one", "top", "only", "random", "lora1_all", "lora4_all",
                                                   "lora1_matrix", "lora4_matrix"])
    budgets: list = field(default_factory=lambda: [2 ** i for i in range(11)])  # supervised tokens to remove
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 100                       # Adam steps per edit
    keep_batch: int = 16                   # windows of the keep language per step, for the KL, taken in turn
    keep_windows: int = 128                # from a fixed set of training windows, their original logits cached
    scalar_lrs: list = field(default_factory=lambda: [0.03, 0.1, 0.3])
    lora_lrs: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    lambdas: list = field(default_factory=lambda: [0.3, 1.0, 3.0])
    eval_windows: int = 128                # dev and test windows per language
    max_damage: float = 0.1                # nats of keep-language CE an edit may cost (selection, tokens to chance)
    chance_fraction: float = 0.95          # "at chance": this far from the base CE to ln(vocabulary)
    save_budget: int = 64                  # the budget whose seed-0 edits are saved and shown
    decomposition_processes: int = 1       # processes the decomposition ran on (torchrun), for its cost
    # §7 the toy edit
    feature: int = 0                       # the TMS feature whose subcomponent is edited
    tms_budgets: list = field(default_factory=lambda: [1, 2, 4, 8, 16])


# -----------------------------------------------------------------------------
# §1 Edit handles

def parse_key(key: str, components: dict):
    """ "<module path>:<c>" -> (path, c), checked against the decomposition."""
    path, _, c = key.rpartition(":")
    if path not in components:
        raise KeyError(f"subcomponent {key!r}: {path!r} is not a decomposed matrix; decomposed: {list(components)}")
    C = components[path]["V"].shape[1]
    if not c.isdigit() or int(c) >= C:
        raise KeyError(f"subcomponent {key!r}: index must be an integer in [0, {C}) for {path}")
    return path, int(c)


class ScalarEdit(nn.Module):
    """One prefactor m_c per chosen subcomponent, starting at 1 (no change). Its low-rank factors per
    matrix: P = V[:, cs] (m - 1) [d_in, k] and Q = U[cs] [k, d_out], so W' = W + (P Q)^T."""

    def __init__(self, components: dict, keys: list, init: float = 1.0):
        super().__init__()
        self.keys, self.m = list(keys), nn.Parameter(torch.full((len(keys),), float(init)))
        chosen = {}  # path -> (positions in m, subcomponent indices)
        for i, (path, c) in enumerate(parse_key(k, components) for k in keys):
            chosen.setdefault(path, ([], []))[0].append(i)
            chosen[path][1].append(c)
        # path -> (positions in m, V[:, cs] [d_in, k], U[cs] [k, d_out]): sliced once, only m is trained
        self.where = {path: (ms, components[path]["V"][:, cs], components[path]["U"][cs])
                      for path, (ms, cs) in chosen.items()}

    def factors(self) -> dict:
        return {path: (V * (self.m[ms] - 1), U) for path, (ms, V, U) in self.where.items()}

    def prefactors(self) -> dict:
        return dict(zip(self.keys, self.m.tolist()))


class LoRA(nn.Module):
    """W' = W + (A B)^T per matrix, A [d_in, r] random, B [r, d_out] zero: no change until B moves."""

    def __init__(self, model: nn.Module, paths: list, rank: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.paths = list(paths)
        shapes = [linear_weight(model.get_submodule(p)).shape for p in self.paths]  # [d_out, d_in]
        self.A = nn.ParameterList(torch.randn(d_in, rank, generator=g) / math.sqrt(d_in) for _, d_in in shapes)
        self.B = nn.ParameterList(torch.zeros(rank, d_out) for d_out, _ in shapes)

    def factors(self) -> dict:
        return {p: (A, B) for p, A, B in zip(self.paths, self.A, self.B)}


@contextmanager
def applied(edit: nn.Module, model: nn.Module):
    """Run `model` with the edit as forward hooks, out += (x P) Q: the weights are never copied, and the
    factors are built once for everything run inside the block."""
    hooks = [model.get_submodule(path).register_forward_hook(lambda mod, inp, out, P=P, Q=Q: out + (inp[0] @ P) @ Q)
             for path, (P, Q) in edit.factors().items()]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """[d_out, d_in]: an nn.Linear's weight, or a Hugging Face Conv1D's (stored [d_in, d_out]) as a view."""
    return layer.weight.T if vpd.is_conv1d(layer) else layer.weight


@torch.no_grad()
def bake(edit: nn.Module, model: nn.Module) -> nn.Module:
    """An ordinary copy of the model with the edit written into its weights, W' = W + (P Q)^T."""
    baked = copy.deepcopy(model)
    for path, (P, Q) in edit.factors().items():
        linear_weight(baked.get_submodule(path)).add_((P @ Q).T)
    return baked


def load_decomposition(path: str, device="cpu"):
    """A vpd.py checkpoint -> (the plain target, its Decomposition on a copy of it, {path: {"V", "U"}},
    the target's config, the decomposition's config). The plain target is what edits are applied to and
    saved from; the decomposition gives CI."""
    ckpt = vpd.load_checkpoint(path, keys=("config", "components", "target", "ci_fn"))  # no optimizer needed
    known = {f.name for f in dataclasses.fields(models.TargetConfig)}
    tcfg = models.TargetConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    target = models.build_model(tcfg)
    target.load_state_dict(ckpt["target"])
    target.to(device).eval().requires_grad_(False)
    known = {f.name for f in dataclasses.fields(vpd.Config)}
    cfg = vpd.Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    dec = vpd.Decomposition(copy.deepcopy(target), cfg)
    vpd.load_decomposition_state(dec, ckpt, path)
    dec.to(device).eval()
    components = {n: {"V": c.V.detach(), "U": c.U.detach()} for n, c in dec.comps.items()}
    return target, dec, components, tcfg, cfg


# -----------------------------------------------------------------------------
# §2 What each subcomponent does, per language

SPLITS = ("val", "dev", "test", "train")


def load_language(cfg: EditConfig, lang: str) -> dict:
    """{split: token ids [N]} of one language: the {split}_{lang}.bin files in cfg.data, or for a language
    of cfg.sources a Hugging Face dataset streamed in order, its first split_tokens tokens the val split,
    the next dev, then test, then train (rows with `input_ids` as they are, `text` through the tokenizer)."""
    if lang not in cfg.sources:
        paths = {s: os.path.join(cfg.data, f"{s}_{lang}.bin") for s in SPLITS}
        for path in paths.values():
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: edit.py reads one token file per split and language "
                                        "({val,dev,test,train}_<lang>.bin), as data/fortunes/prepare.py writes them, "
                                        "or streams a language named in `sources`")
        return {s: torch.from_numpy(np.fromfile(p, dtype=np.uint16).astype(np.int64)) for s, p in paths.items()}
    import datasets
    name, _, subset = cfg.sources[lang].partition(":")
    rows = datasets.load_dataset(name, subset or None, split="train", streaming=True)
    tokenizer = None
    ids, need = [], cfg.split_tokens * len(SPLITS)
    for row in rows:
        if "input_ids" in row:
            ids += row["input_ids"]
        else:
            if tokenizer is None:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer.removeprefix("hf:"))
            ids += tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]  # documents end with <eos>
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"{cfg.sources[lang]} holds {len(ids):,} tokens, fewer than 4 splits x split_tokens={cfg.split_tokens:,}")
    return dict(zip(SPLITS, torch.tensor(ids[:need]).split(cfg.split_tokens)))


def windows(tokens: torch.Tensor, n: int, T: int, generator=None) -> torch.Tensor:
    """n windows [n, T + 1] of a token stream (inputs, then the labels one further): evenly spaced over
    the stream, or at random places when a generator is given."""
    if len(tokens) < T + 1:
        raise ValueError(f"a token file of {len(tokens)} tokens holds no window of {T + 1}")
    starts = (torch.randint(len(tokens) - T, (n,), generator=generator) if generator is not None
              else torch.linspace(0, len(tokens) - T - 1, n).long())
    return tokens[starts[:, None] + torch.arange(T + 1)]


@torch.no_grad()
def component_stats(dec, texts: dict, fire_threshold: float, batch=32):
    """Per language: mean CI per position and firing frequency of every subcomponent, each [L, ΣC]."""
    mean, freq = [], []
    for w in texts.values():
        s, f = 0, 0
        for chunk in w.split(batch):
            dec(chunk[:, :-1])
            ci = dec.causal_importance()[0].flatten(0, -2)            # [B T, ΣC]
            s, f = s + ci.sum(0), f + (ci > fire_threshold).sum(0)
        mean.append(s / w[:, :-1].numel())
        freq.append(f / w[:, :-1].numel())
    return torch.stack(mean), torch.stack(freq)


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


@torch.no_grad()
def top_contexts(dec, texts: dict, indices: list, decode, n: int, width=20, batch=32) -> dict:
    """For each subcomponent in `indices` (of ΣC), its n positions of highest CI in each language,
    decoded as "<lang> (CI): ... [[token]] ...", with `width` tokens before the firing token."""
    found = {i: [] for i in indices}
    for lang, w in texts.items():
        ci = []
        for chunk in w.split(batch):
            dec(chunk[:, :-1])
            ci.append(dec.causal_importance()[0][..., indices])
        ci = torch.cat(ci)                                                # [N, T, k]
        values, flat = ci.flatten(0, 1).topk(min(n, ci.shape[0] * ci.shape[1]), dim=0)  # [n, k]
        for k, i in enumerate(indices):
            for v, f in zip(values[:, k].tolist(), flat[:, k].tolist()):
                t, row = f % ci.shape[1], w[f // ci.shape[1]]
                found[i].append(f"{lang} (CI {v:.2f}): " + decode(row[max(0, t - width):t].tolist()) + "[["
                                + decode(row[t:t + 1].tolist()) + "]]" + decode(row[t + 1:t + 6].tolist()))
    return found


def token_decoder(cfg: EditConfig, vocab_size: int):
    if cfg.tokenizer == "gpt2":  # the truncated GPT-2 BPE that data/fortunes/prepare.py tokenized with
        where = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fortunes", "prepare.py")
        spec = importlib.util.spec_from_file_location("fortunes_prepare", where)
        prepare = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prepare)
        enc = prepare.gpt2_encoding(vocab_size)
        return lambda ids: enc.decode(ids).replace("\n", "⏎")
    if cfg.tokenizer.startswith("hf:"):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer[3:])
        return lambda ids: tok.decode(ids).replace("\n", "⏎")
    return lambda ids: " ".join(map(str, ids))


# -----------------------------------------------------------------------------
# §3 Ranking and the causal screen

@torch.no_grad()
def ce_by_language(model, texts: dict, edit=None, batch=32) -> dict:
    """Mean next-token cross-entropy per language, with the edit applied when one is given."""
    out = {}
    with applied(edit, model) if edit is not None else nullcontext():
        for lang, w in texts.items():
            total = sum(F.cross_entropy(vpd.output_logits(model(c[:, :-1])).float().flatten(0, 1), c[:, 1:].flatten(),
                                        reduction="sum").item() for c in w.split(batch))
            out[lang] = total / w[:, 1:].numel()
    return out


def causal_screen(model, components, keys: list, texts: dict, base: dict) -> dict:
    """CE change per language when one subcomponent alone is ablated (m = 0) or inverted (m = -1)."""
    screen = {}
    for key in tqdm(keys, desc="causal screen", dynamic_ncols=True):
        screen[key] = {}
        for m in (0.0, -1.0):
            ce = ce_by_language(model, texts, ScalarEdit(components, [key], init=m))
            screen[key][f"m={m:g}"] = {lang: ce[lang] - base[lang] for lang in texts}
    return screen


# -----------------------------------------------------------------------------
# §4 The edit objective and its training

def edit_objective(logits_remove, labels_remove, logits_keep, logits_keep_original, lam: float, chance: float):
    """relu(chance - CE on the language to remove) + λ KL(original || edited) on the language to keep:
    German is pushed towards the uniform distribution's CE, ln(vocabulary), and never rewarded beyond it."""
    ce = F.cross_entropy(logits_remove.float().flatten(0, -2), labels_remove.flatten(), ignore_index=-1)
    kl = vpd.recon_loss(logits_keep, logits_keep_original, "kl")
    return F.relu(chance - ce) + lam * kl, ce, kl


def budget_batch(tokens: torch.Tensor, n: int, T: int, seed: int, device="cpu"):
    """ceil(n / T) random windows of the language to remove, labelled on exactly n positions (the last
    ones, which see the most context); the other labels are -1. Returns (x [k, T], y [k, T])."""
    w = windows(tokens, -(-n // T), T, torch.Generator().manual_seed(seed))
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
        loss, _, _ = edit_objective(logits[:len(x_remove)], y_remove, logits[len(x_remove):], keep_logits[i], lam, chance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return edit


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# §5 The token-budget sweep

class Editing:
    """Everything the sweep needs, loaded once: the target, its components, the texts of every split and
    language, the base CE, the ranked subcomponents and the methods' subcomponents."""

    def __init__(self, cfg: EditConfig):
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.target, self.dec, self.components, self.tcfg, self.vcfg = load_decomposition(cfg.ckpt, cfg.device)
        if self.tcfg.model != "llama_simple_mlp" and not self.tcfg.model.startswith("hf:"):
            raise ValueError(f"{cfg.ckpt} decomposes a {self.tcfg.model!r} model; task 'language' edits a language "
                             "model (task='tms' edits TMS)")
        for lang in (cfg.remove, cfg.keep):
            if lang not in cfg.languages:
                raise ValueError(f"{lang!r} must be one of languages={cfg.languages}")
        self.vocab = self.tcfg.vocab_size  # what the logits span (an hf: model's padded rows included)
        self.chance = math.log(self.vocab)  # the uniform distribution's CE
        T, device = cfg.seq_len, cfg.device
        text = {lang: load_language(cfg, lang) for lang in cfg.languages}
        for lang, splits in text.items():
            if max(t.max().item() for t in splits.values()) >= self.vocab:
                raise ValueError(f"{lang} text holds token ids beyond the model's vocabulary of {self.vocab}: "
                                 "it was tokenized for another model")
        self.train = text[cfg.remove]["train"]
        keep = windows(text[cfg.keep]["train"], cfg.keep_windows, T, torch.Generator().manual_seed(0))[:, :-1].to(device)
        with torch.no_grad():
            self.keep = (keep, vpd.output_logits(self.target(keep)))    # what the KL holds the edits to
        self.val = {lang: windows(text[lang]["val"], cfg.analysis_windows, T).to(device) for lang in cfg.languages}
        self.dev = {lang: windows(text[lang]["dev"], cfg.eval_windows, T).to(device) for lang in (cfg.remove, cfg.keep)}
        self.test = {lang: windows(text[lang]["test"], cfg.eval_windows, T).to(device) for lang in cfg.languages}
        self.base_dev = ce_by_language(self.target, self.dev)
        self.base_test = ce_by_language(self.target, self.test)

    def inputs(self) -> dict:
        """What the analysis and every cell depend on: the decomposition (a checksum of V, whatever its path)
        and the settings, but not the methods, budgets and seeds, which a resumed sweep may extend."""
        extendable = {"ckpt", "out_dir", "device", "methods", "budgets", "seeds", "save_budget", "decomposition_processes"}
        return {**{k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in extendable},
                "V_checksum": sum(c["V"].cpu().double().sum().item() for c in self.components.values())}

    def keys(self, indices) -> list:
        flat = [f"{n}:{c}" for n, comp in self.components.items() for c in range(comp["V"].shape[1])]
        return [flat[i] for i in indices]

    def analyse(self, decode) -> dict:
        """Labels, ranking and causal screen, fixed before any edit is trained (components.json)."""
        cfg = self.cfg
        mean, freq = component_stats(self.dec, self.val, cfg.fire_threshold)
        labels = labels_of(mean, freq, cfg.languages, cfg)
        L = cfg.languages.index
        score = mean[L(cfg.remove)] - mean[L(cfg.keep)]
        top = score.topk(cfg.top_k).indices.tolist()
        keys = self.keys(range(len(labels)))
        counts = {}
        for key, label in zip(keys, labels):
            path = key.rpartition(":")[0]
            per_path = counts.setdefault(path, {})
            per_path[label] = per_path.get(label, 0) + 1
        contexts = top_contexts(self.dec, self.val, top, decode, cfg.n_contexts)
        ranked = [{"key": keys[i], "label": labels[i], "score": score[i].item(),
                   "mean_ci": dict(zip(cfg.languages, mean[:, i].tolist())),
                   "freq": dict(zip(cfg.languages, freq[:, i].tolist())), "contexts": contexts[i]} for i in top]
        screen = causal_screen(self.target, self.components, [r["key"] for r in ranked], self.test, self.base_test)
        for r in ranked:
            r["screen"] = screen[r["key"]]
        only = [r["key"] for r in ranked if r["label"] == f"{cfg.remove}-only"]
        alive = [k for k, label in zip(keys, labels) if label != "dead" and k not in {r["key"] for r in ranked}]
        return {"ckpt": cfg.ckpt, "labels": dict(zip(keys, labels)), "label_counts": counts, "ranked": ranked,
                "chosen": only[0] if only else ranked[0]["key"], "chosen_is_only": bool(only), "alive_others": alive}

    def edit_for(self, method: str, analysis: dict, seed: int) -> nn.Module:
        if method == "one":
            return ScalarEdit(self.components, [analysis["chosen"]])
        if method == "top":
            return ScalarEdit(self.components, [r["key"] for r in analysis["ranked"]])
        if method == "only":  # every subcomponent labelled "<remove>-only": the decomposition's German parts together
            only = [k for k, label in analysis["labels"].items() if label == f"{self.cfg.remove}-only"]
            if not only:
                raise ValueError(f"method 'only': no subcomponent is labelled {self.cfg.remove}-only")
            return ScalarEdit(self.components, only)
        if method == "random":  # a control: an alive subcomponent outside the ranked ones, one per seed
            pool = analysis["alive_others"]
            return ScalarEdit(self.components, [pool[torch.randint(len(pool), (1,),
                                                                   generator=torch.Generator().manual_seed(seed)).item()]])
        lora = METHOD.fullmatch(method)
        if lora and lora[1]:
            paths = list(self.components) if lora[2] == "all" else [analysis["chosen"].rpartition(":")[0]]
            return LoRA(self.target, paths, int(lora[1]), seed)
        raise ValueError(f"unknown method {method!r}: {METHODS}")

    def cell(self, method: str, n: int, seed: int, analysis: dict) -> dict:
        """One method at one budget and seed: every grid point trained on the same n tokens, the one chosen
        on dev (most CE on the language to remove with at most max_damage on the keep language), then tested."""
        cfg, t0 = self.cfg, time.perf_counter()
        x, y = budget_batch(self.train, n, cfg.seq_len, seed, cfg.device)
        lrs = cfg.lora_lrs if method.startswith("lora") else cfg.scalar_lrs
        grid = []
        for lr in lrs:
            for lam in cfg.lambdas:
                edit = train_edit(self.target, self.edit_for(method, analysis, seed), x, y, self.keep, lr, lam,
                                  self.chance, cfg)
                dev = ce_by_language(self.target, self.dev, edit)
                grid.append({"lr": lr, "lam": lam, "dev": dev, "edit": edit})
        damage = lambda g: g["dev"][cfg.keep] - self.base_dev[cfg.keep]
        ok = [g for g in grid if damage(g) <= cfg.max_damage] or [min(grid, key=damage)]
        best = max(ok, key=lambda g: (min(g["dev"][cfg.remove], self.chance), -damage(g)))
        test = ce_by_language(self.target, self.test, best["edit"])
        row = {"method": method, "n": n, "seed": seed, "lr": best["lr"], "lam": best["lam"], "test": test,
               "damage": test[cfg.keep] - self.base_test[cfg.keep],
               "progress": (test[cfg.remove] - self.base_test[cfg.remove]) / (self.chance - self.base_test[cfg.remove]),
               "dev_grid": [{k: g[k] for k in ("lr", "lam", "dev")} for g in grid],
               "seconds": time.perf_counter() - t0}
        if isinstance(best["edit"], ScalarEdit):
            row["prefactors"] = best["edit"].prefactors()
        if n == cfg.save_budget and seed == 0:
            # a plain state dict, written atomically: torch.load(path, weights_only=True) into the model class
            path = os.path.join(cfg.out_dir, f"edited_{method}.pt")
            vpd.save_checkpoint(path, bake(best["edit"], self.target).state_dict())
        return row

    def cost(self, analysis) -> dict:
        """German tokens and FLOPs: the decomposition (its training steps), its analysis, and one edit."""
        cfg, vcfg = self.cfg, self.vcfg
        meta = os.path.join(self.tcfg.dataset, "meta.json")  # the decomposition's data, not the edit's text
        share = json.load(open(meta)).get("train_share", {}).get(cfg.remove) if os.path.exists(meta) else None
        dec_tokens = vcfg.steps * vcfg.batch_size * cfg.decomposition_processes * self.tcfg.seq_len
        x = self.val[cfg.remove][:vcfg.batch_size, :-1]                  # one process's batch, or what there is
        with torch.enable_grad():  # vpd's own count: the four losses, the adversary's steps, the backward
            dec_step = vpd.measure_step(self.dec, vcfg, x)[1]
        analysis_flops = flops_of(lambda: component_stats(self.dec, self.val, cfg.fire_threshold))
        xr, yr = budget_batch(self.train, cfg.save_budget, cfg.seq_len, 0, cfg.device)
        one = dataclasses.replace(cfg, steps=1)
        edit_step = flops_of(lambda: train_edit(self.target, self.edit_for("one", analysis, 0), xr, yr,
                                                self.keep, 0.1, 1.0, self.chance, one))
        grid = len(cfg.scalar_lrs) * len(cfg.lambdas)
        return {"decomposition_tokens": dec_tokens, "decomposition_remove_tokens": dec_tokens * share if share else None,
                "decomposition_flops": dec_step * vcfg.steps * vcfg.batch_size * cfg.decomposition_processes / len(x),
                "analysis_tokens": sum(w[:, :-1].numel() for w in self.val.values()),
                "analysis_remove_tokens": self.val[cfg.remove][:, :-1].numel(), "analysis_flops": analysis_flops,
                "edit_remove_tokens": cfg.save_budget, "edit_flops": edit_step * cfg.steps * grid,
                "edit_flops_note": f"one method at n = {cfg.save_budget}: {cfg.steps} steps x {grid} grid points"}


def sweep(cfg: EditConfig):
    unknown = [m for m in cfg.methods if not METHOD.fullmatch(m)]
    if unknown:  # before minutes of loading text and analysing components
        raise ValueError(f"unknown methods {unknown}: {METHODS}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ed = Editing(cfg)
    decode = token_decoder(cfg, ed.vocab)
    path = os.path.join(cfg.out_dir, "components.json")
    analysis = json.load(open(path)) if os.path.exists(path) else None
    inputs = ed.inputs()
    if analysis is not None and analysis.get("inputs") != inputs:  # never mix two sweeps' cells
        old = analysis.get("inputs", {})
        changed = sorted(k for k in {*old, *inputs} if old.get(k) != inputs.get(k))
        raise ValueError(f"{cfg.out_dir} holds a sweep of other inputs (differing: {changed}): give another "
                         "out_dir, or delete its components.json and results.jsonl to start afresh")
    if analysis is None:  # labels are fixed here, before any edit
        analysis = {**ed.analyse(decode), "inputs": inputs}
        with open(path + ".tmp", "w") as f:
            json.dump(analysis, f, indent=1)
        os.replace(path + ".tmp", path)
    print(f"chosen subcomponent {analysis['chosen']} ({analysis['labels'][analysis['chosen']]}); "
          + ("" if analysis["chosen_is_only"] else f"none of the top {cfg.top_k} is labelled {cfg.remove}-only"))
    results = os.path.join(cfg.out_dir, "results.jsonl")
    done = set()
    if os.path.exists(results):  # resumable: skip what is done (a torn last line is dropped)
        with open(results) as f:
            rows = [json.loads(line) for line in f if line.endswith("}\n")]
        done = {(r["method"], r["n"], r["seed"]) for r in rows}
        with open(results + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(results + ".tmp", results)
    for method in cfg.methods:  # "only" with nothing labelled fails before any cell
        ed.edit_for(method, analysis, 0)
    todo = [(m, n, s) for n in cfg.budgets for s in cfg.seeds for m in cfg.methods if (m, n, s) not in done]
    for method, n, seed in tqdm(todo, desc="edits", dynamic_ncols=True):
        row = ed.cell(method, n, seed, analysis)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"{method:>13} n {n:5d} seed {seed}: {cfg.remove} CE {row['test'][cfg.remove]:.3f} "
                   f"({row['progress']:.0%} to chance), {cfg.keep} +{row['damage']:.3f}, lr {row['lr']:g} λ {row['lam']:g}")
    rows = [json.loads(line) for line in open(results)]
    report(cfg, ed, analysis, rows, ed.cost(analysis), decode)


# -----------------------------------------------------------------------------
# §6 Report and figures

def summarise(cfg: EditConfig, rows: list, base: dict, chance: float) -> dict:
    """Per method and budget, the mean over seeds; per method, tokens to chance."""
    table = {}
    for r in rows:
        table.setdefault(r["method"], {}).setdefault(r["n"], []).append(r)
    out = {}
    for method, by_n in table.items():
        out[method] = {"by_n": {}, "tokens_to_chance": None}
        for n in sorted(by_n):
            rs = by_n[n]
            mean = {lang: float(np.mean([r["test"][lang] for r in rs])) for lang in rs[0]["test"]}
            damage = mean[cfg.keep] - base[cfg.keep]
            progress = (mean[cfg.remove] - base[cfg.remove]) / (chance - base[cfg.remove])
            out[method]["by_n"][n] = {"ce": mean, "damage": damage, "progress": progress, "seeds": len(rs),
                                      "prefactors": [r.get("prefactors") for r in rs]}
            if out[method]["tokens_to_chance"] is None and progress >= cfg.chance_fraction and damage <= cfg.max_damage:
                out[method]["tokens_to_chance"] = n
    return out


def report(cfg: EditConfig, ed: Editing, analysis: dict, rows: list, cost: dict, decode):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base, chance, langs = ed.base_test, ed.chance, cfg.languages
    summary = summarise(cfg, rows, base, chance)
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump({"base_test": base, "chance": chance, "methods": summary, "cost": cost}, f, indent=1)
    kinds = sorted({k for counts in analysis["label_counts"].values() for k in counts})
    lines = [f"# Removing {NAMES.get(cfg.remove, cfg.remove)} from {cfg.ckpt}", "",
             f"Test CE before any edit: " + ", ".join(f"{l} {base[l]:.3f}" for l in langs)
             + f"; chance ln {ed.vocab} = {chance:.3f} nats.", "", "## Labels per matrix", "",
             "| matrix | " + " | ".join(kinds) + " |", "| --- " * (len(kinds) + 1) + "|"]
    lines += [f"| {p} | " + " | ".join(str(c.get(k, 0)) for k in kinds) + " |" for p, c in analysis["label_counts"].items()]
    lines += ["", f"## Top {cfg.top_k} by mean CI on {cfg.remove} minus on {cfg.keep}, with the causal screen (test ΔCE)", "",
              "| subcomponent | label | mean CI " + "/".join(langs) + " | m = 0: ΔCE " + "/".join(langs)
              + " | m = -1: ΔCE " + "/".join(langs) + " |", "| --- | --- | --- | --- | --- |"]
    for r in analysis["ranked"]:
        lines.append(f"| `{r['key']}` | {r['label']} | " + "/".join(f"{r['mean_ci'][l]:.3f}" for l in langs) + " | "
                     + " | ".join("/".join(f"{r['screen'][m][l]:+.3f}" for l in langs) for m in ("m=0", "m=-1")) + " |")
    lines += ["", f"Chosen for the one-scalar edit: `{analysis['chosen']}` ({analysis['labels'][analysis['chosen']]})"
              + ("" if analysis["chosen_is_only"] else f"; none of the top {cfg.top_k} is labelled {cfg.remove}-only, "
                 "so the top-ranked one stands in"), "", "Top-activating contexts of the ranked subcomponents:", ""]
    for r in analysis["ranked"][:4]:
        lines += [f"- `{r['key']}` ({r['label']}):"] + [f"  - {c}" for c in r["contexts"]]
    lines += ["", f"## Edits: test CE per language, mean over seeds (tokens to chance: {cfg.chance_fraction:.0%} of the way "
              f"to ln V with {cfg.keep} damage ≤ {cfg.max_damage} nats)", "",
              "| method | n | " + " | ".join(f"{l} CE" for l in langs) + f" | {cfg.keep} damage | to chance | prefactors |",
              "| --- " * (len(langs) + 5) + "|"]
    for method, s in summary.items():
        for n, v in s["by_n"].items():
            pf = ("; ".join(", ".join(f"{m:.2f}" for m in p.values()) for p in v["prefactors"] if p)
                  if method in ("one", "random") else "")  # many scalars: in results.jsonl
            lines.append(f"| {method} | {n} | " + " | ".join(f"{v['ce'][l]:.3f}" for l in langs)
                         + f" | {v['damage']:+.3f} | {v['progress']:.0%} | {pf} |")
    lines += ["", "| method | tokens to chance |", "| --- | --- |"]
    lines += [f"| {m} | {s['tokens_to_chance'] or 'not reached'} |" for m, s in summary.items()]
    lines += ["", "## Cost", "", f"- decomposition: {cost['decomposition_tokens']:,} tokens"
              + (f" (~{cost['decomposition_remove_tokens']:,.0f} {cfg.remove})" if cost["decomposition_remove_tokens"] else "")
              + f", {cost['decomposition_flops']:.3g} FLOPs",
              f"- analysis (labels and ranking): {cost['analysis_tokens']:,} tokens ({cost['analysis_remove_tokens']:,} "
              f"{cfg.remove}), {cost['analysis_flops']:.3g} FLOPs",
              f"- one edit: {cost['edit_remove_tokens']} {cfg.remove} tokens, {cost['edit_flops']:.3g} FLOPs "
              f"({cost['edit_flops_note']})"]
    lines += continuations(cfg, ed, decode)
    with open(os.path.join(cfg.out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (method, s) in enumerate(summary.items()):
        ns = list(s["by_n"])
        axes[0].plot(ns, [s["by_n"][n]["ce"][cfg.remove] for n in ns], "o-", color=f"C{i}", label=method)
        axes[1].plot(ns, [s["by_n"][n]["damage"] for n in ns], "o-", color=f"C{i}", label=method)
    axes[0].axhline(chance, color="k", ls="--", label="chance")
    axes[0].axhline(base[cfg.remove], color="gray", ls=":", label="before")
    axes[1].axhline(cfg.max_damage, color="k", ls="--")
    for ax, title in ((axes[0], f"{cfg.remove} test CE"), (axes[1], f"{cfg.keep} damage (nats)")):
        ax.set(xscale="log", xlabel=f"{cfg.remove} training tokens", title=title)
    axes[0].legend(fontsize=7)
    n_show = min(cfg.budgets, key=lambda n: abs(n - cfg.save_budget))
    width = 0.8 / max(1, len(summary))
    for i, (method, s) in enumerate(summary.items()):
        if n_show in s["by_n"]:
            axes[2].bar(np.arange(len(langs)) + i * width, [s["by_n"][n_show]["ce"][l] - base[l] for l in langs],
                        width, color=f"C{i}", label=method)
    axes[2].set(xticks=np.arange(len(langs)) + 0.4 - width / 2, xticklabels=langs, ylabel="test ΔCE (nats)",
                title=f"change per language at n = {n_show}")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "edits.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {cfg.out_dir}/summary.md, results.jsonl, edits.png")


@torch.no_grad()
def continuations(cfg: EditConfig, ed: Editing, decode, n_prompts=2, prompt_len=16, new=16) -> list:
    """Greedy continuations of a few test prompts per language, before and after the saved one-scalar edit."""
    path = os.path.join(cfg.out_dir, "edited_one.pt")
    if not os.path.exists(path):
        return []
    edited = models.build_model(ed.tcfg)
    edited.load_state_dict(torch.load(path, weights_only=True))
    edited.to(cfg.device).eval()
    lines = ["", f"## Greedy continuations, before → after the one-scalar edit (n = {cfg.save_budget}, seed 0)", ""]
    for lang in (cfg.remove, cfg.keep):
        for w in ed.test[lang][:n_prompts]:
            outs = []
            for model in (ed.target, edited):
                x = w[:prompt_len][None]
                for _ in range(new):
                    x = torch.cat([x, vpd.output_logits(model(x))[:, -1:].argmax(-1)], 1)
                outs.append(decode(x[0, prompt_len:].tolist()))
            lines.append(f"- {lang}: `{decode(w[:prompt_len].tolist())}` → `{outs[0]}` | `{outs[1]}`")
    return lines


# -----------------------------------------------------------------------------
# §7 The toy edit: one feature of TMS 5-2

def tms_demo(cfg: EditConfig):
    """Suppress, invert and amplify the subcomponent of one TMS feature, and show that only inputs with
    that feature move; then train its scalar against a rank-1 LoRA on a few examples. Returns the edited
    subcomponent's key, {m: output change [probe, output]} and the rows (n, method, energy left, change)."""
    target, dec, components, tcfg, _ = load_decomposition(cfg.ckpt)  # a toy: the CPU
    if tcfg.model != "tms":
        raise ValueError(f"{cfg.ckpt} decomposes a {tcfg.model!r} model; task 'tms' edits a TMS decomposition")
    j, n_features = cfg.feature, tcfg.n_features
    if not 0 <= j < n_features:
        raise ValueError(f"feature must be in [0, {n_features}), got {j}")
    _, _, best = vpd.toy_feature_metrics(target.linear1.weight, dec.comps["linear1"])
    key = f"linear1:{best[j].item()}"                                # reads feature j, writes its hidden vector
    V = components["linear1"]["V"][:, best[j]]
    probes = 0.75 * torch.eye(n_features)                            # one feature on per row
    os.makedirs(cfg.out_dir, exist_ok=True)
    lines = [f"feature {j}: subcomponent {key}; its read vector V[:, c] = "
             + ", ".join(f"{v:+.3f}" for v in V.tolist()) + " (it reads feature j alone)"]
    with torch.no_grad():
        before = target(probes)
        moved = {}
        for m in (0.0, -1.0, 2.0):
            with applied(ScalarEdit(components, [key], init=m), target):
                moved[m] = target(probes) - before                    # [probe, output]
            others = moved[m][torch.arange(n_features) != j].abs().max().item()
            lines.append(f"m = {m:+g}: output {j} on probe {j} moves {moved[m][j, j]:+.3f}; "
                         f"largest change on the other {n_features - 1} probes {others:.1e}")
    # trained on n examples of what to remove and nothing else: drive feature j's output to 0
    get_batch = models.sparse_features(tcfg, 4096, seed=123)
    x_test = get_batch("val", 0)[0]
    has_j = x_test[:, j] > 0
    lines.append(f"\ntrained on n inputs with feature {j} alone (no examples of what to keep): the energy of "
                 f"output {j} left on test inputs with it, and the change on test inputs without it (MSE)")
    rows = []
    for n in cfg.tms_budgets:
        pool = get_batch("train", n)[0]
        x_remove = pool[pool[:, j] > 0][:n]
        for name, edit in (("scalar", ScalarEdit(components, [key])), ("rank-1 LoRA", LoRA(target, ["linear1"], 1, n))):
            opt = torch.optim.Adam(edit.parameters(), lr=0.05)
            for _ in range(200):
                with applied(edit, target):
                    loss = target(x_remove)[:, j].pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad(), applied(edit, target):
                out = target(x_test)
            with torch.no_grad():
                orig = target(x_test)
            left = (out[has_j, j].pow(2).sum() / orig[has_j, j].pow(2).sum()).item()
            hurt = F.mse_loss(out[~has_j], orig[~has_j]).item()
            rows.append((n, name, left, hurt))
            lines.append(f"n = {n:3d} {name:>12}: energy left {left:.3f}, change without feature {j} {hurt:.2e}")
    lines.append(f"\nThe scalar only rescales x·V[:, c], which is ~0 unless feature {j} is on, so it cannot touch "
                 "inputs without it, however little data it sees. LoRA's read vector is free: a few examples of "
                 f"feature {j} do not pin it there.")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(cfg.out_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    lim = max(v.abs().max().item() for v in moved.values())
    for ax, (m, d) in zip(axes, moved.items()):
        im = ax.imshow(d, cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set(title=f"m = {m:+g}: output change", xlabel="output", ylabel="probe (one feature on)",
               xticks=range(n_features), yticks=range(n_features))
    fig.colorbar(im, ax=axes[:3], shrink=0.8)
    for name, marker in (("scalar", "o-"), ("rank-1 LoRA", "s-")):
        pts = [(n, hurt) for n, nm, _, hurt in rows if nm == name]
        axes[3].plot(*zip(*pts), marker, label=name)
    axes[3].set(xscale="log", yscale="log", xlabel=f"training inputs with feature {j}",
                title=f"change on inputs without feature {j}")
    axes[3].legend()
    fig.savefig(os.path.join(cfg.out_dir, "tms_edit.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return key, moved, rows


# -----------------------------------------------------------------------------
# Entry point: python edit.py config.py [--key=value ...]

if __name__ == "__main__":
    (cfg,) = vpd.configure(sys.argv[1:], EditConfig())
    if cfg.task not in ("language", "tms"):
        raise SystemExit(f"task must be 'language' or 'tms', got {cfg.task!r}")
    tms_demo(cfg) if cfg.task == "tms" else sweep(cfg)
