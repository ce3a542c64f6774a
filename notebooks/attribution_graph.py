# %% [markdown]
# # Attribution graphs: how the decomposed fortunes model computes one prediction
#
# For one prompt, the graph's nodes are the subcomponents that are causally important at each position (CI > 0),
# one input node per position and the likely next tokens; an edge says how much one node drives another,
# attr(s -> t) = ∂a_t/∂a_s · a_s · g_s, computed on the target itself (all masks 1) with a stop-gradient on every
# other subcomponent, so that an edge is a direct effect (`vpd.attribution_graph`, §7). The CI function's graph is
# large; optimising the prompt's CI to keep the label under random and adversarial ablation (`vpd.optimise_ci`)
# prunes it to the nodes the prediction needs. Four numbers say whether a graph is faithful: the label's
# probability under the target, under CI masks, under a random ablation of what CI leaves out, and under an
# adversary that chooses how much of every alive subcomponent to keep (of the graph's nodes at least their CI;
# of the pruned ones anything from nothing to all).
#
# Needs `python vpd.py configs/fortunes.py` (and, for the frontier's picks, `python edit.py
# configs/edit_fortunes_quick.py`) first. A few minutes on 2 CPU cores; figures and JSON go to `out/notebooks/`.

# %%
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import edit
import models
import vpd

CKPT = os.environ.get("NB_CKPT", os.path.join(ROOT, "out", "fortunes", "ckpt.pt"))
DATA = os.environ.get("NB_DATA", os.path.join(ROOT, "data", "fortunes"))
EDIT = os.environ.get("NB_EDIT", os.path.join(ROOT, "out", "edit_fortunes_quick"))
OUT = os.environ.get("NB_OUT", os.path.join(ROOT, "out", "notebooks"))
TOKENIZER = os.environ.get("NB_TOKENIZER", "gpt2")
STEPS = int(os.environ.get("NB_STEPS", 400))            # optimisation steps (the paper: 2,000)
PROMPT_LEN = int(os.environ.get("NB_PROMPT_LEN", 20))
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
target, dec, components, tcfg, vcfg = vpd.load_decomposition(CKPT)
cfg = edit.EditConfig(ckpt=CKPT, data=DATA, tokenizer=TOKENIZER, seq_len=tcfg.seq_len,
                      analysis_windows=int(os.environ.get("NB_WINDOWS", 100)))
decode = models.token_decoder(cfg.tokenizer, tcfg.vocab_size)
# the model's order of the matrices (q, k, v, o, MLP in, MLP out per layer), bottom to top in the figures
order = [n for n, m in dec.target.named_modules() if n in dec.comps]

# %% [markdown]
# ## What the subcomponents are: edit.py's language labels
# Mean CI per language on held-out text gives each subcomponent a label ("de-only": German holds 80% of its
# mean CI). The frontier of `edit.py` (if it ran) names the subcomponents whose scalar switches German off.

# %%
text = {lang: models.language_splits(lang, DATA, {}, TOKENIZER, 0) for lang in cfg.languages}  # {lang: {split: ids}}
texts = {lang: models.windows(text[lang]["val"], cfg.analysis_windows, cfg.seq_len) for lang in cfg.languages}
mean, freq = edit.component_stats(dec, texts, cfg.fire_threshold)
keys = edit.all_keys(components)
labels = dict(zip(keys, edit.labels_of(mean, freq, cfg.languages, cfg)))
switches = set()
if os.path.exists(os.path.join(EDIT, "frontier.json")):
    switches = {b["key"] for b in json.load(open(os.path.join(EDIT, "frontier.json")))["best"].values()}
print(f"{sum(v == 'de-only' for v in labels.values())} de-only subcomponents; the frontier's switches: {switches or 'none'}")

# %% [markdown]
# ## Two prompts and their predictions
# From the test split of each language: the prompt (of PROMPT_LEN tokens) whose next token the target predicts
# most confidently; the label is that prediction.

