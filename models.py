"""
models.py: the targets that vpd.py decomposes, their data, and their training. It imports nothing of
vpd.py: vpd.py trains a target here when its state dict is missing (train_target), then decomposes it.

Toy models, whose correct decomposition is known:
- TMS n-m, the toy model of superposition: x̂ = ReLU(W^T W x + b), tied weights, optionally with a
  frozen identity layer between the two matrices;
- the residual MLP ("compressed computation"): 100 sparse features embedded in a 1000-dim residual
  stream, 1-3 residual ReLU MLPs trained to add ReLU(x) to it.

Language models: LlamaSimpleMLP (the VPD paper's 4-layer Pile model), with Goodfire's module paths so that their pretrained
state dicts load with strict=True, or any Hugging Face causal LM (`model = "hf:EleutherAI/pythia-14m"`);
token data from random tokens, uint16 memmaps made by data/*/prepare.py, or a Hugging Face dataset with
an `input_ids` column, streamed and sharded by rank.
"""
import glob
import itertools
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class TargetConfig:
    model: str = "tms"               # "tms", "resid_mlp", "llama_simple_mlp", or "hf:" and a Hugging Face causal
                                     # LM's name or local directory (needs transformers; never trained here)
    target_path: str = ""            # state dict; "" means out_dir/target.pt. Trained when missing.
                                     # "wandb:entity/project/runs/id": a W&B run's latest model_step_*.pt
    train_target: bool = True        # False: a missing target file is an error instead
    target_seed: int = 0
    # toy models
    n_features: int = 5
    feature_prob: float = 0.05       # each feature is active independently with this probability
    n_hidden: int = 2                # TMS bottleneck width m
    identity_layer: bool = False     # TMS-id: a frozen m x m identity between the two matrices
    zero_bias: bool = False          # TMS output bias starts at zero (40-10) instead of nn.Linear's init
    n_layers: int = 1                # residual MLP and language model
    d_embed: int = 1000
    d_mlp: int = 50                  # neurons per MLP layer
    # language models
    d_model: int = 768
    n_heads: int = 6
    vocab_size: int = 50277
    seq_len: int = 512
    dataset: str = "random"          # "random" tokens, a directory with train.bin / val.bin
                                     # (data/*/prepare.py), or a Hugging Face dataset with `input_ids`
    train_split: str = "train"
    val_split: str = "val"
    # target training
    target_steps: int = 10_000
    target_batch_size: int = 1024
    target_lr: float = 5e-3
    target_weight_decay: float = 0.01
    target_schedule: str = "constant"  # or "cosine" (to 0.1x for language models, after the warm-up)
    target_warmup: int = 0


# -----------------------------------------------------------------------------
# Toy models

class TMS(nn.Module):
    """x̂ = ReLU(W^T W x + b) with W [n_hidden, n_features]. linear2.weight is tied to linear1.weight^T
    while the target trains (see train_target); the decomposition treats the two matrices separately."""

    def __init__(self, n_features, n_hidden, identity_layer=False, zero_bias=False):
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)
        # made last so that -id targets start from the same random init as their plain twins
        self.hidden = nn.Linear(n_hidden, n_hidden, bias=False) if identity_layer else None
        if identity_layer:
            nn.init.eye_(self.hidden.weight)
            self.hidden.weight.requires_grad_(False)  # frozen: the decomposition must find it anyway
        if zero_bias:
            nn.init.zeros_(self.linear2.bias)
        self.linear2.weight.data.copy_(self.linear1.weight.data.T)

    def forward(self, x):  # [B, n_features]
        h = self.linear1(x)
        if self.hidden is not None:
            h = self.hidden(h)
        return F.relu(self.linear2(h))


class ResidualMLP(nn.Module):
    """x [B, n_features] -> embed with a fixed random unit-norm W_E [n_features, d_embed] -> n_layers of
    resid += mlp_out(ReLU(mlp_in(resid))) -> unembed with W_E^T. No biases."""

    def __init__(self, n_features, d_embed, n_layers, d_mlp):
        super().__init__()
        W_E = torch.randn(n_features, d_embed)
        self.W_E = nn.Parameter(W_E / W_E.norm(dim=1, keepdim=True), requires_grad=False)
        self.layers = nn.ModuleList(nn.ModuleDict({"mlp_in": nn.Linear(d_embed, d_mlp, bias=False),
                                                   "mlp_out": nn.Linear(d_mlp, d_embed, bias=False)})
                                    for _ in range(n_layers))

    def forward(self, x):
        resid = x @ self.W_E                                        # [B, d_embed]
        for layer in self.layers:
            resid = resid + layer["mlp_out"](F.relu(layer["mlp_in"](resid)))
        return resid @ self.W_E.T                                   # [B, n_features]


