# %% [markdown]
# # Removing German by editing components: the results of edit.py
#
# `python edit.py configs/edit_fortunes.py` labels every subcomponent by the languages it fires on, screens each
# alive one causally (the frontier: its scalar at m from -100 to 30, as a plain weight edit and gated to where the
# subcomponent is active), trains one-scalar, top-16 and LoRA edits that push German towards chance while a KL
# term holds English, at German-token budgets 1-1024, and writes what it found to its out_dir. This notebook
# draws it: `summary.json` (the edits), `frontier.json` (the screen), `components.json` (labels and ranking).

# %%
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import edit
import models
import vpd

RUN = os.environ.get("NB_EDIT", os.path.join(ROOT, "out", "edit_fortunes"))
OUT = os.environ.get("NB_OUT", os.path.join(ROOT, "out", "notebooks"))
os.makedirs(OUT, exist_ok=True)
summary = json.load(open(os.path.join(RUN, "summary.json")))
front = json.load(open(os.path.join(RUN, "frontier.json")))
analysis = json.load(open(os.path.join(RUN, "components.json")))
base, chance, remove, keep = summary["base_test"], summary["chance"], summary["remove"], summary["keep"]
langs = list(base)
print(f"before any edit (test CE): {base}; chance {chance:.3f}")

# %% [markdown]
# ## The decomposition's German parts
# Labels from each subcomponent's mean CI per language on held-out text, and the top 16 by mean CI on German
# minus on English (Goodfire's ranking), with the contexts where they fire hardest.

# %%
counts = {}
for label in analysis["labels"].values():
    counts[label] = counts.get(label, 0) + 1
print("labels:", dict(sorted(counts.items(), key=lambda kv: -kv[1])))
print(f"{'subcomponent':<24} {'label':<9} " + " ".join(f"{l:>6}" for l in langs) + "   top context per language")
for r in analysis["ranked"]:
    per_lang = r["contexts"][::len(r["contexts"]) // len(r["mean_ci"]) or 1]
    print(f"{r['key']:<24} {r['label']:<9} " + " ".join(f"{r['mean_ci'][l]:6.3f}" for l in langs) + "   "
          + " ¶ ".join(per_lang)[:160])

# %% [markdown]
# ## The causal frontier
# Each alive subcomponent at its best m (most German CE within 0.1 nats of English, on the dev split), per gate.
# As a plain weight edit a subcomponent leaks: its activation x·V_c is small on English but not zero, and a large
# m multiplies it. Gated to where it is active, the same scalar can act on German alone.

# %%
for form, b in front["best"].items():
    gains = [e["remove"] / front["gap"] for e in front["entries"] if e["form"] == form]
    print(f"{form:>5}: best {b['key']} ({b['label']}, rank {b['rank']}) m = {b['m']:g}: {b['remove'] / front['gap']:.0%} "
          f"of the gap, {keep} {b['keep']:+.3f}; subcomponents past 50%: {sum(g > 0.5 for g in gains)} of {len(gains)}")
fig, ax = plt.subplots(figsize=(6, 3.5))
for form in front["best"]:
    gains = sorted((e["remove"] / front["gap"] for e in front["entries"] if e["form"] == form), reverse=True)
    ax.plot(range(1, len(gains) + 1), gains, label=form)
ax.set(xscale="log", xlabel="subcomponents, best first", ylabel=f"{remove} gain / gap (within damage)",
       title="how many subcomponents are switches, per gate")
ax.legend()
fig.savefig(os.path.join(OUT, "editing_frontier.png"), dpi=100, bbox_inches="tight")

# %% [markdown]
# ## German CE and English damage against the German-token budget
# Mean over seeds; the dashed line is chance (the uniform distribution), the dotted one the unedited model.
# "Tokens to chance" asks for 95% of the way there at no more than 0.10 nats of English damage.

# %%
fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
for i, (method, s) in enumerate(summary["methods"].items()):
    ns = sorted(s["by_n"], key=int)
    style = "o-" if "_" in method and not method.startswith("lora") else "s--" if method.startswith("lora") else "^-"
    axes[0].plot([int(n) for n in ns], [s["by_n"][n]["ce"][remove] for n in ns], style, color=f"C{i % 10}", label=method)
    axes[1].plot([int(n) for n in ns], [s["by_n"][n]["damage"] for n in ns], style, color=f"C{i % 10}", label=method)
    print(f"{method:>16}: tokens to chance {s['tokens_to_chance']}")
axes[0].axhline(chance, ls="--", color="k")
axes[0].axhline(base[remove], ls=":", color="gray")
axes[1].axhline(summary["max_damage"], ls="--", color="k")
axes[0].set(xscale="log", xlabel=f"{remove} training tokens", ylabel=f"{remove} test CE")
axes[1].set(xscale="log", xlabel=f"{remove} training tokens", ylabel=f"{keep} test CE increase")
axes[0].legend(fontsize=6, ncol=2)
# where the one-scalar edits end: Goodfire's from m = 1, the frontier's best from its m
for method in ("one", "best", "best_act", "best_ci"):
    s = summary["methods"].get(method)
    if s:
        pts = [(int(n), list(p.values())[0]) for n, v in s["by_n"].items() for p in v["prefactors"] if p]
        axes[2].plot(*zip(*pts), "o", label=method)
axes[2].axhline(0, color="k", lw=0.5)
axes[2].set(xscale="log", yscale="symlog", xlabel=f"{remove} training tokens", ylabel="learned prefactor m",
            title="one-scalar edits: the learned m")
axes[2].legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "editing.png"), dpi=100)

