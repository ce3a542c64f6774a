# %% [markdown]
# # A decomposed language model: the offline demo
#
# What `python vpd.py configs/fortunes.py` produced: a 2-layer LlamaSimpleMLP trained on fortune cookies
# in English, German, Spanish and Italian, decomposed into 2,048 subcomponents over its 12 matrices. We
# look at the training curves, how many subcomponents each position needs (L0) per layer, how dense CI
# is, how many subcomponents are alive, and what single subcomponents do in each language.
#
# Needs `python data/fortunes/prepare.py && python vpd.py configs/fortunes.py` first (about 12 minutes on
# 2 CPU cores). Run as a script or cell by cell; figures go to `out/notebooks/`.

# %%
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

import edit
import models
import vpd

CKPT = os.environ.get("NB_CKPT", os.path.join(ROOT, "out", "fortunes", "ckpt.pt"))
DATA = os.environ.get("NB_DATA", os.path.join(ROOT, "data", "fortunes"))
OUT = os.environ.get("NB_OUT", os.path.join(ROOT, "out", "notebooks"))
TOKENIZER = os.environ.get("NB_TOKENIZER", "gpt2")
os.makedirs(OUT, exist_ok=True)
target, dec, components, tcfg, _ = vpd.load_decomposition(CKPT)
print(f"{len(components)} decomposed matrices, {sum(c['V'].shape[1] for c in components.values())} subcomponents")

# %% [markdown]
# ## Training curves
# `metrics.jsonl` holds one line per logged step (the loss terms) and one per evaluation (L0, CE under
# each kind of mask, adversarial KL, alive counts).

# %%
records = [json.loads(line) for line in open(os.path.join(os.path.dirname(CKPT), "metrics.jsonl"))]
train = [r for r in records if "total" in r]
evals = [r for r in records if "l0/total" in r]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for key in ("stoch", "adv"):
    axes[0].plot([r["step"] for r in train], [r[key] for r in train], label=f"L_{key} (KL)")
axes[0].set(yscale="log", xlabel="step", title="reconstruction losses")
axes[0].legend()
axes[1].plot([r["step"] for r in train], [r["imp"] for r in train])
axes[1].set(xlabel="step", title="importance minimality (p anneals)")
for layer in sorted({k for r in evals for k in r if k.startswith("l0_layer/")}):
    axes[2].plot([r["step"] for r in evals], [r[layer] for r in evals], "o-", label=layer.split("/")[1])
axes[2].set(xlabel="step", title="L0 per layer (evaluation)")
axes[2].legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "lm_training.png"), dpi=100)
if evals:
    last = evals[-1]
    print({k: round(v, 4) for k, v in last.items() if k.startswith(("ce/", "recon/", "l0/total", "alive/total"))})

# %% [markdown]
# ## CI on held-out text, per language
# For every subcomponent: its mean CI per position and how often it fires (CI > 0.1), separately in each
# language. From these come the alive counts, the CI density and a language label per subcomponent
# ("de-only", "de+it", "foreign", "general", "dead"; thresholds in `edit.EditConfig`).

# %%
cfg = edit.EditConfig(ckpt=CKPT, data=DATA, tokenizer=TOKENIZER, seq_len=tcfg.seq_len,
                      analysis_windows=int(os.environ.get("NB_WINDOWS", 100)))
text = {lang: models.language_splits(lang, DATA, {}, TOKENIZER, 0) for lang in cfg.languages}  # {lang: {split: ids}}
texts = {lang: models.windows(text[lang]["val"], cfg.analysis_windows, cfg.seq_len) for lang in cfg.languages}
mean, freq = edit.component_stats(dec, texts, cfg.fire_threshold)    # [L, ΣC] each
labels = edit.labels_of(mean, freq, cfg.languages, cfg)
sizes = [c["V"].shape[1] for c in components.values()]
alive = (mean.mean(0) > 1e-6).float().split(sizes)
print("alive per matrix:", {n: int(a.sum()) for n, a in zip(components, alive)})
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(mean.mean(0)[mean.mean(0) > 0].log10().numpy(), bins=50)
ax.set(xlabel="log10 mean CI per position", ylabel="subcomponents", title="CI density (alive subcomponents)")
fig.savefig(os.path.join(OUT, "lm_ci_density.png"), dpi=100, bbox_inches="tight")
counts = {}
for label in labels:
    counts[label] = counts.get(label, 0) + 1
print("labels:", dict(sorted(counts.items(), key=lambda kv: -kv[1])))

# %% [markdown]
# ## What single subcomponents do
# The most German-selective subcomponents (mean CI on German minus on English), their language profile,
# and the held-out contexts where they fire hardest (the firing token in [[ ]]).

# %%
keys = edit.all_keys(components)
decode = models.token_decoder(cfg.tokenizer, tcfg.vocab_size)
L = cfg.languages.index
top = (mean[L("de")] - mean[L("en")]).topk(5).indices.tolist()
fig, ax = plt.subplots(figsize=(7, 3))
for i, c in enumerate(top):
    ax.bar([j + 0.15 * i for j in range(len(cfg.languages))], mean[:, c].numpy(), 0.15, label=keys[c])
ax.set(xticks=[j + 0.3 for j in range(len(cfg.languages))], xticklabels=cfg.languages, ylabel="mean CI",
       title="language profile of the 5 most German-selective subcomponents")
ax.legend(fontsize=7)
fig.savefig(os.path.join(OUT, "lm_language_profiles.png"), dpi=100, bbox_inches="tight")
for c, contexts in edit.top_contexts(dec, texts, top[:3], decode, 3).items():
    print(f"\n{keys[c]} ({labels[c]}):")
    for context in contexts:
        print("  ", context)