# -----------------------------------------------------------------------------
# Language model: LlamaSimpleMLP, the VPD paper's Pile model. Module paths match Goodfire's checkpoints.

def rope(x, base=10000.0):
    """Rotary position embedding over the whole head, half-split pairs (i, i + D/2), as Goodfire's
    checkpoints were trained with: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). x [B, H, T, D]."""
    T, D = x.shape[-2:]
    freqs = base ** (-torch.arange(D // 2, device=x.device, dtype=torch.float32) / (D // 2))
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs  # [T, D/2]
    cos, sin = angles.cos().repeat(1, 2), torch.cat([-angles.sin(), angles.sin()], -1)  # [T, D]
    # with x.roll = (x2, x1): two products and no cat of the halves (the CPU benchmark's step 1.6% faster)
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(D // 2, -1), sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False)
                                                              for _ in range(4))

    def forward(self, x):  # [B, T, d]
        B, T, d = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, d_model, d_mlp):
        super().__init__()
        self.c_fc, self.down_proj = nn.Linear(d_model, d_mlp, bias=False), nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class LlamaBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_mlp):
        super().__init__()
        self.rms_1, self.attn = nn.RMSNorm(d_model, eps=1e-6), Attention(d_model, n_heads)
        self.rms_2, self.mlp = nn.RMSNorm(d_model, eps=1e-6), MLP(d_model, d_mlp)

    def forward(self, x):
        x = x + self.attn(self.rms_1(x))
        return x + self.mlp(self.rms_2(x))