# %%
prompts = {}
for lang in ("en", "de"):
    w = models.windows(text[lang]["test"], 32, cfg.seq_len)[:, :PROMPT_LEN]
    with torch.no_grad():
        probs = torch.softmax(target(w)[:, -1].float(), -1)
    p, label = probs.max(-1)
    wordy = torch.tensor([any(ch.isalpha() for ch in decode([t])) for t in label.tolist()])  # a word, if any
    best = (p * (wordy if wordy.any() else 1)).argmax().item()
    prompts[lang] = (w[best:best + 1], label[best].item())
    print(f"{lang}: {decode(w[best].tolist())!r} -> {decode([prompts[lang][1]])!r} (p = {probs[best].max():.3f})")

# %% [markdown]
# ## The graphs and their faithfulness
# For each prompt: the CI function's graph and the optimised one, each with the label's probability under the
# target, CI masks, a stochastic ablation and an adversarial one.

# %%
graphs, report = {}, {}
for lang, (x, label) in prompts.items():
    t0 = time.perf_counter()
    with torch.no_grad():
        dec(x)
        ci = dec.causal_importance()[0]
    optimised = vpd.optimise_ci(dec, x, label, steps=STEPS)
    for kind, g in (("ci", ci), ("optimised", optimised)):
        graph = vpd.attribution_graph(dec, x, ci=g)
        graph["faithfulness"] = vpd.faithfulness(dec, x, label, g, alive=ci > 0)  # what was alive before pruning
        graph["tokens"] = [decode([t]) for t in x[0].tolist()]
        graph["label"] = decode([label])
        for node in graph["nodes"]:
            if "c" in node and node["layer"] != "output":
                node["label"] = labels[f"{node['layer']}:{node['c']}"]
        graphs[lang, kind] = graph
        n_nodes = sum(n["layer"] not in ("embed", "output") for n in graph["nodes"])
        report[lang, kind] = {"nodes": n_nodes, "edges": len(graph["edges"]), **graph["faithfulness"]}
        with open(os.path.join(OUT, f"attribution_{lang}_{kind}.json"), "w") as f:
            json.dump(graph, f)
    print(f"{lang}: {time.perf_counter() - t0:.0f} s")
print(f"{'prompt':>6} {'graph':>10} {'nodes':>6} {'edges':>6}   target     CI   stoch    adv")
for (lang, kind), r in report.items():
    print(f"{lang:>6} {kind:>10} {r['nodes']:6d} {r['edges']:6d}   {r['target']:.3f}  {r['ci']:.3f}  "
          f"{r['stochastic']:.3f}  {r['adversarial']:.3f}")

# %% [markdown]
# ## The strongest paths
# A node's influence on the prediction: 1 for the output nodes, and for any other node the sum, over its edges, of
# its share of the target's incoming |attribution| times the target's influence. The most influential
# subcomponents of each optimised graph, with their labels and where they fire hardest.

# %%
def influence(graph):
    into = {}
    for e in graph["edges"]:
        into[e["target"]] = into.get(e["target"], 0.0) + abs(e["attribution"])
    level = {n["id"]: (-1 if n["layer"] == "embed" else len(order) if n["layer"] == "output" else order.index(n["layer"]))
             for n in graph["nodes"]}
    score = {n["id"]: float(n["layer"] == "output") for n in graph["nodes"]}
    for e in sorted(graph["edges"], key=lambda e: -level[e["target"]]):  # targets above sources: top down
        score[e["source"]] += abs(e["attribution"]) / into[e["target"]] * score[e["target"]]
    return score


for lang in prompts:
    graph = graphs[lang, "optimised"]
    score = influence(graph)
    nodes = {n["id"]: n for n in graph["nodes"]}
    ranked = sorted((i for i in score if nodes[i]["layer"] not in ("embed", "output")), key=lambda i: -score[i])[:5]
    print(f"\n{lang} prompt, label {graph['label']!r}: the most influential subcomponents")
    for i in ranked:
        key = f"{nodes[i]['layer']}:{nodes[i]['c']}"
        context = edit.top_contexts(dec, {l: texts[l] for l in ("de", "en")}, [keys.index(key)], decode, 1)
        print(f"  {i} ({labels[key]}{', a frontier switch' if key in switches else ''}) influence {score[i]:.2f}; "
              f"fires on: {' | '.join(context[keys.index(key)])}")
    inner = [i for i in score if nodes[i]["layer"] not in ("embed", "output")]
    german = [i for i in inner if nodes[i].get("label") == "de-only"]
    print(f"  de-only nodes: {len(german)} of {len(inner)}, with {sum(score[i] for i in german) / sum(score[i] for i in inner):.0%}"
          f" of the subcomponents' summed influence; frontier switches among the nodes: "
          f"{sorted({i.rpartition('@')[0] for i in inner} & switches) or 'none'}")