# %% [markdown]
# ## Off-target languages
# At one budget, the CE change in every language: an edit that removes German should spare Spanish and Italian
# unless its subcomponent serves them too.

# %%
n_show = str(min((int(n) for n in next(iter(summary["methods"].values()))["by_n"]), key=lambda n: abs(n - 64)))
methods = [m for m in summary["methods"] if n_show in summary["methods"][m]["by_n"]]
fig, ax = plt.subplots(figsize=(10, 3.5))
for i, method in enumerate(methods):
    v = summary["methods"][method]["by_n"][n_show]
    ax.bar(np.arange(len(langs)) + i * 0.8 / len(methods), [v["ce"][l] - base[l] for l in langs],
           0.8 / len(methods), label=method, color=f"C{i % 10}")
ax.set(xticks=np.arange(len(langs)) + 0.4, xticklabels=langs, ylabel="test ΔCE", yscale="symlog", title=f"n = {n_show}")
ax.legend(fontsize=6, ncol=2)
fig.savefig(os.path.join(OUT, "editing_off_target.png"), dpi=100, bbox_inches="tight")

# %% [markdown]
# ## The table: every method at every budget
# Test split, mean over seeds: the share of the way to chance and the English damage; then tokens to chance, the
# other languages' change, the parameters trained and the inference FLOPs per token over the target's (a CI gate
# runs the decomposition's CI function beside the model). Every component method also cost the decomposition.

# %%
cost = summary["cost"]
ns = sorted({int(n) for s in summary["methods"].values() for n in s["by_n"]})
others = [l for l in langs if l not in (remove, keep)]
lines = ["| method | " + " | ".join(f"n = {n}" for n in ns) + " | tokens to chance | " + " / ".join(others)
         + f" at n = {n_show} | parameters | inference |", "| --- " * (len(ns) + 5) + "|"]
for method, s in summary["methods"].items():
    cells = [f"{s['by_n'][str(n)]['progress']:.0%}, {s['by_n'][str(n)]['damage']:+.3f}" if str(n) in s["by_n"] else ""
             for n in ns]
    v = s["by_n"].get(n_show)
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {s['tokens_to_chance'] or 'not reached'} | "
                 + (" / ".join(f"{v['ce'][l] - base[l]:+.3f}" for l in others) if v else "") + " | "
                 + f"{cost['methods'][method]['parameters']} | {cost['methods'][method]['inference']:.3f}× |")
lines += ["", f"decomposition: {cost['decomposition_tokens']:,} tokens ({cost['decomposition_flops']:.2g} FLOPs); "
          f"analysis: {cost['analysis_tokens']:,} tokens; frontier: {cost['frontier_remove_tokens']:,} {remove} dev tokens, "
          f"{cost['frontier_seconds']:.0f} s; one edit: {cost['edit_flops']:.2g} FLOPs ({cost['edit_flops_note']})"]
print("\n".join(lines))
with open(os.path.join(OUT, "editing_summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

# %% [markdown]
# ## What an edit does to text
# Greedy continuations of test prompts before and after the saved edit (n = 64, seed 0) of the method that went
# furthest within the damage allowed.

# %%
saved = [m for m in summary["methods"] if os.path.exists(os.path.join(RUN, f"edited_{m}.pt"))
         and (v := summary["methods"][m]["by_n"].get(n_show)) and v["damage"] <= summary["max_damage"]]
if saved:
    method = max(saved, key=lambda m: summary["methods"][m]["by_n"][n_show]["progress"])
    target, _, _, tcfg, _ = vpd.load_decomposition(summary["ckpt"])
    edited = edit.load_edited(os.path.join(RUN, f"edited_{method}.pt"), tcfg)
    inputs = analysis["inputs"]  # the edit's settings: where its text came from
    decode = models.token_decoder(inputs["tokenizer"], tcfg.vocab_size)
    print(f"before → after the saved {method} edit")
    for lang in (remove, keep):
        ids = models.language_splits(lang, inputs["data"], inputs["sources"], inputs["tokenizer"],
                                     inputs["split_tokens"])["test"]
        for w in models.windows(ids, 2, inputs["seq_len"]):
            prompt, outs = w[:16][None], []
            for model in (target, edited):
                x = prompt
                with torch.no_grad():
                    for _ in range(16):
                        x = torch.cat([x, vpd.output_logits(model(x))[:, -1:].argmax(-1)], 1)
                outs.append(decode(x[0, 16:].tolist()))
            print(f"{lang}: {decode(prompt[0].tolist())!r} → {outs[0]!r} | {outs[1]!r}")