class LlamaSimpleMLP(nn.Module):
    """Pre-norm decoder: RoPE attention over whole heads, GELU (tanh) MLP, RMSNorm, no biases, tied
    embedding and unembedding. tokens [B, T] -> logits [B, T, vocab]."""
    vocab_multiple = 64  # the logits matmul runs on the vocabulary padded to this (see forward)

    def __init__(self, vocab_size, d_model, n_layers, n_heads, d_mlp):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.h = nn.ModuleList(LlamaBlock(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_f = nn.RMSNorm(d_model, eps=1e-6)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied (the state dict still lists both names)
        for name, p in self.named_parameters():  # GPT-2 init; residual-stream writers scaled down
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens):
        x = self.wte(tokens)                                        # [B, T, d]
        for block in self.h:
            x = block(x)
        x, W = self.ln_f(x), self.lm_head.weight  # tied to wte, so never decomposed (vpd.find_matrices)
        pad = -len(W) % self.vocab_multiple
        if not pad:
            return self.lm_head(x)                                  # [B, T, vocab]
        # an odd vocabulary (50,277) makes every logits matmul misaligned: on an H200, [4096, 768] x [768, V]
        # forward and backward took 152 ms at V = 50,277 and 1.35 ms at 50,304. So the matmul writes
        # logits for zero rows up to a multiple of 64, and the vocabulary's are a view of them
        return F.linear(x, F.pad(W, (0, 0, 0, pad)))[..., :len(W)]  # [B, T, vocab]


def token_batches(tcfg: TargetConfig, batch_size: int, seed: int, device="cpu", rank=0, world=1):
    """get_batch(split, step) -> (tokens [B, T], next-token labels [B, T]; -1 where unknown).
    "random": uniform random tokens. A directory: nanoGPT-style uint16 memmaps train.bin / val.bin,
    random windows. Else a Hugging Face dataset of pre-tokenized rows (`input_ids`), streamed, with
    each rank reading its own shard. Batches depend only on (seed, split, step, rank)."""
    T = tcfg.seq_len

    def to_device(rows):  # rows [B, T + 1] int64: inputs, then labels shifted by one
        rows = rows.to(device, non_blocking=True)
        return rows[:, :T], rows[:, 1:]

    if tcfg.dataset == "random":
        return lambda split, step: to_device(torch.randint(tcfg.vocab_size, (batch_size, T + 1),
                                                           generator=batch_generator(seed, rank, split, step)))

    if any(os.path.exists(os.path.join(tcfg.dataset, f)) for f in ("train.bin", "prepare.py")):  # our data/*
        meta = os.path.join(tcfg.dataset, "meta.json")  # vocab_size: remapped tokens; row_len: whole rows
        meta = json.load(open(meta)) if os.path.exists(meta) else {}
        if meta.get("vocab_size", 0) > tcfg.vocab_size:
            raise ValueError(f"{tcfg.dataset} was prepared with a vocabulary of {meta['vocab_size']} tokens but "
                             f"vocab_size={tcfg.vocab_size}")
        row_len = meta.get("row_len")  # the Pile's rows are unrelated: windows start at a row, stay in it
        if row_len and row_len < T:
            raise ValueError(f"{tcfg.dataset} holds rows of {row_len} tokens, fewer than seq_len={T}")
        n = min(T + 1, row_len or T + 1)  # tokens per window; a row of exactly T has no label at its end

        def get_batch(split, step):
            path = os.path.join(tcfg.dataset, f"{split}.bin")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: run python {os.path.join(tcfg.dataset, 'prepare.py')}")
            data = np.memmap(path, dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT (no leak)
            if not row_len and len(data) < T + 2:
                raise ValueError(f"{path} holds {len(data)} tokens; windows of seq_len + 1 = {T + 1} "
                                 f"need at least {T + 2}")
            g = batch_generator(seed, rank, split, step)
            starts = (torch.randint(len(data) // row_len, (batch_size,), generator=g) * row_len if row_len
                      else torch.randint(len(data) - T - 1, (batch_size,), generator=g))
            rows = torch.full((batch_size, T + 1), -1)
            for b, i in enumerate(starts.tolist()):
                rows[b, :n] = torch.from_numpy(data[i:i + n].astype(np.int64))
            return to_device(rows)
        return get_batch

    import datasets  # streamed rows; a resumed or evaluating reader skips to the rows of its step
    from datasets.distributed import split_dataset_by_node
    streams = {}

    def get_batch(split, step):
        name = tcfg.train_split if split == "train" else tcfg.val_split
        if streams.get(split, (None,))[0] != step:
            try:
                ds = datasets.load_dataset(tcfg.dataset, split=name, streaming=True)
            except Exception as e:
                raise RuntimeError(f"cannot open dataset {tcfg.dataset!r} split {name!r}: {e}") from e
            if "input_ids" not in (ds.column_names or ["input_ids"]):
                raise ValueError(f"dataset {tcfg.dataset!r} has no `input_ids` column (columns: {ds.column_names})")
            # this rank's rows from the step on (not ds.skip: where the shards do not divide among the ranks,
            # datasets skips rows of the whole stream before taking every world-th one)
            streams[split] = (step, itertools.islice(iter(split_dataset_by_node(ds, rank, world)), step * batch_size, None))
        it = streams[split][1]
        rows = [row["input_ids"][:T + 1] for row in itertools.islice(it, batch_size)]
        if len(rows) < batch_size:
            raise ValueError(f"dataset {tcfg.dataset!r} split {name!r} ran out of rows at step {step}")
        if min(map(len, rows)) < T:
            raise ValueError(f"dataset {tcfg.dataset!r} has rows of {min(map(len, rows))} tokens, fewer than "
                             f"seq_len={T}")
        streams[split] = (step + 1, it)
        # the Pile's rows hold exactly T tokens: the last position has no next token (label -1)
        return to_device(torch.tensor([r + [-1] * (T + 1 - len(r)) for r in rows]))
    return get_batch


# -----------------------------------------------------------------------------
# Text per language (edit.py and the notebooks): token files per split, or a streamed Hugging Face dataset

SPLITS = ("val", "dev", "test", "train")


def language_splits(lang: str, data: str, sources: dict, tokenizer: str, split_tokens: int) -> dict:
    """{split: token ids [N]} of one language: the {split}_{lang}.bin files in `data` (data/fortunes/prepare.py), or
    for a language of `sources` ({lang: "dataset[:subset]"}) a Hugging Face dataset streamed in order, its first
    split_tokens tokens the val split, the next dev, then test, then train (rows with `input_ids` as they are,
    `text` through the tokenizer "hf:<name or dir>", each document ending with its <eos>)."""
    if lang not in sources:
        paths = {s: os.path.join(data, f"{s}_{lang}.bin") for s in SPLITS}
        for path in paths.values():
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: one token file per split and language "
                                        "({val,dev,test,train}_<lang>.bin), as data/fortunes/prepare.py writes them, "
                                        "is read, or a language named in `sources` is streamed")
        return {s: torch.from_numpy(np.fromfile(p, dtype=np.uint16).astype(np.int64)) for s, p in paths.items()}
    import datasets
    name, _, subset = sources[lang].partition(":")
    ids, need, tok = [], split_tokens * len(SPLITS), None
    for row in datasets.load_dataset(name, subset or None, split="train", streaming=True):
        if "input_ids" in row:
            ids += row["input_ids"]
        else:
            if tok is None:
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(tokenizer.removeprefix("hf:"))
            ids += tok(row["text"])["input_ids"] + [tok.eos_token_id]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"{sources[lang]} holds {len(ids):,} tokens, fewer than 4 splits x split_tokens={split_tokens:,}")
    return dict(zip(SPLITS, torch.tensor(ids[:need]).split(split_tokens)))


def windows(tokens: torch.Tensor, n: int, T: int, generator=None) -> torch.Tensor:
    """n windows [n, T + 1] of a token stream (inputs, then the labels one further): evenly spaced over
    the stream, or at random places when a generator is given."""
    if len(tokens) < T + 1:
        raise ValueError(f"a token file of {len(tokens)} tokens holds no window of {T + 1}")
    starts = (torch.randint(len(tokens) - T, (n,), generator=generator) if generator is not None
              else torch.linspace(0, len(tokens) - T - 1, n).long())
    return tokens[starts[:, None] + torch.arange(T + 1)]


def token_decoder(tokenizer: str, vocab_size: int):
    """ids -> text, newlines and tabs shown as ⏎ and ⇥: "gpt2" (data/fortunes' truncated BPE), "hf:<name or dir>",
    or "ids" (the numbers)."""
    if tokenizer == "gpt2":
        import importlib.util
        where = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fortunes", "prepare.py")
        spec = importlib.util.spec_from_file_location("fortunes_prepare", where)
        prepare = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prepare)
        decode = prepare.gpt2_encoding(vocab_size).decode
    elif tokenizer.startswith("hf:"):
        from transformers import AutoTokenizer
        decode = AutoTokenizer.from_pretrained(tokenizer[3:]).decode
    else:
        return lambda ids: " ".join(map(str, ids))
    return lambda ids: decode(ids).replace("\n", "⏎").replace("\t", "⇥")


