"""
models.py: the targets that vpd.py decomposes, their data, and their training.

    python models.py configs/tms_5_2.py        # train and save the TMS 5-2 target
    python models.py configs/resid_mlp1.py

Toy models (METHOD.md §7), whose correct decomposition is known:
- TMS n-m, the toy model of superposition: x̂ = ReLU(W^T W x + b), tied weights, optionally with a
  frozen identity layer between the two matrices;
- the residual MLP ("compressed computation"): 100 sparse features embedded in a 1000-dim residual
  stream, 1-3 residual ReLU MLPs trained to add ReLU(x) to it.
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class TargetConfig:
    model: str = "tms"               # "tms" or "resid_mlp"
    target_path: str = ""            # state dict; "" means out_dir/target.pt. Trained when missing
    target_seed: int = 0
    # toy models
    n_features: int = 5
    feature_prob: float = 0.05       # each feature is active independently with this probability
    n_hidden: int = 2                # TMS bottleneck width m
    identity_layer: bool = False     # TMS-id: a frozen m x m identity between the two matrices
    zero_bias: bool = False          # TMS output bias starts at zero (40-10) instead of nn.Linear's init
    n_layers: int = 1                # residual MLP
    d_embed: int = 1000
    d_mlp: int = 50                  # neurons per residual MLP layer
    # target training
    target_steps: int = 10_000
    target_batch_size: int = 1024
    target_lr: float = 5e-3
    target_weight_decay: float = 0.01
    target_schedule: str = "constant"  # or "cosine"


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


def build_toy(tcfg: TargetConfig) -> nn.Module:
    if tcfg.model == "tms":
        return TMS(tcfg.n_features, tcfg.n_hidden, tcfg.identity_layer, tcfg.zero_bias)
    if tcfg.model == "resid_mlp":
        return ResidualMLP(tcfg.n_features, tcfg.d_embed, tcfg.n_layers, tcfg.d_mlp)
    raise ValueError(f"model must be 'tms' or 'resid_mlp', got {tcfg.model!r}")


def sparse_features(tcfg: TargetConfig, batch_size: int, seed: int, device="cpu", rank: int = 0):
    """get_batch(split, step) -> (x, None): each feature active with probability feature_prob, with a
    value uniform in [0, 1) (TMS) or [-1, 1) (residual MLP). A batch depends only on (seed, split, step,
    rank), so a resumed run sees exactly the batches the interrupted one would have."""
    low = 0.0 if tcfg.model == "tms" else -1.0

    def get_batch(split, step):
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + step * 2 + (split == "val") + 1)
        shape = (batch_size, tcfg.n_features)
        active = torch.rand(shape, generator=g) < tcfg.feature_prob
        values = low + (1 - low) * torch.rand(shape, generator=g)
        return (active * values).to(device), None
    return get_batch


def toy_label(tcfg: TargetConfig, x):
    return x if tcfg.model == "tms" else x + F.relu(x)


def toy_truth(tcfg: TargetConfig, model: nn.Module, device) -> dict:
    """What a correct decomposition finds (METHOD.md §7): probes 0.75·e_i for every feature, the
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


def train_target(tcfg: TargetConfig, path: str, device="cpu") -> nn.Module:
    """Train a toy target (AdamW, MSE to its label) and save its state dict at `path`."""
    torch.manual_seed(tcfg.target_seed)
    model = build_toy(tcfg).to(device)
    tied = isinstance(model, TMS)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not (tied and n == "linear2.weight")]
    opt = torch.optim.AdamW(params, lr=tcfg.target_lr, weight_decay=tcfg.target_weight_decay)
    get_batch = sparse_features(tcfg, tcfg.target_batch_size, tcfg.target_seed + 1, device)
    bar = tqdm(range(tcfg.target_steps), desc=f"training target {tcfg.model}", dynamic_ncols=True)
    for step in bar:
        if tcfg.target_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = tcfg.target_lr * 0.5 * (1 + math.cos(math.pi * step / tcfg.target_steps))
        x, _ = get_batch("train", step)
        # TMS ties the second matrix to the first: linear2.weight = linear1.weight^T in this forward
        out = (torch.func.functional_call(model, {"linear2.weight": model.linear1.weight.T}, (x,)) if tied
               else model(x))
        loss = F.mse_loss(out, toy_label(tcfg, x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == tcfg.target_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3e}")
    if tied:
        model.linear2.weight.data.copy_(model.linear1.weight.data.T)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"saved target to {path} (final train loss {loss.item():.4e})")
    return model


def build(tcfg: TargetConfig, cfg):
    """The target, its data and (toys) its ground truth, for vpd.py. Trains the target when its state
    dict is missing."""
    device = cfg.device
    path = tcfg.target_path or os.path.join(cfg.out_dir, "target.pt")
    if not os.path.exists(path):
        print(f"target {path} not found: training it first (python models.py with this config does the same)")
        train_target(tcfg, path, device)
    model = build_toy(tcfg).to(device)
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except Exception as e:
        raise RuntimeError(f"cannot load the target state dict {path}: {e}") from e
    rank = int(os.environ.get("RANK", 0))
    return model, sparse_features(tcfg, cfg.batch_size, cfg.seed, device, rank), toy_truth(tcfg, model, device)


if __name__ == "__main__":
    import vpd
    argv = sys.argv[1:]
    cfg, tcfg = vpd.configure(argv, vpd.Config(), TargetConfig())
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    train_target(tcfg, tcfg.target_path or os.path.join(cfg.out_dir, "target.pt"), device)
