# %% [markdown]
# # Removing German by editing components: the results of edit.py
#
# `python edit.py configs/edit_fortunes.py` ranks subcomponents by how much more they fire on German
# than on English, trains the scalar prefactor of one of them (and of the top 16, and of a random one)
# to push German towards chance while a KL term holds English, and compares with LoRA at the same German
# token budgets. This notebook reads what it wrote (`out/edit_fortunes/`).

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
import numpy as np

RUN = os.environ.get("NB_EDIT", os.path.join(ROOT, "out", "edit_fortunes"))
OUT = os.environ.get("NB_OUT", os.path.join(ROOT, "out", "notebooks"))
os.makedirs(OUT, exist_ok=True)
summary = json.load(open(os.path.join(RUN, "summary.json")))
analysis = json.load(open(os.path.join(RUN, "components.json")))
rows = [json.loads(line) for line in open(os.path.join(RUN, "results.jsonl"))]
base, chance = summary["base_test"], summary["chance"]
print(f"before any edit (test CE): {base}; chance {chance:.3f}")

# %% [markdown]
# ## The ranked subcomponents
# Label, mean CI per language, and the causal screen: the test CE change per language when the
# subcomponent alone is ablated (m = 0) or inverted (m = -1).

# %%
langs = list(base)
print(f"{'subcomponent':<24} {'label':<10} " + " ".join(f"{l:>6}" for l in langs) + "   ΔCE at m=-1")
for r in analysis["ranked"]:
    print(f"{r['key']:<24} {r['label']:<10} " + " ".join(f"{r['mean_ci'][l]:6.3f}" for l in langs)
          + "   " + " ".join(f"{r['screen']['m=-1'][l]:+.3f}" for l in langs))
print("chosen:", analysis["chosen"], "| label counts:",
      {k: sum(c.get(k, 0) for c in analysis["label_counts"].values())
       for k in sorted({k for c in analysis["label_counts"].values() for k in c})})

# %% [markdown]
# ## German CE and English damage against the German-token budget
# Mean over seeds; the dashed line is chance (the uniform distribution), the dotted one the unedited
# model. "Tokens to chance" asks for 95% of the way there at no more than 0.10 nats of English damage.

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
for i, (method, s) in enumerate(summary["methods"].items()):
    ns = sorted(s["by_n"], key=int)
    axes[0].plot([int(n) for n in ns], [s["by_n"][n]["ce"]["de"] for n in ns], "o-", color=f"C{i}", label=method)
    axes[1].plot([int(n) for n in ns], [s["by_n"][n]["damage"] for n in ns], "o-", color=f"C{i}", label=method)
    print(f"{method:>13}: tokens to chance {s['tokens_to_chance']}")
axes[0].axhline(chance, ls="--", color="k")
axes[0].axhline(base["de"], ls=":", color="gray")
axes[1].axhline(0.1, ls="--", color="k")
axes[0].set(xscale="log", xlabel="German training tokens", ylabel="German test CE")
axes[1].set(xscale="log", xlabel="German training tokens", ylabel="English test CE increase")
axes[0].legend(fontsize=7)
# the learned prefactor of the one-scalar edit: the post's winning edit inverted its component (m < 0)
one = [(r["n"], list(r["prefactors"].values())[0]) for r in rows if r["method"] == "one"]  # one point per seed
axes[2].plot([n for n, _ in one], [m for _, m in one], "o")
axes[2].axhline(0, color="k", lw=0.5)
axes[2].set(xscale="log", xlabel="German training tokens", ylabel="learned prefactor m",
            title=f"one scalar: {analysis['chosen']}")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "editing.png"), dpi=100)

# %% [markdown]
# ## Off-target languages
# At one budget, the CE change in every language: an edit that removes German should spare Spanish and
# Italian unless its subcomponent serves them too.

# %%
n_show = str(min((int(n) for n in next(iter(summary["methods"].values()))["by_n"]), key=lambda n: abs(n - 64)))
fig, ax = plt.subplots(figsize=(8, 3.5))
methods = list(summary["methods"])
for i, method in enumerate(methods):
    v = summary["methods"][method]["by_n"].get(n_show)
    if v:
        ax.bar(np.arange(len(langs)) + i * 0.8 / len(methods), [v["ce"][l] - base[l] for l in langs],
               0.8 / len(methods), label=method)
ax.set(xticks=np.arange(len(langs)) + 0.4, xticklabels=langs, ylabel="test ΔCE", title=f"n = {n_show}")
ax.legend(fontsize=7)
fig.savefig(os.path.join(OUT, "editing_off_target.png"), dpi=100, bbox_inches="tight")