# %% [markdown]
# ## The graphs drawn
# Positions left to right (tokens below), matrices bottom to top; a node's size is its CI; an edge's width is its
# |attribution| over the L2 norm of all attributions into its target's matrix, so that every layer shows (the
# strongest 150 so scaled; blue positive, red negative); German-only subcomponents in red.

# %%
fig, axes = plt.subplots(len(prompts), 2, figsize=(20, 7 * len(prompts)), squeeze=False)
for row, lang in enumerate(prompts):
    for col, kind in enumerate(("ci", "optimised")):
        graph, ax = graphs[lang, kind], axes[row, col]
        layer_of = {n["id"]: n["layer"] for n in graph["nodes"]}
        norm = {}
        for e in graph["edges"]:
            norm[layer_of[e["target"]]] = norm.get(layer_of[e["target"]], 0.0) + e["attribution"] ** 2
        scaled = [{**e, "attribution": e["attribution"] / norm[layer_of[e["target"]]] ** 0.5} for e in graph["edges"]]
        edges = sorted(scaled, key=lambda e: -abs(e["attribution"]))[:150]
        shown = {e["source"] for e in edges} | {e["target"] for e in edges}
        nodes = [n for n in graph["nodes"] if n["id"] in shown or n["layer"] == "output"]
        where = {}
        for (layer, pos) in {(n["layer"], n["position"]) for n in nodes}:  # spread a cell's nodes sideways
            cell = [n for n in nodes if (n["layer"], n["position"]) == (layer, pos)]
            y = -1 if layer == "embed" else len(order) if layer == "output" else order.index(layer)
            for i, n in enumerate(cell):
                where[n["id"]] = (pos + (i - (len(cell) - 1) / 2) * 0.8 / max(len(cell), 1), y)
        top = max(abs(e["attribution"]) for e in edges) if edges else 1
        for e in edges:
            (x0, y0), (x1, y1) = where[e["source"]], where[e["target"]]
            ax.plot([x0, x1], [y0, y1], color="C0" if e["attribution"] > 0 else "C3", alpha=0.5,
                    lw=3 * abs(e["attribution"]) / top, zorder=1)
        for n in nodes:
            colour = "C3" if n.get("label") == "de-only" else "k" if n["layer"] in ("embed", "output") else "C7"
            ax.scatter(*where[n["id"]], s=10 + 60 * n.get("ci", 0.5), color=colour, zorder=2)
            if n["layer"] == "output" and n["score"] >= sorted(m["score"] for m in nodes if m["layer"] == "output")[-3:][0]:
                ax.annotate(decode([n["c"]]), where[n["id"]], xytext=(0, 6), textcoords="offset points", fontsize=7,
                            ha="center")  # the three likeliest tokens
        f = graph["faithfulness"]
        ax.set(xticks=range(len(graph["tokens"])), yticks=range(-1, len(order) + 1),
               yticklabels=["embed", *order, "output"], xlim=(-0.7, len(graph["tokens"]) - 0.3),
               title=f"{lang}, {kind} CI: {sum(n['layer'] not in ('embed', 'output') for n in graph['nodes'])} nodes; "
                     f"p(label) target {f['target']:.2f} / CI {f['ci']:.2f} / stoch {f['stochastic']:.2f} / "
                     f"adv {f['adversarial']:.2f}")
        ax.set_xticklabels(graph["tokens"], rotation=60, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "attribution_graphs.png"), dpi=90)
