# %% [markdown]
# # VPD on TMS 5-2, one step at a time
#
# A reading-group walk through the method on the smallest model that has superposition: 5 sparse
# features squeezed through 2 hidden dimensions, x̂ = ReLU(Wᵀ W x + b). We build a decomposition, look at
# one subcomponent, the causal-importance (CI) function and the masks, compute every loss by hand next to
# `vpd.py`'s function, train it until it finds the 5 features, and edit one of them: by hand, then trained on a few examples against LoRA.
#
# Run it as a script (`python notebooks/tms_method.py`, a few minutes on a CPU) or cell by cell in an
# editor that reads `# %%` cells (VS Code, or Jupyter with jupytext). Figures go to `out/notebooks/`.

# %%
import copy
import dataclasses
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # run as a script: save the figures, show nothing
import matplotlib.pyplot as plt
import torch

import edit
import models
import vpd

OUT = os.environ.get("NB_OUT", os.path.join(ROOT, "out", "notebooks"))
STEPS = int(os.environ.get("NB_STEPS", 7000))  # as configs/tms_5_2.py; the tests run a few steps
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## The target
# `models.TMS` ties its two matrices: `linear2.weight = linear1.weightᵀ`. We train it the usual way
# (each feature present with probability 0.05, value U[0, 1), reconstruct the input).

# %%
tcfg = models.TargetConfig(model="tms", n_features=5, n_hidden=2, target_steps=min(STEPS, 3000))
target = models.train_target(tcfg, os.path.join(OUT, "tms_target.pt"))
W = target.linear1.weight.detach()                                   # [2, 5]: one column per feature
print("feature directions (columns of W):\n", W)

# %% [markdown]
# ## Components: W = (V U)ᵀ + Δ
# Each decomposed matrix gets C rank-1 subcomponents: V [d_in, C] reads, U [C, d_out] writes.
# Subcomponent c's weight is the outer product (V[:, c] ⊗ U[c, :])ᵀ; Δ is what they do not yet hold.