def build_model(tcfg: TargetConfig) -> nn.Module:
    """The target's architecture, freshly initialised (a Hugging Face model: with its pretrained weights)."""
    if tcfg.model.startswith("hf:"):
        return hf_causal_lm(tcfg.model.removeprefix("hf:"))
    if tcfg.model == "tms":
        return TMS(tcfg.n_features, tcfg.n_hidden, tcfg.identity_layer, tcfg.zero_bias)
    if tcfg.model == "resid_mlp":
        return ResidualMLP(tcfg.n_features, tcfg.d_embed, tcfg.n_layers, tcfg.d_mlp)
    if tcfg.model == "llama_simple_mlp":
        return LlamaSimpleMLP(tcfg.vocab_size, tcfg.d_model, tcfg.n_layers, tcfg.n_heads, tcfg.d_mlp)
    raise ValueError(f"model must be 'tms', 'resid_mlp', 'llama_simple_mlp' or 'hf:<name>' (as given, not "
                     f"trained here), got {tcfg.model!r}")


def batch_generator(seed: int, rank: int, split: str, step: int) -> torch.Generator:
    """The random stream of one batch: a function of (seed, rank, split, step) only, so a resumed run
    sees exactly the batches the interrupted one would have. torch's CPU generator uses only the low 32
    bits of its seed, so everything fits there: train and validation differ by parity, and ranks (up to
    64) are 2^26 apart, so no two share a batch in a run shorter than 2^25 steps; rank 0 keeps the
    single-process stream."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 2**26 + step * 2 + (split == "val") + 1) % 2**32)


def sparse_features(tcfg: TargetConfig, batch_size: int, seed: int, device="cpu", rank: int = 0):
    """get_batch(split, step) -> (x, None): each feature active with probability feature_prob, with a
    value uniform in [0, 1) (TMS) or [-1, 1) (residual MLP), drawn from batch_generator."""
    low = 0.0 if tcfg.model == "tms" else -1.0

    def get_batch(split, step):
        g = batch_generator(seed, rank, split, step)
        shape = (batch_size, tcfg.n_features)
        active = torch.rand(shape, generator=g) < tcfg.feature_prob
        values = low + (1 - low) * torch.rand(shape, generator=g)
        return (active * values).to(device), None
    return get_batch


def toy_label(tcfg: TargetConfig, x):
    return x if tcfg.model == "tms" else x + F.relu(x)


def toy_truth(tcfg: TargetConfig, model: nn.Module, device) -> dict:
    """What a correct decomposition finds: probes 0.75·e_i for every feature, the
    expected CI pattern of each matrix, and for TMS the feature vectors (columns of linear1)."""
    probes = 0.75 * torch.eye(tcfg.n_features, device=device)
    if tcfg.model == "tms":
        patterns = {"linear1": ("identity", tcfg.n_features), "linear2": ("identity", tcfg.n_features)}
        if tcfg.identity_layer:
            patterns["hidden"] = ("dense", tcfg.n_hidden)
        return {"probes": probes, "patterns": patterns, "features": ("linear1", model.linear1.weight.detach().clone())}
    patterns = {}
    for i in range(tcfg.n_layers):
        patterns[f"layers.{i}.mlp_in"] = ("identity", tcfg.n_features)
        patterns[f"layers.{i}.mlp_out"] = ("dense", tcfg.d_mlp)
    return {"probes": probes, "patterns": patterns}


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, final: float) -> float:
    """A linear warm-up over `warmup` steps, then cosine decay from lr to lr * final at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def target_lr_at(tcfg: TargetConfig, step: int) -> float:
    if tcfg.target_schedule == "constant" and step >= tcfg.target_warmup:
        return tcfg.target_lr
    final = 0.1 if tcfg.model == "llama_simple_mlp" else 0.0
    return warmup_cosine(step, tcfg.target_lr, tcfg.target_warmup, tcfg.target_steps, final)