# %%
cfg = vpd.Config(modules={"linear1": 20, "linear2": 20}, tie={"linear2": "linear1"}, imp_coeff=3e-3,
                 p_start=2.0, p_end=0.4, steps=STEPS, batch_size=2048, lr=2e-3, eval_interval=STEPS,
                 log_interval=max(1, STEPS // 4), ckpt_interval=STEPS, out_dir=os.path.join(OUT, "tms_run"),
                 device="cpu")
dec = vpd.Decomposition(copy.deepcopy(target), cfg)  # installs the components into its copy
comp = dec.comps["linear1"]
c = 3
piece = torch.outer(comp.V[:, c], comp.U[c]).T                       # [d_out, d_in] = [2, 5]
print("subcomponent 3 of linear1, a rank-1 [2, 5] matrix:\n", piece.detach())
total = (comp.V @ comp.U).T + comp.delta()
print("W == (V U)^T + Δ:", torch.allclose(total, comp.W, atol=1e-6))

# %% [markdown]
# ## Causal importance
# Running the target caches each decomposed matrix's input; the CI function maps them to one score per
# (input, subcomponent). Two leaky hard sigmoids turn scores into CI: the lower one (for masks) is
# clamp(z, 0, 1) in the forward, the upper one (for the minimality loss) leaks above 1. Before training
# the CI is noise.

# %%
probes = 0.75 * torch.eye(5)                                        # one feature on per row
with torch.no_grad():
    dec(probes)
    ci_lower, ci_upper = dec.causal_importance()                     # [5, ΣC] = [5, 40]
print("CI of linear1's subcomponents on the 5 one-hot probes (untrained):\n", dec.split(ci_lower)["linear1"][:, :8])

# %% [markdown]
# ## Masks and the masked forward
# A mask keeps what CI says is needed and ablates the rest at random: m = g + (1 - g) u, u ~ U(0, 1);
# δ ~ U(0, 1) scales Δ. The masked matrix computes Σ_c m_c (x·V_c) U_c + δ Δx. With m = 1 and δ = 1 it
# is W itself.

# %%
x = models.sparse_features(tcfg, 8, seed=1)("train", 0)[0]           # [8, 5]
with torch.no_grad():
    target_out = dec(x)
    g, g_up = dec.causal_importance()
u = torch.rand(8, 40 + 2)                                            # ΣC mask channels, then one δ per matrix
masks = dec.masks(g, u)
m_by_hand = g + (1 - g) * u[:, :40]
print("masks as written:", torch.allclose(torch.cat([masks["linear1"][0], masks["linear2"][0]], -1), m_by_hand))
ones = {n: (torch.ones(8, 20), torch.ones(8)) for n in dec.comps}
print("all-ones masks reproduce the target:", torch.equal(dec.masked(x, ones), target_out))

# %% [markdown]
# ## The losses, by hand and by vpd.py
# - faithfulness: Σ‖Δ‖² / Σ numel(Δ);
# - importance minimality: per subcomponent s_c = Σ (g_up + ε)^p over positions, mean_c = s_c / #positions,
#   L = Σ_c mean_c (1 + β log2(1 + s_c));
# - stochastic reconstruction: the MSE between the masked model (random masks) and the target;
# - adversarial reconstruction: the same with the masks' sources chosen to maximise it.

# %%
deltas = {n: c_.delta() for n, c_ in dec.comps.items()}
faith_hand = sum(d.pow(2).sum() for d in deltas.values()) / sum(d.numel() for d in deltas.values())
print("faithfulness", faith_hand.item(), vpd.faithfulness_loss(deltas).item())
p, beta = 2.0, 0.5
s = (g_up + 1e-12).pow(p).sum(0)
imp_hand = (s / 8 * (1 + beta * torch.log2(1 + s))).sum()
print("minimality  ", imp_hand.item(), vpd.importance_minimality_loss(g_up, p, beta).item())
with torch.no_grad():
    stoch_hand = ((dec.masked(x, masks) - target_out) ** 2).mean()
print("stochastic  ", stoch_hand.item(), vpd.recon_loss(dec.masked(x, masks), target_out, "mse").item())
adversary = vpd.Adversary()
sources = adversary.leaves((8, 42), "cpu")
for _ in range(10):  # projected Adam ascent on the sources: the loss goes up
    loss = vpd.adversarial_recon_loss(dec, x, target_out, g.detach(), sources, cfg)
    adversary.ascend(torch.autograd.grad(loss, [sources])[0], 0.05)
    sources = adversary.leaves((8, 42), "cpu")
print("adversarial after 10 ascent steps", loss.item(), ">= stochastic", stoch_hand.item())

# %% [markdown]
# ## Training finds the features
# `vpd.train` runs the whole loop: faithfulness warm-up, then every step the target, CI, the
# adversary's inner steps, the four losses, one backward, AdamW, the adversary's outer step.

# %%
get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
run_config = {**dataclasses.asdict(cfg), **dataclasses.asdict(tcfg)}  # saved in the checkpoint: what built it
metrics = vpd.train(cfg, copy.deepcopy(target), get_batch, models.toy_truth(tcfg, target, "cpu"), run_config)
print({k: metrics[k] for k in ("mmcs", "ml2r", "ci_error/total", "alive/linear1", "alive/linear2")})
plain, dec, components, _, _ = vpd.load_decomposition(os.path.join(cfg.out_dir, "ckpt.pt"))
ci = vpd.probe_ci(dec, probes)["linear1"]
alive = ci.max(0).values > 0.1
fig, ax = plt.subplots(figsize=(5, 3))
im = ax.imshow(ci[:, alive], vmin=0, vmax=1, cmap="Blues")
ax.set(xticks=range(int(alive.sum())), xticklabels=alive.nonzero()[:, 0].tolist(), xlabel="subcomponent",
       ylabel="feature", title="CI on one-hot probes after training")
fig.colorbar(im)
fig.savefig(os.path.join(OUT, "tms_ci.png"), dpi=100, bbox_inches="tight")

# %% [markdown]
# ## One component edit
# The subcomponent that reads feature 0 is an edit handle: W' = W + (m - 1)(V[:, c] ⊗ U[c, :])ᵀ. Setting
# m = 0 removes feature 0 from the model's output and leaves the other probes (almost) alone.

# %%
_, _, best = vpd.toy_feature_metrics(W, dec.comps["linear1"])
with torch.no_grad():
    before = plain(probes)
    with edit.applied(edit.ScalarEdit(components, [f"linear1:{best[0].item()}"], init=0.0), plain):
        after = plain(probes)
print("output change per probe (rows) and output (columns), m = 0 on feature 0's subcomponent:\n",
      (after - before).round(decimals=3))

# %% [markdown]
# ## A trained edit against LoRA
# Train that scalar on n examples of inputs with feature 0 to drive output 0 to zero (and nothing else), next to a
# rank-1 LoRA on the same matrix. The scalar only rescales x·V[:, c], which is ~0 unless feature 0 is on, so it
# cannot touch inputs without feature 0, however few examples it saw. LoRA's read vector is free: a few examples
# of feature 0 do not pin it there, and inputs without feature 0 move.

# %%
x_test = get_batch("val", 0)[0]
has_0 = x_test[:, 0] > 0
rows = []
for n in (1, 2, 4, 8, 16):
    pool = get_batch("train", n)[0]
    x_remove = pool[pool[:, 0] > 0][:n]
    for name, ed in (("scalar", edit.ScalarEdit(components, [f"linear1:{best[0].item()}"])),
                     ("rank-1 LoRA", edit.LoRA(plain, ["linear1"], 1, seed=n))):
        opt = torch.optim.Adam(ed.parameters(), lr=0.05)
        for _ in range(200):
            with edit.applied(ed, plain):
                loss = plain(x_remove)[:, 0].pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            with edit.applied(ed, plain):
                out = plain(x_test)
            orig = plain(x_test)
        left = (out[has_0, 0].pow(2).sum() / orig[has_0, 0].pow(2).sum()).item()
        rows.append((n, name, left, torch.nn.functional.mse_loss(out[~has_0], orig[~has_0]).item()))
        print(f"n = {n:2d} {name:>12}: energy of output 0 left {left:.3f}, change on inputs without feature 0 {rows[-1][3]:.2e}")
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, marker in (("scalar", "o-"), ("rank-1 LoRA", "s-")):
    ax.plot(*zip(*[(n, hurt) for n, nm, _, hurt in rows if nm == name]), marker, label=name)
ax.set(xscale="log", yscale="log", xlabel="training inputs with feature 0", ylabel="MSE on inputs without it",
       title="what the edit changes where it should not")
ax.legend()
fig.savefig(os.path.join(OUT, "tms_edit.png"), dpi=100, bbox_inches="tight")