def train_target(tcfg: TargetConfig, path: str, device="cpu", dtype="float32", compile=False) -> nn.Module:
    """Train a target and save its state dict at `path` (atomically). Toys: MSE to their label. Language
    models: next-token cross-entropy, weight decay on matrices only, gradient clipping at 1, bf16
    autocast and torch.compile when asked (CUDA)."""
    torch.manual_seed(tcfg.target_seed)
    model = build_model(tcfg).to(device)
    lm, tied = tcfg.model == "llama_simple_mlp", isinstance(model, TMS)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not (tied and n == "linear2.weight")]
    wd = tcfg.target_weight_decay
    groups = ([{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}] if lm else params)
    opt = torch.optim.AdamW(groups, lr=tcfg.target_lr, weight_decay=wd)
    if lm:
        get_batch = token_batches(tcfg, tcfg.target_batch_size, tcfg.target_seed + 1, device)
        get_batch("val", 0)  # its CE is printed after training: a missing split fails now, not then
    else:
        get_batch = sparse_features(tcfg, tcfg.target_batch_size, tcfg.target_seed + 1, device)
    forward = torch.compile(model) if compile else model
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bfloat16" and str(device).startswith("cuda"))

    def loss_of(x, y):
        with autocast:
            if lm:
                return F.cross_entropy(forward(x).float().flatten(0, 1), y.flatten(), ignore_index=-1)
            # TMS ties the second matrix to the first: linear2.weight = linear1.weight^T in this forward
            out = (torch.func.functional_call(model, {"linear2.weight": model.linear1.weight.T}, (x,)) if tied
                   else model(x))
            return F.mse_loss(out, toy_label(tcfg, x))

    bar = tqdm(range(tcfg.target_steps), desc=f"training target {tcfg.model}", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = target_lr_at(tcfg, step)
        loss = loss_of(*get_batch("train", step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if lm:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == tcfg.target_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4g}")
    if tied:
        model.linear2.weight.data.copy_(model.linear1.weight.data.T)
    if lm and tcfg.target_steps:
        with torch.no_grad():
            val = sum(loss_of(*get_batch("val", i)).item() for i in range(10)) / 10
        print(f"target trained: cross-entropy {val:.4f} nats on 10 validation batches of {tcfg.target_batch_size} "
              f"(the decomposition's evaluation reports its own, ce/target, on eval_batches x batch_size)")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"saved target to {path}" + (f" (final train loss {loss.item():.4e})" if tcfg.target_steps else ""))
    return model


def download_wandb(run_path: str, pattern=r"model_step_(\d+)\.pt", also=(), out_dir="out/targets") -> str:
    """The latest file of a W&B run ("wandb:entity/project/runs/id") whose name matches `pattern` (its group: the
    step), with the files named in `also` that the run has, downloaded once into out_dir/<project>-<id>/: later
    starts and resumes use the local copy without asking W&B. Returns the latest file's path."""
    entity, project, *_, run_id = run_path.removeprefix("wandb:").split("/")
    root = os.path.join(out_dir, f"{project}-{run_id}")

    def step_of(name):  # model_step_<n>.pt -> n; None for any other file
        found = re.fullmatch(pattern, os.path.basename(name))
        return int(found[1]) if found else None
    have = [f for f in glob.glob(os.path.join(root, "*")) if step_of(f) is not None]
    if have:
        return max(have, key=step_of)
    try:
        import wandb
    except ImportError:
        raise SystemExit(f"{run_path!r} needs wandb: `pip install wandb` and `wandb login` (or set WANDB_API_KEY), or "
                         "download its files yourself and give their local path") from None
    try:
        files = list(wandb.Api().run(f"{entity}/{project}/{run_id}").files())
    except Exception as e:
        raise SystemExit(f"cannot read W&B run {run_path!r} ({e}); check `wandb login` / WANDB_API_KEY and the path")
    steps = [f for f in files if step_of(f.name) is not None]
    if not steps:
        raise SystemExit(f"W&B run {run_path!r} has no file named like {pattern}")
    latest = max(steps, key=lambda f: step_of(f.name))
    os.makedirs(root, exist_ok=True)
    for f in [f for f in files if f.name in also] + [latest]:  # the weights last: their presence says all is here
        f.download(root=root + ".tmp", replace=True)
        os.replace(os.path.join(root + ".tmp", f.name), os.path.join(root, f.name))  # whole or absent
    return os.path.join(root, latest.name)


def hf_causal_lm(name: str) -> nn.Module:
    """A Hugging Face causal LM by Hub name or local directory (save_pretrained), in fp32 (autocast does
    the rest), without a KV cache (a decomposition never generates)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit(f"model='hf:{name}' needs transformers: pip install transformers==5.24.0")
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, use_cache=False)
    except (OSError, ValueError) as e:  # ValueError: a directory without a model's config.json
        raise SystemExit(f"cannot load the Hugging Face model {name!r}: {e}\nOffline, it must be in the local cache "
                         f"already: run once online, or `hf download {name}` (older huggingface_hub: "
                         f"`huggingface-cli download {name}`), or give a directory that save_pretrained wrote, "
                         f"model='hf:/path/to/dir'")


def build(tcfg: TargetConfig, cfg, check=lambda model: None):
    """The target, its data and (toys) its ground truth, for vpd.py. check(model) runs on the model as built,
    before a missing target's state dict is trained."""
    device = cfg.device
    waits = dist.is_initialized() and int(os.environ.get("LOCAL_RANK", 0)) > 0
    if waits:  # one process per machine downloads or trains the target; the others then find it on disk
        dist.barrier()
    hf = tcfg.model.startswith("hf:")
    path = tcfg.target_path or os.path.join(cfg.out_dir, "target.pt")
    if path.startswith("wandb:"):
        path = download_wandb(path)
    model = build_model(tcfg).to(device)  # hf: with its weights, the Hub's (or the directory's), never target_path
    check(model)
    if hf:
        tcfg.vocab_size = model.config.vocab_size  # random tokens and memmap checks: the model's (padded) vocabulary
    elif not os.path.exists(path):
        if not tcfg.train_target:
            raise SystemExit(f"target {path} not found (train_target=False: this config decomposes a given target)")
        print(f"target {path} not found: training it first")
        train_target(tcfg, path, device, cfg.dtype, cfg.compile)
    if dist.is_initialized() and not waits:
        dist.barrier()
    if not hf:
        try:
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True), strict=True)
        except Exception as e:
            raise RuntimeError(f"cannot load the target state dict {path}: {e}") from e
    model.eval()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if hf or tcfg.model == "llama_simple_mlp":
        return model, token_batches(tcfg, cfg.batch_size, cfg.seed, device, rank, world), None
    return model, sparse_features(tcfg, cfg.batch_size, cfg.seed, device, rank), toy_truth(tcfg, model, device)

