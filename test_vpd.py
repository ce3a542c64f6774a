"""Tests of vpd.py (in its order: §1-7, then the appendices), models.py, edit.py, the README's snippets and the
notebooks: hand-computed losses and edges, invariants of the masked forward, the sigmoids, routing, the adversaries,
training, checkpoints and exact resume (1 and 2 processes), Goodfire's format, recovery of TMS 5-2, edits and the
frontier. Run: python -m pytest -q   (offline, CPU, a few minutes on 2 cores)"""
import contextlib
from contextlib import nullcontext
import copy
import dataclasses
import fnmatch
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edit
import models
import vpd

# -- helpers: tiny models and runs that many tests share -----------------------------------------------------

def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def decomposition(model=None, **overrides):
    cfg = vpd.Config(modules={"0": 5, "2": 7}, **overrides)
    return vpd.Decomposition(model or tiny_mlp(), cfg), cfg


def ones_masks(dec, x, delta=1.0):
    dec(x)
    return {n: (torch.ones(*c.input.shape[:-1], c.V.shape[1]), torch.full(c.input.shape[:-1], delta))
            for n, c in dec.comps.items()}


def toy_run(tmp_path, **overrides):
    tcfg = models.TargetConfig(target_steps=300)
    cfg = vpd.Config(**{**dict(out_dir=str(tmp_path / "run"), device="cpu", steps=20, batch_size=64, eval_interval=10,
                               ckpt_interval=10, log_interval=1, faith_warmup_steps=5), **overrides})
    target_path = tmp_path / "target.pt"
    if not target_path.exists():
        models.train_target(tcfg, str(target_path))
    model = models.build_model(tcfg)
    model.load_state_dict(torch.load(target_path, weights_only=True))
    return cfg, tcfg, model


def train_losses(path):
    return [r for r in map(json.loads, open(path)) if "total" in r]


LM_MODULES = {"h.*.attn.q_proj": 4, "h.*.attn.k_proj": 4, "h.*.attn.v_proj": 4, "h.*.attn.o_proj": 4,
              "h.*.mlp.c_fc": 6, "h.*.mlp.down_proj": 6}


def tiny_lm(**target):
    tcfg = models.TargetConfig(model="llama_simple_mlp", vocab_size=32, d_model=16, n_heads=2, d_mlp=32,
                               n_layers=2, seq_len=8, **target)
    torch.manual_seed(0)
    return models.build_model(tcfg), tcfg


def lm_config(**overrides):
    base = dict(modules=LM_MODULES, ci_fn="transformer", ci_d_model=16, ci_n_blocks=1, ci_n_heads=2, ci_d_mlp=32,
                recon_loss="kl", beta=0.5, faith_coeff=1e3, imp_coeff=1e-3, p_start=2.0, p_end=0.4,
                stoch_coeff=0.5, adv_coeff=0.5, ci_threshold=0.0)
    return vpd.Config(**{**base, **overrides})


LANGS = ["en", "de", "es", "it"]


@pytest.fixture(scope="module")
def lm_decomposition(tmp_path_factory):
    """A tiny language model and its decomposition, trained a few steps on a 4-language fixture corpus in
    which each language draws its own 8 of the 32 tokens (plus a shared few); token files as
    data/fortunes/prepare.py writes them."""
    root = tmp_path_factory.mktemp("edit")
    data = root / "data"
    data.mkdir()
    g = np.random.default_rng(0)
    for i, lang in enumerate(LANGS):
        for split in ("train", "val", "dev", "test"):
            own = g.integers(8 * i, 8 * i + 8, 3000)
            shared = g.integers(0, 32, 3000)
            np.where(g.random(3000) < 0.8, own, shared).astype(np.uint16).tofile(data / f"{split}_{lang}.bin")
    for split in ("train", "val"):
        np.concatenate([np.fromfile(data / f"{split}_{lang}.bin", dtype=np.uint16) for lang in LANGS]).tofile(data / f"{split}.bin")
    model, tcfg = tiny_lm(dataset=str(data))
    cfg = lm_config(out_dir=str(root / "dec"), steps=10, batch_size=8, eval_interval=0, log_interval=0,
                    faith_warmup_steps=20)
    vpd.train(cfg, model, models.token_batches(tcfg, 8, seed=0),
              run_config={**dataclasses.asdict(cfg), **dataclasses.asdict(tcfg)})
    return root, data, os.path.join(cfg.out_dir, "ckpt.pt")


# -- §1-2 components and the masked forward ------------------------------------------------------------------

def test_weight_is_components_plus_delta():
    dec, _ = decomposition()
    for c in dec.comps.values():
        torch.testing.assert_close(c.weight, (c.V @ c.U).T + c.delta())


def test_all_ones_masks_with_delta_one_reproduce_target():
    model = tiny_mlp()
    x = torch.randn(8, 4)
    expected = model(x)
    dec, _ = decomposition(model)
    torch.testing.assert_close(dec(x), expected)  # components installed, no masks: the target itself
    out = dec.masked(x, ones_masks(dec, x))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_masked_forward_formula_per_position():
    dec, _ = decomposition()
    x = torch.randn(5, 4)
    dec(x)
    c = dec.comps["0"]
    m, d = torch.rand(5, 5), torch.rand(5)
    out = dec.masked(x, {"0": (m, d)})
    hidden = torch.stack([x[i] @ (c.V * m[i]) @ c.U + d[i] * (x[i] @ c.delta().T) + c.bias for i in range(5)])
    expected = dec.target[2](torch.relu(hidden))  # "2" is absent from the masks: its original weight
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # and the same gradients for V and U (the forward never builds Δ, but depends on V, U through it)
    for got, want in zip(torch.autograd.grad(out.sum(), [c.V, c.U]), torch.autograd.grad(expected.sum(), [c.V, c.U])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_routing_reproduces_target_where_unrouted():
    model = tiny_mlp()
    x = torch.randn(6, 4)
    dec, _ = decomposition(model)
    dec(x)
    ci, source = torch.rand(6, 12), torch.rand(6, 12 + 2)
    routed = torch.zeros(6, 2, dtype=torch.bool)
    routed[:3, 0] = True  # positions 0-2 route the first matrix only
    out = dec.masked(x, dec.masks(ci, source, routed))
    torch.testing.assert_close(out[3:], model(x)[3:], atol=1e-5, rtol=1e-5)
    masks = dec.masks(ci, source)
    only_first = dec.masked(x[:3], {"0": (masks["0"][0][:3], masks["0"][1][:3])})
    torch.testing.assert_close(out[:3], only_first, atol=1e-5, rtol=1e-5)


def test_masks_from_ci_and_source():
    dec, _ = decomposition()  # matrices "0" (C 5) and "2" (C 7)
    ci, source = torch.rand(4, 12), torch.rand(4, 14)
    masks = dec.masks(ci, source)
    torch.testing.assert_close(masks["0"][0], ci[:, :5] + (1 - ci[:, :5]) * source[:, :5])
    torch.testing.assert_close(masks["2"][0], ci[:, 5:] + (1 - ci[:, 5:]) * source[:, 5:12])
    torch.testing.assert_close(masks["0"][1], source[:, 12])  # δ: one channel per matrix, at the end
    torch.testing.assert_close(masks["2"][1], source[:, 13])
    routed = torch.tensor([[True, False]] * 4)
    masks = dec.masks(ci, source, routed)
    assert (masks["2"][0] == 1).all() and (masks["2"][1] == 1).all()
    torch.testing.assert_close(masks["0"][0], ci[:, :5] + (1 - ci[:, :5]) * source[:, :5])


def test_masks_gradients_are_those_of_the_formula():
    """dec.masks (split per matrix, routing by index_select) has the gradients of m = g + (1 - g) s written
    out, with a source per position or one shared by all (the evaluation adversary's), and with only one
    input needing them (the stochastic loss's CI, the adversary's inner steps' source)."""
    dec, _ = decomposition()
    for source_shape, needs in (((3, 4, 14), (True, True)), ((1, 1, 14), (True, True)), ((3, 4, 14), (True, False)),
                                ((3, 4, 14), (False, True))):
        grads = []
        for hand in (True, False):
            torch.manual_seed(0)
            ci = torch.rand(3, 4, 12).requires_grad_(needs[0])
            source = torch.rand(source_shape).requires_grad_(needs[1])
            if hand:
                masks = dec.masks(ci, source)
            else:
                m = ci + (1 - ci) * source[..., :12]
                masks = {"0": (m[..., :5], source[..., 12]), "2": (m[..., 5:], source[..., 13])}
            w = torch.randn(3, 4, 14, generator=torch.Generator().manual_seed(1))
            loss = sum((m_n * w[..., :m_n.shape[-1]]).sum() + (d * w[..., -1]).sum() for m_n, d in masks.values())
            grads.append(torch.autograd.grad(loss, [t for t in (ci, source) if t.requires_grad]))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


def test_uniform_k_subset_inclusion_probability():
    torch.manual_seed(0)
    for M in (2, 5):
        routed = vpd.uniform_k_subset((100_000,), M, "cpu")
        assert routed.any(-1).all()  # k >= 1: every position routes at least one matrix
        freq = routed.float().mean(0)
        assert torch.allclose(freq, torch.full((M,), (M + 1) / (2 * M)), atol=0.01)
        # k is uniform on 1..M
        counts = torch.bincount(routed.sum(-1), minlength=M + 1)[1:].float() / 100_000
        assert torch.allclose(counts, torch.full((M,), 1 / M), atol=0.01)


def test_bad_choice_is_a_clear_error():
    for key, value in (("routing", "subset"), ("recon_loss", "ce"), ("dtype", "bf16"), ("init_from", "resume!")):
        with pytest.raises(ValueError, match=f"{key} must be one of"):
            decomposition(**{key: value})


def test_bad_module_pattern_names_the_problem():
    with pytest.raises(ValueError, match="matches no nn.Linear.*closest"):
        vpd.install_components(tiny_mlp(), {"linear9": 3})
    with pytest.raises(ValueError, match="two patterns"):
        vpd.install_components(tiny_mlp(), {"0": 3, "[0]": 3})
    for C in (0, -2, 2.5, True):  # named with its key, not a raw torch error from randn(d_in, C)
        with pytest.raises(ValueError, match=r"modules\['2'\] = .*positive int"):
            vpd.install_components(tiny_mlp(), {"0": 3, "2": C})


def test_install_keeps_target_state_dict_keys_and_freezes_target():
    model = tiny_mlp()
    keys = set(model.state_dict())
    comps = vpd.install_components(model, {"*": 3})
    assert list(comps) == ["0", "2"]
    assert {k for k in model.state_dict() if not k.endswith((".V", ".U"))} == keys
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith((".V", ".U")))


# -- §3 causal importance: the leaky hard sigmoids and the CI functions --------------------------------------

def test_lower_leaky_hard_sigmoid_values_and_gradients():
    z = torch.tensor([-0.5, -0.5, 0.0, 0.5, 1.0, 1.5, 1.5], requires_grad=True)
    g = torch.tensor([-1.0, 1.0, -2.0, 3.0, 4.0, -5.0, 5.0])
    y = vpd.LowerLeakyHardSigmoid.apply(z)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    y.backward(g)
    # below 0: α·g only where g < 0 (the loss wants CI to rise); (0, 1]: g; above 1: 0
    assert z.grad.tolist() == pytest.approx([-0.01, 0.0, -0.02, 3.0, 4.0, 0.0, 0.0])


def test_upper_leaky_hard_sigmoid_values_and_gradients():
    z = torch.tensor([-1.0, 0.0, 0.25, 0.75, 1.0, 3.0], requires_grad=True)
    y = vpd.upper_leaky_hard_sigmoid(z)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.75, 1.0, 1.02])
    y.sum().backward()
    assert z.grad.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0, 1.0, 0.01])  # the kinks: clamp's own convention


def test_ci_functions_shapes():
    dec, _ = decomposition()
    dec(torch.randn(8, 4))
    lower, upper = dec.causal_importance()
    assert {n: v.shape for n, v in dec.split(lower).items()} == {"0": (8, 5), "2": (8, 7)}
    assert lower.shape == upper.shape == (8, 12) and ((lower >= 0) & (lower <= 1)).all()
    torch.testing.assert_close(lower, upper.clamp(max=1))
    cfg = vpd.Config(modules={"0": 5, "2": 7}, ci_fn="transformer", ci_d_model=16, ci_n_blocks=1, ci_n_heads=2,
                     ci_d_mlp=32)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dec = vpd.Decomposition(model, cfg)
    dec(torch.randn(2, 3, 4))  # [B, T, d]: the transformer mixes positions
    lower, _ = dec.causal_importance()
    assert {n: v.shape for n, v in dec.split(lower).items()} == {"0": (2, 3, 5), "2": (2, 3, 7)}


# -- §4 losses against hand-computed values, and the adversaries ---------------------------------------------

def test_importance_minimality_hand_values():
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # two positions, two subcomponents
    # s = [4, 6], mean = [2, 3]
    assert vpd.importance_minimality_loss(g, p=1.0, beta=0.0).item() == pytest.approx(5.0)
    expected = 2 * (1 + math.log2(5)) + 3 * (1 + math.log2(7))
    assert vpd.importance_minimality_loss(g, p=1.0, beta=1.0).item() == pytest.approx(expected, rel=1e-6)
    # p = 2: s = [1 + 9, 4 + 16] = [10, 20], mean = [5, 10]; two matrices add up
    two = torch.cat([g, torch.tensor([[0.5], [0.0]])], -1)  # a second matrix with one subcomponent
    assert vpd.importance_minimality_loss(two, p=2.0, beta=0.0).item() == pytest.approx(15 + 0.125)


def test_importance_minimality_positions_are_all_leading_dims():
    g = torch.rand(3, 5, 4)
    flat = g.reshape(15, 4)
    assert vpd.importance_minimality_loss(g, 2.0, 0.5).item() == pytest.approx(
        vpd.importance_minimality_loss(flat, 2.0, 0.5).item())


def test_faithfulness_hand_value():
    deltas = {"a": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([[3.0], [0.0]])}
    assert vpd.faithfulness_loss(deltas).item() == pytest.approx((1 + 4 + 9) / 4)


def test_recon_losses_hand_values():
    out, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert vpd.recon_loss(out, target, "mse").item() == pytest.approx(2.5)
    # KL(p || q) with p = softmax(target) = [1/2, 1/2], q = softmax([0, ln 3]) = [1/4, 3/4]
    q_logits = torch.tensor([[[0.0, math.log(3)]]])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert vpd.recon_loss(q_logits, torch.zeros(1, 1, 2), "kl").item() == pytest.approx(kl, rel=1e-5)
    assert vpd.recon_loss(q_logits, q_logits, "kl").item() == pytest.approx(0.0, abs=1e-7)


def test_layerwise_stochastic_loss_by_hand():
    """SPD's routing: the all-matrices pass plus the mean of one pass per matrix, each masking that matrix
    alone with the same sample (the other matrix keeps its own weight), written out layer by layer."""
    dec, cfg = decomposition(routing="layerwise")
    (W0, b0), (W2, b2) = ((c.W, c.bias) for c in dec.comps.values())
    x = torch.randn(5, 4)
    with torch.no_grad():
        target = dec(x)
        ci = torch.rand(5, 12)
        torch.manual_seed(3)
        loss = vpd.stochastic_recon_loss(dec, x, target, ci, cfg)
        torch.manual_seed(3)
        u = torch.rand(5, 14)  # the sample the loss drew: ΣC mask channels, then δ per matrix
        m0, m2 = ci[:, :5] + (1 - ci[:, :5]) * u[:, :5], ci[:, 5:] + (1 - ci[:, 5:]) * u[:, 5:12]
        d0, d2 = u[:, 12:13], u[:, 13:14]
        layer0 = lambda h: ((h @ dec.comps["0"].V) * (m0 - d0)) @ dec.comps["0"].U + d0 * (h @ W0.T) + b0
        layer2 = lambda h: ((h @ dec.comps["2"].V) * (m2 - d2)) @ dec.comps["2"].U + d2 * (h @ W2.T) + b2
        mse = lambda out: (out - target).pow(2).mean()
        every = mse(layer2(layer0(x).relu()))
        only0, only2 = mse(layer0(x).relu() @ W2.T + b2), mse(layer2((x @ W0.T + b0).relu()))
    assert loss.item() == pytest.approx((every + (only0 + only2) / 2).item(), rel=1e-5)


def test_stochastic_loss_routes_as_configured(monkeypatch):
    dec, cfg = decomposition()
    x = torch.randn(16, 4)
    with torch.no_grad():
        target, ci = dec(x), torch.rand(16, 12)
    seen, masks = [], dec.masks
    monkeypatch.setattr(dec, "masks", lambda ci, source, routed=None: seen.append(routed) or masks(ci, source, routed))
    for routing in ("uniform_k_subset", "all"):
        vpd.stochastic_recon_loss(dec, x, target, ci, dataclasses.replace(cfg, routing=routing))
    assert seen[0].shape == (16, 2) and seen[0].any(-1).all() and seen[1] is None  # k >= 1 matrices per position


def test_persistent_adversary_ascent_raises_loss_and_stays_in_unit_box():
    dec, cfg = decomposition()
    x = torch.randn(64, 4)
    with torch.no_grad():
        target_out = dec(x)
        ci = torch.full((64, 12), 0.3)
    adversary = vpd.Adversary()
    losses = []
    for _ in range(30):
        sources = adversary.leaves((64, 12 + 2), "cpu")
        loss = vpd.adversarial_recon_loss(dec, x, target_out, ci, sources, cfg)
        losses.append(loss.item())
        adversary.ascend(torch.autograd.grad(loss, [sources])[0], lr=0.05)
        assert ((adversary.sources >= 0) & (adversary.sources <= 1)).all()
    assert losses[-1] > 1.5 * losses[0]
    assert adversary.sources.shape == (64, 14)  # ΣC mask channels, then one δ channel per matrix


def test_persistent_adversary_is_adam_ascent_and_resumes_from_its_state():
    """Adam ascent with the moments of the loss's gradient, as written out by hand, also compiled (as on
    CUDA); its state_dict (the checkpoint's format) continues the same trajectory."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 5, generator=g) for _ in range(6)]
    adversary = vpd.Adversary()
    s = adversary.leaves((6, 5), "cpu").detach().clone()
    m, v, (b1, b2) = torch.zeros_like(s), torch.zeros_like(s), adversary.betas
    for t, grad in enumerate(grads[:3], 1):
        adversary.ascend(grad, lr=0.05)
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2
        s = (s + 0.05 * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + adversary.eps)).clamp(0, 1)
    torch.testing.assert_close(adversary.sources, s)
    state = adversary.state_dict()
    assert state["t"] == 3
    torch.testing.assert_close(state["m"], m)
    torch.testing.assert_close(state["v"], v)
    resumed = vpd.Adversary()
    resumed.load_state_dict({k: val.clone() if torch.is_tensor(val) else val for k, val in state.items()})
    for grad in grads[3:]:
        adversary.ascend(grad, lr=0.05)
        resumed.ascend(grad, lr=0.05)
    assert torch.equal(resumed.sources, adversary.sources)
    eager, compiled = vpd.Adversary(), vpd.Adversary()
    compiled.update = torch.compile(compiled.update, backend="aot_eager")
    for adv in (eager, compiled):
        adv.load_state_dict({k: val.clone() if torch.is_tensor(val) else val for k, val in state.items()})
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for lr, grad in zip((0.05, 0.02, 0.01), grads[3:]):  # a new step size each time
        eager.ascend(grad, lr=lr)
        compiled.ascend(grad, lr=lr)
    torch.testing.assert_close(compiled.sources, eager.sources)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # one graph for every step size


def test_eval_adversary_shared_source_raises_loss():
    dec, cfg = decomposition()
    x = torch.randn(32, 4)
    with torch.no_grad():
        target_out = dec(x)
    ci = torch.full((32, 12), 0.5)
    found = vpd.eval_adversary(dec, x, target_out, ci, cfg, [0, 5, 20])
    assert found[20] > found[0] and found[5] >= found[0] * 0.99


# -- §5 training ---------------------------------------------------------------------------------------------

def test_schedules_by_hand():
    cfg = vpd.Config(steps=11, p_start=2.0, p_end=0.4, lr=1e-3, lr_warmup=0.2, lr_final=0.1, adv_lr=0.01, adv_warmup=0.5)
    p, lr, adv_lr = vpd.schedules(0, cfg)  # warm-up over int(0.2 * 11) = 2 steps; adversary over 5.5
    assert (p, lr, adv_lr) == (2.0, pytest.approx(5e-4), pytest.approx(0.01 / 5.5))
    assert vpd.schedules(2, cfg)[1] == pytest.approx(1e-3)  # the peak, where the cosine starts
    p, lr, adv_lr = vpd.schedules(10, cfg)
    assert p == pytest.approx(0.4) and adv_lr == 0.01
    assert lr == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 9))))


def test_tied_gradients_add_both_uses_and_the_adversarial_loss_trains_the_ci_function():
    tcfg = models.TargetConfig()
    torch.manual_seed(0)
    model = models.build_model(tcfg)
    cfg = vpd.Config(modules={"linear1": 6, "linear2": 6}, tie={"linear2": "linear1"})
    dec = vpd.Decomposition(model, cfg)
    x = models.sparse_features(tcfg, 32, 0)("train", 0)[0]
    losses, _ = vpd.training_losses(dec, x, vpd.Adversary(), cfg, 1.0, 0.01)
    a, b = dec.comps["linear1"], dec.comps["linear2"]
    (g_adv,) = torch.autograd.grad(losses["adv"], [dec.ci_fn.W2], retain_graph=True)
    assert g_adv.abs().sum() > 0  # L_adv reaches the CI function through the masks, not only V and U
    vpd.total_loss(losses, cfg).backward()
    aV, aU, bV, bU = (t.grad.clone() for t in (a.V, a.U, b.V, b.U))
    vpd.tie_gradients(dec)
    torch.testing.assert_close(a.V.grad, aV + bU.T)
    torch.testing.assert_close(a.U.grad, aU + bV.T)
    assert b.V.grad is None and b.U.grad is None


def test_tied_matrices_stay_transposes_of_each_other(tmp_path):
    """TMS's linear2 weight is linear1's transposed; tied, linear2's V, U must remain linear1's U, V
    transposed through the warm-up, AdamW with clipping and the adversary, bit for bit."""
    cfg, tcfg, model = toy_run(tmp_path, tie={"linear2": "linear1"}, grad_clip=0.1, eval_interval=0)
    vpd.train(cfg, model, models.sparse_features(tcfg, cfg.batch_size, cfg.seed), None)
    comps = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)["components"]
    assert torch.equal(comps["linear2"]["V"], comps["linear1"]["U"].T)
    assert torch.equal(comps["linear2"]["U"], comps["linear1"]["V"].T)
    with pytest.raises(ValueError, match="transposed"):  # linear1 is not linear2 transposed with different C
        vpd.Decomposition(toy_run(tmp_path)[2], dataclasses.replace(cfg, modules={"linear1": 20, "linear2": 10}))


def test_evaluation_does_not_change_the_training_run(tmp_path):
    runs = []
    for every in (0, 4):  # evaluation draws random masks: from its own stream, so the losses stay the same
        cfg, tcfg, model = toy_run(tmp_path, out_dir=str(tmp_path / f"eval{every}"), eval_interval=every, steps=12)
        vpd.train(cfg, model, models.sparse_features(tcfg, cfg.batch_size, cfg.seed), None)
        runs.append([{k: r[k] for k in ("faith", "imp", "stoch", "adv")}
                     for r in train_losses(os.path.join(cfg.out_dir, "metrics.jsonl"))])
    assert len(runs[0]) == 12 and runs[0] == runs[1]


def test_nan_loss_is_a_clear_error(tmp_path):
    cfg, tcfg, model = toy_run(tmp_path)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    with pytest.raises(FloatingPointError, match="loss is nan.*no checkpoint was written yet"):
        vpd.train(cfg, model, lambda split, step: (get_batch(split, step)[0] * float("nan"), None))


def test_bf16_casts_once_per_step_with_the_same_losses_and_gradients(monkeypatch):
    """Under bf16 autocast (on CUDA in training; on the CPU here) each matrix's V, U and W are cast once per
    training step, not in every masked pass (before: V, U 3 times, W 5 times); the losses and gradients
    are those of casting in every pass. In fp32 nothing is cast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self, tensors):
            super().__init__()
            self.ptrs, self.n = {t.data_ptr(): i for i, t in enumerate(tensors)}, [0] * len(tensors)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
                self.n[self.ptrs[args[0].data_ptr()]] += 1
            return func(*args, **(kwargs or {}))

    def step(autocast, cast_once=True):
        model, tcfg = tiny_lm()
        cfg = lm_config()
        torch.manual_seed(0)
        dec = vpd.Decomposition(model, cfg)
        if not cast_once:
            monkeypatch.setattr(dec, "cast_once", lambda autocast: contextlib.nullcontext())
        x, _ = models.token_batches(tcfg, 4, seed=0)("train", 0)
        with CountCasts([t for c in dec.comps.values() for t in (c.V, c.U, c.weight)]) as casts:
            losses, _ = vpd.training_losses(dec, x, vpd.Adversary(), cfg, p=1.5, adv_lr=0.01, autocast=autocast)
            sum(losses.values()).backward()
        return losses, [p.grad for p in dec.parameters() if p.requires_grad], casts.n

    losses, grads, casts = step(torch.autocast("cpu", torch.bfloat16))
    assert set(casts) == {1}
    every_pass = step(torch.autocast("cpu", torch.bfloat16), cast_once=False)
    assert set(every_pass[2]) == {3, 5}
    assert {k: v.item() for k, v in losses.items()} == {k: v.item() for k, v in every_pass[0].items()}
    for g, h in zip(grads, every_pass[1]):  # V, U's gradients add up in bf16 before their one cast back
        torch.testing.assert_close(g, h, rtol=1e-2, atol=1e-5)
    assert set(step(contextlib.nullcontext())[2]) == {0}


def test_compiled_reconstruction_loss_gives_the_eager_losses_and_gradients():
    """On CUDA training compiles the reconstruction loss (dynamic shapes); traced here with the aot_eager
    backend (inductor's own code is for the GPU): the same losses, gradients and metrics as eager, for
    every kind of call a training step and an evaluation make, on the padded logits' view."""
    def step(compiled):
        model, tcfg = tiny_lm()
        cfg = lm_config(adv_routing="uniform_k_subset")
        torch.manual_seed(0)
        dec = vpd.Decomposition(model, cfg)
        if compiled:
            dec.recon_loss = torch.compile(vpd.recon_loss, dynamic=True, backend="aot_eager")
        x, y = models.token_batches(tcfg, 4, seed=0)("train", 0)
        torch.manual_seed(1)
        losses, _ = vpd.training_losses(dec, x, vpd.Adversary(), cfg, p=1.5, adv_lr=0.01)
        sum(losses.values()).backward()
        metrics, _ = vpd.evaluate_batch(dec, x, y, dataclasses.replace(cfg, eval_adv_steps=[0, 3]))
        return losses, [p.grad for p in dec.parameters() if p.requires_grad], metrics

    eager, compiled = step(False), step(True)
    for k in eager[0]:
        assert compiled[0][k].item() == pytest.approx(eager[0][k].item(), rel=1e-6, abs=1e-9), k
    for g, h in zip(compiled[1], eager[1]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    assert compiled[2] == pytest.approx(eager[2], rel=1e-5, abs=1e-9)


def test_lm_run_end_to_end(tmp_path):
    model, tcfg = tiny_lm()
    cfg = lm_config(out_dir=str(tmp_path), steps=6, batch_size=4, eval_interval=3, log_interval=3, ckpt_interval=3,
                    faith_warmup_steps=5, eval_adv_steps=[0, 3])
    metrics = vpd.train(cfg, model, models.token_batches(tcfg, 4, seed=0))
    assert metrics["step"] == 6 and metrics["ce/target"] > 0
    assert {"l0_layer/h.0", "l0_layer/h.1", "ce_unrecovered/ci", "alive/total"} <= set(metrics)
    assert metrics["l0/total"] == pytest.approx(metrics["l0_layer/h.0"] + metrics["l0_layer/h.1"])
    assert metrics["ce_unrecovered/zero"] == pytest.approx(1.0)


def test_short_run_recovers_tms_5_2(tmp_path):
    """configs/tms_5_2.py shortened to fit the suite (3k steps at batch 1024 and twice the rate, ~35-70 s on
    2 cores; the full recipe runs 7k at 2048) finds one subcomponent per feature in both matrices with the
    features' norms, and linear1's exact CI pattern. linear2's pattern is exact only after the full run
    (0 / 0, RESULTS.md); here each feature's own subcomponent is on and the rest leak up to ~0.2 (seed 0:
    4 or 5 of the 25 probe entries more than 0.1 off, depending on the machine's rounding), so linear2 is
    checked at a tolerance of 0.3."""
    cfg, tcfg = vpd.configure([os.path.join(os.path.dirname(__file__), "configs", "tms_5_2.py"),
                               f"--out_dir={tmp_path}", f"--target_path={tmp_path}/target.pt", "--device='cpu'",
                               "--steps=3000", "--batch_size=1024", "--lr=4e-3"],
                              vpd.Config(), models.TargetConfig())
    model, get_batch, truth = models.build(tcfg, cfg)
    metrics = vpd.train(cfg, model, get_batch, truth)
    assert metrics["mmcs"] > 0.999
    assert abs(metrics["ml2r"] - 1) < 0.02
    assert metrics["alive/linear1"] == 5 and metrics["alive/linear2"] == 5
    assert metrics["ci_error/linear1"] == 0
    dec = vpd.Decomposition(models.build(tcfg, cfg)[0], cfg)  # train() wrapped `model` in place
    vpd.load_decomposition_state(dec, vpd.load_checkpoint(tmp_path / "ckpt.pt"))
    assert vpd.target_ci_error(vpd.probe_ci(dec, truth["probes"])["linear2"], ("identity", 5), tol=0.3) == 0
    for figure in ("ci_probes.png", "features.png", "training.png"):
        assert os.path.exists(tmp_path / figure)
    # the toy edit (notebooks/tms_method.py) on this decomposition: rescaling feature 0's subcomponent moves feature
    # 0's output alone; its trained scalar leaves inputs without feature 0 as they were, however few examples it
    # saw, unlike a rank-1 LoRA on the same matrix
    plain, dec, comps, _, _ = vpd.load_decomposition(str(tmp_path / "ckpt.pt"))
    key = f"linear1:{vpd.toy_feature_metrics(plain.linear1.weight, dec.comps['linear1'])[2][0].item()}"
    probes = 0.75 * torch.eye(5)
    with torch.no_grad():
        before = plain(probes)
        for m in (0.0, 2.0):
            with edit.applied(edit.ScalarEdit(comps, [key], init=m), plain):
                moved = plain(probes) - before
            assert (moved[0, 0] < -0.3 if m == 0 else moved[0, 0] > 0.3) and moved[1:].abs().max() < 0.1
    x = get_batch("val", 0)[0]
    x_remove, has_0 = x[x[:, 0] > 0][:4], x[:, 0] > 0
    for n in (1, 4):
        hurt = {}
        for kind, ed in (("scalar", edit.ScalarEdit(comps, [key])), ("lora", edit.LoRA(plain, ["linear1"], 1, n))):
            opt = torch.optim.Adam(ed.parameters(), lr=0.05)
            for _ in range(100):  # drive feature 0's output to 0 on n examples with feature 0, nothing else
                with edit.applied(ed, plain):
                    loss = plain(x_remove[:n])[:, 0].pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                with edit.applied(ed, plain):
                    after = plain(x[~has_0])
                hurt[kind] = (after - plain(x[~has_0])).pow(2).mean().item()
        assert hurt["scalar"] < 1e-3 and hurt["scalar"] < hurt["lora"]


# -- §6 metrics ----------------------------------------------------------------------------------------------

def test_evaluation_averages_its_batches():
    dec, cfg = decomposition(eval_adv_steps=[], eval_batches=2)
    batches = [torch.randn(8, 4), 3 * torch.randn(8, 4)]
    metrics = vpd.evaluate(dec, lambda split, i: (batches[i], None), cfg)
    each = [vpd.evaluate_batch(dec, b, None, cfg)[0] for b in batches]
    for key in ("recon/ci", "recon/ones", "l0/0", "l0/2"):
        assert metrics[key] == pytest.approx((each[0][key] + each[1][key]) / 2, rel=1e-5)


def test_target_ci_error_patterns():
    perfect = torch.zeros(3, 5)
    perfect[0, 4] = perfect[1, 0] = perfect[2, 2] = 1.0
    assert vpd.target_ci_error(perfect, ("identity", 3)) == 0
    noisy = perfect.clone()
    noisy[0, 1] = 0.5     # an off-pattern entry
    noisy[2, 2] = 0.85    # a diagonal entry below 1 - tol
    assert vpd.target_ci_error(noisy, ("identity", 3)) == 2
    dense = torch.zeros(4, 6)
    dense[:, [1, 3]] = 1.0
    assert vpd.target_ci_error(dense, ("dense", 2)) == 0
    dense[2, 3] = 0.0
    assert vpd.target_ci_error(dense, ("dense", 2)) == 1
    # Goodfire's count-only reading: columns 1 and 3 are each fully on somewhere, the rest silent
    assert vpd.target_ci_error(dense, ("dense_count", 2)) == 0
    dense[:, 3] = 0.5     # column 3 half on everywhere: 4 errors in the strict reading, 1 (never on) here
    dense[0, 5] = 0.2     # a third column switches on a little: one extra error in both readings
    assert vpd.target_ci_error(dense, ("dense", 2)) == 5
    assert vpd.target_ci_error(dense, ("dense_count", 2)) == 2
    # columns ranked by CI mass, not by their largest entry; exactly 1 - tol counts as on
    edge = torch.zeros(3, 3)
    edge[:, 0] = 0.9      # mass 2.7, on
    edge[:, 2] = 0.6      # mass 1.8: in the top 2 but never on (1 error)
    edge[0, 1] = 0.95     # mass 0.95: outside the top 2, one entry above tol (1 error)
    assert vpd.target_ci_error(edge, ("dense_count", 2)) == 2
    with pytest.raises(ValueError, match="C >= 4"):
        vpd.target_ci_error(edge, ("dense_count", 4))


def test_evaluation_scores_dense_patterns_both_ways(monkeypatch):
    """A TMS-id identity layer (dense, k = n_hidden) is scored in the method's reading and Goodfire's
    count-only one; identity patterns have only the one reading."""
    calls, score = [], vpd.target_ci_error
    monkeypatch.setattr(vpd, "target_ci_error", lambda ci, pattern: calls.append((pattern, tuple(ci.shape)))
                        or score(ci, pattern))
    tcfg = models.TargetConfig(identity_layer=True)
    torch.manual_seed(0)
    model = models.build_model(tcfg)
    cfg = vpd.Config(modules={"linear1": 6, "hidden": 4, "linear2": 6}, device="cpu")
    dec = vpd.Decomposition(model, cfg)
    truth = models.toy_truth(tcfg, model, "cpu")
    metrics = vpd.evaluate(dec, models.sparse_features(tcfg, 32, 0), cfg, truth)
    ci = vpd.probe_ci(dec, truth["probes"])["hidden"]
    assert metrics["ci_error/hidden"] == score(ci, ("dense", tcfg.n_hidden))
    assert metrics["ci_error_count/hidden"] == score(ci, ("dense_count", tcfg.n_hidden))
    assert "ci_error_count/linear1" not in metrics
    assert (("dense", 2), (5, 4)) in calls and (("dense_count", 2), (5, 4)) in calls  # k = n_hidden, on `hidden`


def test_evaluation_metrics_under_ci_masks_by_hand():
    """recon/ci, hidden_mse/ci/<matrix> and l0/<matrix> of one batch, recomputed from V, U and the CI:
    under CI masks (δ = 0) each matrix computes ((x V) ⊙ g) U + b on its masked input."""
    dec, cfg = decomposition(eval_adv_steps=[])
    x = torch.randn(16, 4)
    metrics, ci = vpd.evaluate_batch(dec, x, None, cfg)
    g0, g2 = dec.split(ci).values()
    (W0, b0), (W2, b2) = ((c.W, c.bias) for c in dec.comps.values())
    V0, U0, V2, U2 = dec.comps["0"].V, dec.comps["0"].U, dec.comps["2"].V, dec.comps["2"].U
    with torch.no_grad():
        target0, out0 = x @ W0.T + b0, ((x @ V0) * g0) @ U0 + b0
        target2, out2 = target0.relu() @ W2.T + b2, ((out0.relu() @ V2) * g2) @ U2 + b2
    assert metrics["hidden_mse/ci/0"] == pytest.approx((out0 - target0).pow(2).mean().item(), rel=1e-5)
    assert metrics["hidden_mse/ci/2"] == pytest.approx((out2 - target2).pow(2).mean().item(), rel=1e-5)
    assert metrics["recon/ci"] == pytest.approx(metrics["hidden_mse/ci/2"], rel=1e-6)  # layer 2 is the output
    assert metrics["l0/0"] == pytest.approx((g0 > cfg.ci_threshold).sum(-1).float().mean().item())
    with torch.no_grad():  # rounded: CI above the threshold -> 1, else 0; δ = 0 again
        r0, r2 = (g0 > cfg.ci_threshold).float(), (g2 > cfg.ci_threshold).float()
        rounded = ((((x @ V0) * r0) @ U0 + b0).relu() @ V2 * r2) @ U2 + b2
    assert metrics["recon/rounded"] == pytest.approx((rounded - target2).pow(2).mean().item(), rel=1e-5)
    assert "recon/adv20" not in metrics and metrics["recon/ones"] > 0  # all ones, δ = 0: Δ is missing


def test_mmcs_ml2r_of_an_exact_decomposition():
    W = torch.randn(2, 5)  # TMS linear1.weight [n_hidden, n_features]
    comp = vpd.Components(nn.Linear(5, 2, bias=False), C=7)
    with torch.no_grad():  # subcomponent j is feature j's column: V = e_j, U[j] = W[:, j]
        comp.V.zero_()
        comp.U.zero_()
        comp.V[torch.arange(5), torch.arange(5)] = 1.0
        comp.U[:5] = W.T
    mmcs, ml2r, best = vpd.toy_feature_metrics(W, comp)
    assert mmcs == pytest.approx(1.0) and ml2r == pytest.approx(1.0) and best.tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        comp.U[:5] *= 2  # the right directions at twice the norm
    mmcs, ml2r, _ = vpd.toy_feature_metrics(W, comp)
    assert mmcs == pytest.approx(1.0) and ml2r == pytest.approx(2.0)


def test_lm_metrics_on_hand_built_masks():
    model, tcfg = tiny_lm()
    reference = copy.deepcopy(model)
    dec = vpd.Decomposition(model, lm_config())
    x, y = models.token_batches(tcfg, 4, seed=0)("val", 0)
    with torch.no_grad():
        target_out = dec(x)
        ones = {n: (torch.ones(4, 8, c.V.shape[1]), torch.ones(4, 8)) for n, c in dec.comps.items()}
        out = dec.masked(x, ones)
    assert vpd.recon_loss(out, target_out, "kl").item() == pytest.approx(0.0, abs=1e-6)
    metrics, _ = vpd.evaluate_batch(dec, x, y, lm_config(eval_adv_steps=[0, 5]))
    with torch.no_grad():  # zero masks with δ = 0: the decomposed matrices contribute nothing
        for name, mod in reference.named_modules():
            if any(fnmatch.fnmatchcase(name, p) for p in LM_MODULES):
                mod.weight.zero_()
        zero_ablated = reference(x)
    assert metrics["ce/zero"] == pytest.approx(vpd.lm_ce(zero_ablated, y), rel=1e-5)
    assert metrics["ce/target"] == pytest.approx(vpd.lm_ce(target_out, y), rel=1e-6)
    assert metrics["recon/adv5"] >= metrics["recon/adv0"]
    assert set(k for k in metrics if k.startswith("l0/")) == {f"l0/{n}" for n in dec.comps}
    # under bf16 autocast (as training on CUDA): the same metrics, to bf16 precision
    with torch.autocast("cpu", torch.bfloat16):
        bf16, _ = vpd.evaluate_batch(dec, x, y, lm_config(eval_adv_steps=[0, 5]))
    assert bf16.keys() == metrics.keys()
    assert bf16["ce/zero"] == pytest.approx(metrics["ce/zero"], rel=0.02)
    assert bf16["ce/ones"] == pytest.approx(metrics["ce/ones"], rel=0.02)


def test_no_evaluation_adversary_when_eval_adv_steps_is_empty(tmp_path):
    cfg, tcfg, model = toy_run(tmp_path, eval_adv_steps=[], steps=10, eval_interval=10)
    metrics = vpd.train(cfg, model, models.sparse_features(tcfg, cfg.batch_size, cfg.seed))
    assert "recon/ci" in metrics and not any(k.startswith("recon/adv") for k in metrics)


def test_a_toy_decomposed_in_part_is_scored_on_its_decomposed_matrices(tmp_path):
    cfg, tcfg, model = toy_run(tmp_path, steps=10, modules={"linear2": 6})
    truth = models.toy_truth(tcfg, model, "cpu")
    metrics = vpd.train(cfg, model, models.sparse_features(tcfg, cfg.batch_size, cfg.seed), truth)
    assert "ci_error/linear2" in metrics and "ci_error/linear1" not in metrics and "mmcs" not in metrics
    assert metrics["ci_error/total"] == metrics["ci_error/linear2"] and os.path.exists(tmp_path / "run" / "ci_probes.png")


def test_evaluation_leaves_autocast_as_it_found_it():
    """A bf16 run evaluates under its autocast; afterwards autocast must be off again, or every later
    backward (and the fp32 Δ of L_faith) would run in bf16. (A torch.autocast entered twice, nested, stayed
    on.) On a CPU autocast object, as CUDA's is not available here."""
    dec, cfg = decomposition(eval_adv_steps=[2])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    vpd.evaluate(dec, lambda split, i: (torch.randn(8, 4), None), cfg, autocast=autocast)
    assert not torch.is_autocast_enabled("cpu")
    with dec.cast_once(autocast), autocast:  # what evaluate does: the casts are bf16 inside
        assert dec.comps["0"].cast[0].dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu") and dec.comps["0"].cast is None


# -- §7 attribution graphs -----------------------------------------------------------------------------------

class ResidualPair(nn.Module):
    """Two decomposed matrices in a row with tanh between them and a residual around the first (no attention):
    out = l2(tanh(x + l1(x))). The input reaches l2 directly and through l1, so a graph without the stop-gradient
    differs from one with it."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(torch.tanh(x + self.l1(x)))


def test_attribution_edges_by_hand_through_a_nonlinearity():
    """Every edge of the graph equals its value written out: l1 -> l2 is (U1[c'] ⊙ σ'(h)) · V2[:, c] · a1_c' · g1_c';
    the input reaches l2 through the residual and Δ1 only (the stop-gradient on l1's subcomponents), so
    input -> l2 is x · (I + Δ1^T)(σ'(h) ⊙ V2[:, c]); l2 -> output j is U2[c, j] a2_c g2_c. Pairs joined only through
    a third subcomponent (l1 -> output) have no edge. ci_weighted=False drops the g factor."""
    torch.manual_seed(0)
    dec = vpd.Decomposition(ResidualPair(), vpd.Config(modules={"l1": 5, "l2": 6}, ci_hidden=4))
    x = torch.randn(1, 4)
    with torch.no_grad():
        target = dec(x)
        ci = dec.causal_importance()[0]
        with vpd.detached_subcomponents(dec):                          # the forward the gradients run through
            assert torch.allclose(dec(x), target, atol=1e-6)
    c1, c2 = dec.comps["l1"], dec.comps["l2"]
    g1, g2 = dec.split(ci)["l1"][0], dec.split(ci)["l2"][0]
    h = (x + x @ c1.W.T + c1.bias)[0]
    ds, a1, a2 = 1 - torch.tanh(h) ** 2, (x @ c1.V)[0], torch.tanh(h) @ c2.V
    want = {(f"l1:{i}@0", f"l2:{c}@0"): ((c1.U[i] * ds) @ c2.V[:, c] * a1[i] * g1[i]).item() for i in range(5) for c in range(6)}
    want |= {("embed@0", f"l2:{c}@0"): (x[0] @ ((torch.eye(4) + c1.delta().T) @ (ds * c2.V[:, c]))).item() for c in range(6)}
    want |= {("embed@0", f"l1:{c}@0"): (x[0] @ c1.V[:, c]).item() for c in range(5)}
    want |= {(f"l2:{c}@0", f"output:{j}@0"): (c2.U[c, j] * a2[c] * g2[c]).item() for c in range(6) for j in range(3)}
    graph = vpd.attribution_graph(dec, x, threshold=-1.0, logits=False, max_edges=10**6)  # every node, every edge
    got = {(e["source"], e["target"]): e["attribution"] for e in graph["edges"]}
    assert set(got) == {k for k, v in want.items() if v != 0}
    assert all(got[k] == pytest.approx(v, abs=1e-6) for k, v in got.items() for v in [want[k]])
    plain = vpd.attribution_graph(dec, x, threshold=-1.0, ci_weighted=False, logits=False, max_edges=10**6)
    e = {(e["source"], e["target"]): e["attribution"] for e in plain["edges"]}
    assert all(e[f"l1:{i}@0", f"l2:{c}@0"] == pytest.approx(((c1.U[i] * ds) @ c2.V[:, c] * a1[i]).item(), abs=1e-6)
               for i in range(5) for c in range(6))
    assert len(graph["nodes"]) == 1 + 5 + 6 + 3                        # input, l1, l2, the 3 output coordinates


def test_attribution_graph_of_a_transformer_crosses_positions_only_from_k_v_to_o(lm_decomposition):
    _, _, ckpt = lm_decomposition
    _, dec, _, _, _ = vpd.load_decomposition(ckpt)
    x = torch.randint(32, (1, 8), generator=torch.Generator().manual_seed(3))
    link = vpd.links(dec, x)
    crossing = {(s, t) for t, sources in link.items() for s, cross in sources.items() if cross}
    assert crossing == {(f"h.{i}.attn.{kv}_proj", f"h.{i}.attn.o_proj") for i in (0, 1) for kv in "kv"}
    assert "h.0.attn.q_proj" in link["h.0.attn.o_proj"] and "h.0.attn.o_proj" not in link["h.1.attn.o_proj"]
    graph = vpd.attribution_graph(dec, x, position=5, max_edges=10**6)
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert all(n["position"] <= 5 for n in nodes.values()) and any(n["layer"] == "output" for n in nodes.values())
    across = [e for e in graph["edges"] if nodes[e["source"]]["position"] != nodes[e["target"]]["position"]]
    assert across and all(re.fullmatch(r"h\.(\d)\.attn\.[kv]_proj", nodes[e["source"]]["layer"]) and
                          nodes[e["target"]]["layer"] == nodes[e["source"]]["layer"][:-6] + "o_proj" and
                          nodes[e["source"]]["position"] < nodes[e["target"]]["position"] for e in across)
    assert all(e["source"] in nodes and e["target"] in nodes for e in graph["edges"])


def test_optimised_ci_prunes_without_losing_the_label_and_faithfulness_reads_the_masks(lm_decomposition):
    _, _, ckpt = lm_decomposition
    _, dec, _, _, _ = vpd.load_decomposition(ckpt)
    x = torch.randint(32, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        label = dec(x)[0, -1].argmax().item()
        dec(x)
        ci = dec.causal_importance()[0]
    optimised = vpd.optimise_ci(dec, x, label, steps=60, lr=0.05, imp_coeff=0.05)
    assert ((optimised > 0) <= (ci > 0)).all() and (optimised > 0).sum() < (ci > 0).sum()   # a subset survives
    ce = lambda g: vpd.label_ce(dec, x, dec.masks(g, torch.zeros(*g.shape[:-1], g.shape[-1] + len(dec.Cs))), label, -1).item()
    assert ce(optimised) <= ce(ci) + 0.05
    for g in (ci, optimised):
        f = vpd.faithfulness(dec, x, label, g)
        assert f["target"] == pytest.approx(torch.softmax(dec(x)[0, -1], -1)[label].item())
        assert f["ci"] == pytest.approx(math.exp(-ce(g)), rel=1e-5)
        assert all(0 < v <= 1 for v in f.values())
    # the adversary's sign-gradient steps raise the label's CE from its random start (same seed: the same start)
    free = ci > 0.5
    starts = []
    for steps in (0, 10):
        torch.manual_seed(7)
        sources = vpd.prompt_adversary(dec, x, ci, label, -1, steps, step_size=0.02, free=free)
        assert (sources[..., :ci.shape[-1]][~free] == 0).all() and (sources[..., ci.shape[-1]:] == 0).all()
        starts.append(vpd.label_ce(dec, x, dec.masks(ci, sources), label, -1).item())
    assert starts[1] > starts[0]
    ones = torch.ones_like(ci)                                          # all masks 1: the adversary has nothing
    assert vpd.faithfulness(dec, x, label, ones)["adversarial"] == pytest.approx(vpd.faithfulness(dec, x, label, ones)["ci"])


# -- Appendix A: data parallelism, two gloo processes --------------------------------------------------------

def _ddp_step(rank, world, init_file, out_file):
    """One training step's losses and synchronised gradients on this process's half of a batch. The
    random draws are replaced by a constant so that 1 and 2 processes see the same masks."""
    import torch.distributed as dist
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    real_rand = torch.rand
    torch.rand = lambda *size, **kw: torch.full(size[0] if len(size) == 1 and not isinstance(size[0], int) else size,
                                                0.5, device=kw.get("device"))
    try:
        model, tcfg = tiny_lm()
        cfg = lm_config(routing="all")
        torch.manual_seed(0)
        dec = vpd.Decomposition(model, cfg)
        x, _ = models.token_batches(tcfg, 4, seed=0)("train", 0)
        x = x[rank * 4 // world:(rank + 1) * 4 // world]
        losses, _ = vpd.training_losses(dec, x, vpd.Adversary(), cfg, p=1.5, adv_lr=0.01)
        total = sum(losses.values())
        total.backward()
        params = [p for p in dec.parameters() if p.requires_grad]
        vpd.sync_gradients(params)
        if world > 1:
            dist.all_reduce(total.detach_())
            total /= world
        if rank == 0:
            torch.save({"total": total, "grads": [p.grad for p in params]}, out_file)
    finally:
        torch.rand = real_rand
        if world > 1:
            dist.barrier()  # neither process tears down its gloo pairs while the other still uses them
            dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    _ddp_step(0, 1, None, tmp_path / "one.pt")
    mp.spawn(_ddp_step, args=(2, str(tmp_path / "init"), tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["total"].item() == pytest.approx(one["total"].item(), rel=1e-5)
    for g1, g2 in zip(one["grads"], two["grads"]):
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4)


def _ddp_train(rank, world, init_file, tmp_path):
    """Two processes train: a whole run, then the same run crashing after its checkpoint, then resumed."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        runs = {name: toy_run(tmp_path, out_dir=str(tmp_path / name), steps=6, ckpt_interval=3, eval_interval=6,
                              grad_clip=0.01) for name in ("whole", "crash", "resumed")}
        get_batch = models.sparse_features(runs["whole"][1], 64, 0, rank=rank)
        def crashing(split, step):
            if split == "train" and step == 4:
                raise KeyboardInterrupt
            return get_batch(split, step)
        vpd.train(runs["whole"][0], runs["whole"][2], get_batch)
        with pytest.raises(KeyboardInterrupt):
            vpd.train(runs["crash"][0], runs["crash"][2], crashing)
        cfg, _, model = runs["resumed"]
        cfg.out_dir, cfg.init_from = runs["crash"][0].out_dir, "resume"
        vpd.train(cfg, model, get_batch)
    finally:
        dist.destroy_process_group()


def test_two_process_training_resumes_exactly_with_each_rank_its_own_noise(tmp_path):
    import torch.multiprocessing as mp
    toy_run(tmp_path)  # trains the target once, before the processes share it
    mp.spawn(_ddp_train, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2)
    whole, resumed = (train_losses(tmp_path / d / "metrics.jsonl") for d in ("whole", "crash"))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(whole, resumed):  # the logged losses are means over both processes
        assert {k: a[k] for k in ("imp", "stoch", "adv", "total")} == {k: b[k] for k in ("imp", "stoch", "adv", "total")}
    evals = [r for r in map(json.loads, open(tmp_path / "crash" / "metrics.jsonl")) if "recon/ci" in r]
    assert len(evals) == 1 and evals[0]["step"] == 6
    ckpt0 = torch.load(tmp_path / "crash" / "ckpt.pt", weights_only=True)
    ckpt1 = torch.load(tmp_path / "crash" / "ckpt_rank1.pt", weights_only=True)
    assert ckpt0["step"] == ckpt1["step"] == 6
    # each rank drew its own adversary (and masks): the persistent sources differ between the ranks
    assert not torch.equal(ckpt0["adversary"]["sources"], ckpt1["adversary"]["sources"])
    assert not torch.equal(ckpt0["rng"]["cpu"], ckpt1["rng"]["cpu"])


# -- Appendix B: checkpoints, resume, and Goodfire's decompositions imported ---------------------------------

def test_checkpoint_contents_and_resume_equality(tmp_path, monkeypatch):
    cfg, tcfg, model = toy_run(tmp_path, grad_clip=0.01)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    vpd.train(cfg, model, get_batch, models.toy_truth(tcfg, model, "cpu"))
    uninterrupted = train_losses(os.path.join(cfg.out_dir, "metrics.jsonl"))

    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 20 and ckpt["config"]["steps"] == 20
    assert ckpt["components"]["linear1"]["V"].shape == (5, 20) and ckpt["components"]["linear1"]["U"].shape == (20, 2)
    assert set(ckpt["target"]) == {"linear1.weight", "linear2.weight", "linear2.bias"}
    assert ckpt["adversary"]["sources"].shape == (64, 20 + 20 + 2)
    assert ckpt["adversary"]["t"] == 20 * (cfg.adv_steps + 1)  # the inner ascent steps and the outer one

    # the same run, crashing at step 15 (after the checkpoint at 10), then resumed
    cfg2, _, model2 = toy_run(tmp_path, out_dir=str(tmp_path / "crash"), grad_clip=0.01)
    def crashing(split, step):
        if split == "train" and step == 15:
            raise KeyboardInterrupt
        return get_batch(split, step)
    with pytest.raises(KeyboardInterrupt):
        vpd.train(cfg2, model2, crashing, None)
    assert torch.load(os.path.join(cfg2.out_dir, "ckpt.pt"), weights_only=True)["step"] == 10
    _, _, model3 = toy_run(tmp_path)
    cfg2.init_from = "resume"
    vpd.train(cfg2, model3, get_batch, None)
    resumed = train_losses(os.path.join(cfg2.out_dir, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 21))  # the crashed run's steps 11-15 were dropped
    for a, b in zip(uninterrupted, resumed):
        assert {k: a[k] for k in ("faith", "imp", "stoch", "adv", "total")} == \
               {k: b[k] for k in ("faith", "imp", "stoch", "adv", "total")}, a["step"]


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg, tcfg, model = toy_run(tmp_path, init_from="resume")
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        vpd.train(cfg, model, get_batch)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "ckpt.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        vpd.train(cfg, toy_run(tmp_path)[2], get_batch)


def test_resuming_with_another_C_or_a_finished_run(tmp_path, capsys):
    cfg, tcfg, model = toy_run(tmp_path, eval_interval=0)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    vpd.train(cfg, model, get_batch)
    other = dataclasses.replace(cfg, init_from="resume", modules={"linear1": 20, "linear2": 12})
    with pytest.raises(ValueError, match=r"other C .*'linear2': '\(2, 20\) there, \(2, 12\) here'"):
        vpd.train(other, toy_run(tmp_path)[2], get_batch)
    finished = vpd.train(dataclasses.replace(cfg, init_from="resume"), toy_run(tmp_path)[2], get_batch)
    assert "step 20 of 20: nothing to train; evaluating the decomposition" in capsys.readouterr().out
    assert finished["step"] == 20 and {"recon/ci", "l0/total", "alive/total"} <= set(finished)  # not `final: {}`
    wider = dataclasses.replace(cfg, init_from="resume", ci_hidden=cfg.ci_hidden + 1)
    with pytest.raises(ValueError, match="another CI function"):
        vpd.train(wider, toy_run(tmp_path)[2], get_batch)
    torch.save({"step": 3}, tmp_path / "foreign.pt")  # a readable file that is not a vpd.py checkpoint
    with pytest.raises(RuntimeError, match="lacks .*'components'.*not a vpd.py checkpoint"):
        vpd.load_checkpoint(str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="tie 'linear2' -> 'hidden': both must be decomposed"):
        vpd.Decomposition(toy_run(tmp_path)[2], dataclasses.replace(cfg, tie={"linear2": "hidden"}))


def test_resumes_that_change_the_run_or_find_its_last_evaluation_lost(tmp_path, capsys):
    cfg, tcfg, model = toy_run(tmp_path, steps=10, eval_interval=5, ckpt_interval=5)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    vpd.train(cfg, model, get_batch)
    metrics_path, png = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "training.png"
    lines = open(metrics_path).readlines()
    open(metrics_path, "w").writelines(lines[:-1])  # the final evaluation crashed after the checkpoint
    os.remove(png)
    finished = dataclasses.replace(cfg, init_from="resume")
    for _ in range(2):  # the lost evaluation is logged once, and the figures drawn
        vpd.train(finished, toy_run(tmp_path)[2], get_batch)
        evals = [json.loads(line)["step"] for line in open(metrics_path) if "l0/total" in line]
        assert evals == [5, 10] and os.path.exists(png)
    # longer, with the adversarial loss switched off and another weight decay; the figures still drawn
    longer = dataclasses.replace(finished, steps=14, adv_coeff=0.0, weight_decay=0.5, dtype="bfloat16")
    capsys.readouterr()
    vpd.train(longer, toy_run(tmp_path)[2], get_batch)
    said = capsys.readouterr().out
    assert "resuming a run of 10 steps as one of 14" in said and "this run on the CPU is float32" in said
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 14 and all(g["weight_decay"] == 0.5 for g in ckpt["optimizer"]["param_groups"])
    assert "adv" not in json.loads(open(metrics_path).readlines()[-2]) and os.path.exists(png)
    # a fresh run sets every rank's file aside: one left by a larger world must not be resumed later
    torch.save({"step": 10}, tmp_path / "run" / "ckpt_rank1.pt")
    vpd.train(dataclasses.replace(cfg, steps=2), toy_run(tmp_path)[2], get_batch)
    assert not os.path.exists(tmp_path / "run" / "ckpt_rank1.pt") and os.path.exists(tmp_path / "run" / "ckpt_rank1.pt.prev")


def test_non_finite_weights_never_replace_the_last_good_checkpoint(tmp_path):
    cfg, tcfg, model = toy_run(tmp_path, eval_interval=0)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)

    def poisoning(split, step):  # the step before the checkpoint at 20: a finite loss, NaN gradients on V
        if split == "train" and step == 19:
            model.linear1.V.register_hook(lambda g: g * float("nan"))
        return get_batch(split, step)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        vpd.train(cfg, model, poisoning)
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 10 and torch.isfinite(ckpt["components"]["linear1"]["V"]).all()


def test_resume_after_a_torn_log_line_with_another_batch_size_and_zero_intervals(tmp_path, capsys):
    cfg, tcfg, model = toy_run(tmp_path, eval_interval=0)
    vpd.train(cfg, model, models.sparse_features(tcfg, cfg.batch_size, cfg.seed))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    with open(metrics_path, "a") as f:
        f.write('{"step": 21, "faith": 0.')  # a crash in the middle of a write
    _, _, model2 = toy_run(tmp_path)
    cfg2 = dataclasses.replace(cfg, init_from="resume", steps=30, batch_size=32, log_interval=0, ckpt_interval=0)
    vpd.train(cfg2, model2, models.sparse_features(tcfg, 32, cfg.seed))
    assert "starting afresh" in capsys.readouterr().out  # the adversary's saved sources were for batch 64
    assert [r["step"] for r in train_losses(metrics_path)] == list(range(1, 21)) + [30]  # 0: only at the end
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 30 and ckpt["adversary"]["sources"].shape[0] == 32
    # a fresh run in the same out_dir sets the earlier checkpoint aside instead of leaving it to a resume
    _, _, model3 = toy_run(tmp_path)
    vpd.train(dataclasses.replace(cfg, steps=5), model3, models.sparse_features(tcfg, cfg.batch_size, cfg.seed))
    assert torch.load(os.path.join(cfg.out_dir, "ckpt.pt.prev"), weights_only=True)["step"] == 30


# Goodfire's saved decompositions, written with their key names and shapes (vpd.import_goodfire's docstring)
TINY_GOODFIRE = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab=32, C={"q": 4, "k": 4, "v": 6, "o": 6, "c_fc": 8,
                     "down_proj": 10}, ci_d_model=16, ci_blocks=2, ci_heads=2, ci_mlp=32)

PILE4L_GOODFIRE = dict(n_layers=4, d_model=768, n_heads=6, d_mlp=3072, vocab=50277, C={"q": 512, "k": 512, "v": 1024,
                       "o": 1024, "c_fc": 3072, "down_proj": 3584}, ci_d_model=2048, ci_blocks=8, ci_heads=16, ci_mlp=8192)


def write_goodfire_run(directory, n_layers, d_model, n_heads, d_mlp, vocab, C, ci_d_model, ci_blocks, ci_heads, ci_mlp,
                       step=400_000, legacy=True, seed=0):
    """A Goodfire run directory with random weights: model_<step>.pth (target_model.*, _components.*, the global CI
    transformer's ci_fn._global_ci_fn.*, their Linear's W stored [in, out]) and final_config.yaml (legacy) or
    run_meta.yaml. At PILE4L_GOODFIRE's sizes, the stand-in for run s-55ea3f9b:
    python -c "import test_vpd as t; t.write_goodfire_run('out/standin', **t.PILE4L_GOODFIRE)" """
    import yaml
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    target = models.LlamaSimpleMLP(vocab, d_model, n_layers, n_heads, d_mlp)
    sd = {f"target_model.{k}": v for k, v in target.state_dict().items()}
    paths = {f"h.{i}.{kind}": (C[name], *target.get_submodule(f"h.{i}.{kind}").weight.shape[::-1])
             for i in range(n_layers) for name, kind in (("q", "attn.q_proj"), ("k", "attn.k_proj"), ("v", "attn.v_proj"),
                                                         ("o", "attn.o_proj"), ("c_fc", "mlp.c_fc"), ("down_proj", "mlp.down_proj"))}
    for path, (c, d_in, d_out) in paths.items():
        sd[f"_components.{path.replace('.', '-')}.V"] = torch.randn(d_in, c) / d_in ** 0.5
        sd[f"_components.{path.replace('.', '-')}.U"] = torch.randn(c, d_out) / c ** 0.5
    ci = {"_input_projector.W": torch.randn(sum(d for _, d, _ in paths.values()), ci_d_model) * 0.02,
          "_input_projector.b": torch.randn(ci_d_model) * 0.1,
          "_output_head.W": torch.randn(ci_d_model, sum(c for c, _, _ in paths.values())) * 0.1,
          "_output_head.b": torch.randn(sum(c for c, _, _ in paths.values())) * 0.2}
    head = ci_d_model // ci_heads
    for i in range(ci_blocks):
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            ci[f"_blocks.{i}.attn.{n}.weight"] = torch.randn(ci_d_model, ci_d_model) * ci_d_model ** -0.5
        ci[f"_blocks.{i}.attn.rope.inv_freq"] = 1 / 10000 ** (torch.arange(0, head, 2).float() / head)
        ci[f"_blocks.{i}.mlp.0.W"], ci[f"_blocks.{i}.mlp.0.b"] = torch.randn(ci_d_model, ci_mlp) * ci_d_model ** -0.5, torch.randn(ci_mlp) * 0.3
        ci[f"_blocks.{i}.mlp.2.W"], ci[f"_blocks.{i}.mlp.2.b"] = torch.randn(ci_mlp, ci_d_model) * ci_mlp ** -0.5, torch.randn(ci_d_model) * 0.3
    sd |= {f"ci_fn._global_ci_fn.{k}": v for k, v in ci.items()}
    torch.save(sd, os.path.join(directory, f"model_{step}.pth"))
    ci_config = {"mode": "global", "fn_type": "global_shared_transformer", "hidden_dims": None, "reader_hidden_dims": None,
                 "simple_transformer_ci_cfg": {"d_model": ci_d_model, "n_blocks": ci_blocks, "mlp_hidden_dim": [ci_mlp],
                                               "attn_config": {"n_heads": ci_heads, "max_len": 512, "rope_base": 10000.0}}}
    patterns = [{"module_pattern": f"h.*.{kind}", "C": C[name]} for name, kind in
                (("c_fc", "mlp.c_fc"), ("down_proj", "mlp.down_proj"), ("q", "attn.q_proj"), ("k", "attn.k_proj"),
                 ("v", "attn.v_proj"), ("o", "attn.o_proj"))]
    data = {"max_seq_len": 512, "dataset_name": "danbraunai/pile-uncopyrighted-tok-shuffled"}
    if legacy:
        meta = {"ci_config": ci_config, "sigmoid_type": "leaky_hard", "module_info": patterns, "identity_module_info": None,
                "use_delta_component": True, "steps": step, "batch_size": 64, "task_config": {"task_name": "lm", **data},
                "pretrained_model_class": "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
                "pretrained_model_name": "goodfire/spd/runs/t-9d2b8f02"}
    else:
        meta = {"pd": {"ci_config": ci_config, "sigmoid_type": "leaky_hard", "decomposition_targets": patterns,
                       "identity_decomposition_targets": None, "use_delta_component": True, "steps": step, "batch_size": 64},
                "target": {"spec": {"kind": "pretrained", "run_path": "goodfire/spd/runs/t-9d2b8f02",
                                    "model_class": "param_decomp_lab.experiments.lm.pretrain.models.llama_simple_mlp.LlamaSimpleMLP"}},
                "data": data}
    with open(os.path.join(directory, "final_config.yaml" if legacy else "run_meta.yaml"), "w") as f:
        yaml.safe_dump(meta, f)
    return sd


def goodfire_ci(ci: dict, inputs: dict, n_heads: int):
    """Pre-sigmoid CI of Goodfire's global shared transformer, written independently of vpd.CITransformer from their
    code: inputs RMS-normed per matrix without weight and concatenated in sorted path order, x @ W + b projections,
    pre-norm blocks with parameter-free RMSNorm, separate q/k/v/out projections, RoPE (half-split, whole head, from
    the saved inv_freq) on q and k, bidirectional attention, exact GELU MLP with biases, no final norm."""
    x = torch.cat([F.rms_norm(inputs[p], (inputs[p].shape[-1],)) for p in sorted(inputs)], -1)
    x = x @ ci["_input_projector.W"] + ci["_input_projector.b"]
    B, T, D = x.shape
    dh, i = D // n_heads, 0
    while f"_blocks.{i}.attn.q_proj.weight" in ci:
        b = f"_blocks.{i}."
        q, k, v = (F.linear(F.rms_norm(x, (D,)), ci[f"{b}attn.{n}_proj.weight"]).view(B, T, n_heads, dh).transpose(1, 2)
                   for n in "qkv")
        angle = torch.arange(T)[:, None] * ci[b + "attn.rope.inv_freq"]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        rotate = lambda t: t * cos + torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1) * sin
        mixed = torch.softmax(rotate(q) @ rotate(k).transpose(-1, -2) / dh ** 0.5, -1) @ v
        x = x + F.linear(mixed.transpose(1, 2).reshape(B, T, D), ci[b + "attn.out_proj.weight"])
        h = F.gelu(F.rms_norm(x, (D,)) @ ci[b + "mlp.0.W"] + ci[b + "mlp.0.b"])
        x, i = x + h @ ci[b + "mlp.2.W"] + ci[b + "mlp.2.b"], i + 1
    return x @ ci["_output_head.W"] + ci["_output_head.b"]


@pytest.mark.parametrize("legacy", [True, False])
def test_goodfire_decomposition_imports_and_gives_their_ci(tmp_path, legacy):
    """A Goodfire run (their keys and shapes, either yaml) becomes a checkpoint that load_decomposition reads: the
    same target, the same V and U, and the CI of their transformer to 1e-5, computed independently (goodfire_ci).
    Keeping our final norm or dropping their MLP biases changes the CI (what the two config options are for)."""
    import yaml
    theirs = write_goodfire_run(tmp_path / "run", **TINY_GOODFIRE, legacy=legacy)
    with pytest.raises(ValueError, match="pass --n_heads"):
        vpd.import_goodfire(str(tmp_path / "run"), str(tmp_path / "ours"))
    (tmp_path / "run" / "model_config.yaml").write_text(yaml.safe_dump({"n_head": 2, "n_layer": 2}))  # the target run's
    vpd.main(["import", str(tmp_path / "run"), str(tmp_path / "ours")])
    target, dec, comps, tcfg, cfg = vpd.load_decomposition(str(tmp_path / "ours" / "ckpt.pt"))
    assert (tcfg.n_layers, tcfg.d_model, tcfg.n_heads, tcfg.vocab_size, cfg.ci_d_mlp, cfg.steps) == (2, 16, 2, 32, 32, 400_000)
    assert cfg.modules["h.*.mlp.down_proj"] == 10 and not cfg.ci_final_norm and cfg.ci_mlp_bias
    assert torch.equal(comps["h.1.mlp.c_fc"]["V"], theirs["_components.h-1-mlp-c_fc.V"])
    assert all(torch.equal(v, theirs[f"target_model.{k}"]) for k, v in target.state_dict().items())
    x = torch.randint(32, (3, 8), generator=torch.Generator().manual_seed(0))
    ci_sd = {k.removeprefix("ci_fn._global_ci_fn."): v for k, v in theirs.items() if k.startswith("ci_fn.")}
    with torch.no_grad():
        dec(x)
        ours = dec.causal_importance()[0]
        pre = goodfire_ci(ci_sd, {n: c.input for n, c in dec.comps.items()}, 2)
    torch.testing.assert_close(ours, pre.clamp(0, 1), atol=1e-5, rtol=0)  # the lower-leaky sigmoid's forward
    assert 0.05 < (ours > 0).float().mean() < 0.95                        # a CI with both on and off entries
    ckpt = vpd.load_checkpoint(str(tmp_path / "ours" / "ckpt.pt"), ("config", "components", "target", "ci_fn"))
    for change in ({"ci_final_norm": True}, {"ci_mlp_bias": False}):
        other = vpd.Decomposition(models.build_model(tcfg), dataclasses.replace(cfg, **change))
        other.ci_fn.load_state_dict(ckpt["ci_fn"], strict=False)  # our norm's weight (ones), or no biases
        vpd.load_decomposition_state(other, {**ckpt, "ci_fn": other.ci_fn.state_dict()})
        with torch.no_grad():
            other(x)
            assert (other.causal_importance()[0] - ours).abs().max() > 1e-2


def test_goodfire_import_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    import yaml
    with pytest.raises(FileNotFoundError, match="should hold Goodfire's model_<step>.pth and final_config.yaml"):
        vpd.import_goodfire(str(tmp_path), str(tmp_path / "ours"), n_heads=2)
    write_goodfire_run(tmp_path / "run", **TINY_GOODFIRE)
    meta = yaml.safe_load(open(tmp_path / "run" / "final_config.yaml"))
    for key, value, named in (("sigmoid_type", "normal", "sigmoid_type normal"),
                              ("ci_config", {**meta["ci_config"], "mode": "layerwise", "fn_type": "mlp"}, "ci_config.fn_type mlp"),
                              ("pretrained_model_class", "transformers.GPT2LMHeadModel", "target class transformers.GPT2")):
        with open(tmp_path / "run" / "final_config.yaml", "w") as f:
            yaml.safe_dump({**meta, key: value}, f)
        with pytest.raises(ValueError, match=f"not supported here: {re.escape(named)}"):
            vpd.import_goodfire(str(tmp_path / "run"), str(tmp_path / "ours"), n_heads=2)
    with open(tmp_path / "run" / "final_config.yaml", "w") as f:  # a config whose C disagrees with the weights
        yaml.safe_dump({**meta, "module_info": [{**m, "C": m["C"] + 1} for m in meta["module_info"]]}, f)
    with pytest.raises(ValueError, match="its components do not fit the translated config"):
        vpd.import_goodfire(str(tmp_path / "run"), str(tmp_path / "ours"), n_heads=2)
    assert not os.path.exists(tmp_path / "ours" / "ckpt.pt")             # nothing written
    # a W&B path: the local copy of an earlier download, without asking W&B
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="pip install wandb"):
        vpd.import_goodfire("wandb:goodfire/spd/runs/s-55ea3f9b", "ours", n_heads=2)
    write_goodfire_run(tmp_path / "out" / "goodfire" / "spd-s-55ea3f9b", **TINY_GOODFIRE)
    assert vpd.import_goodfire("wandb:goodfire/spd/runs/s-55ea3f9b", "ours", n_heads=2) == os.path.join("ours", "ckpt.pt")
    with pytest.raises(SystemExit, match="usage: python vpd.py import"):
        vpd.main(["import", "run-only"])
    # what the importer checks rather than trusts: RoPE frequencies, the target run's own config; and their
    # default MLP width (mlp_hidden_dim null: 4 d_model) is read as such
    theirs = write_goodfire_run(tmp_path / "null", **{**TINY_GOODFIRE, "ci_mlp": 64})
    meta = yaml.safe_load(open(tmp_path / "null" / "final_config.yaml"))
    meta["ci_config"]["simple_transformer_ci_cfg"]["mlp_hidden_dim"] = None
    (tmp_path / "null" / "final_config.yaml").write_text(yaml.safe_dump(meta))
    ckpt = vpd.load_checkpoint(vpd.import_goodfire(str(tmp_path / "null"), "ours", n_heads=2), ("config",))
    assert ckpt["config"]["ci_d_mlp"] == 64
    (tmp_path / "null" / "model_config.yaml").write_text(yaml.safe_dump({"n_head": 4}))
    with pytest.raises(ValueError, match="--n_heads=2, but .* says n_head 4"):
        vpd.import_goodfire(str(tmp_path / "null"), "ours", n_heads=2)
    (tmp_path / "null" / "model_config.yaml").write_text(yaml.safe_dump({"n_head": 2, "rotary_adjacent_pairs": True}))
    with pytest.raises(ValueError, match="a target models.LlamaSimpleMLP is not: {'rotary_adjacent_pairs': True}"):
        vpd.import_goodfire(str(tmp_path / "null"), "ours")
    os.remove(tmp_path / "null" / "model_config.yaml")
    theirs["ci_fn._global_ci_fn._blocks.1.attn.rope.inv_freq"] *= 1.01
    torch.save(theirs, tmp_path / "null" / "model_400000.pth")
    with pytest.raises(ValueError, match="block 1's RoPE frequencies are not base 1e4's"):
        vpd.import_goodfire(str(tmp_path / "null"), "ours", n_heads=2)


# -- Appendix C: before training: fail fast, the memory plan, the FLOPs of a step ----------------------------

def test_configurations_that_would_fail_at_the_first_evaluation_fail_before_training(tmp_path):
    tcfg = models.TargetConfig(identity_layer=True)  # TMS 5-2-id: its hidden layer is a dense block of 2
    model = models.build_model(tcfg)
    cfg = vpd.Config(modules={"linear1": 6, "hidden": 1, "linear2": 6}, out_dir=str(tmp_path), device="cpu", steps=2)
    with pytest.raises(ValueError, match="hidden: a dense block of 2 subcomponents needs C >= 2, got C = 1"):
        vpd.train(cfg, model, models.sparse_features(tcfg, 16, 0), models.toy_truth(tcfg, model, "cpu"))
    with pytest.raises(ValueError, match="eval_batches must be at least 1"):
        vpd.Decomposition(tiny_mlp(), vpd.Config(modules={"0": 2}, eval_batches=0))
    # CE unrecovered where zero-ablating the matrices costs nothing (one key: attention weights are 1)
    lm, ltcfg = tiny_lm()
    lcfg = lm_config(modules={"h.*.attn.q_proj": 4}, eval_adv_steps=[])
    dec = vpd.Decomposition(lm, lcfg)
    metrics = vpd.evaluate(dec, models.token_batches(dataclasses.replace(ltcfg, seq_len=1), 4, seed=0), lcfg)
    assert metrics["ce/zero"] == metrics["ce/target"] and math.isnan(metrics["ce_unrecovered/ci"])


def test_measure_step_counts_a_whole_step_and_the_log_shows_mfu(tmp_path, monkeypatch):
    """The FLOPs of a step, counted on 1 and 2 sequences and extrapolated, are those counted on the whole batch
    (losses, the adversary's inner steps, the backward); every log line has TFLOP/s and, given a peak, MFU."""
    from torch.utils.flop_counter import FlopCounterMode
    model, tcfg = tiny_lm()
    cfg = lm_config()
    dec = vpd.Decomposition(model, cfg)
    x, _ = models.token_batches(tcfg, 4, seed=0)("train", 0)
    with FlopCounterMode(display=False) as counter:
        losses, _ = vpd.training_losses(dec, x, vpd.Adversary(), cfg, cfg.p_start, 0.0)
        sum(losses.values()).backward()
    dec.zero_grad(set_to_none=True)
    activations, flops = vpd.measure_step(dec, cfg, x)
    assert flops == counter.get_total_flops() > 0 and activations == 0  # a CPU keeps no allocator statistics
    without_adversary = vpd.measure_step(dec, dataclasses.replace(cfg, adv_steps=0), x)[1]
    assert without_adversary < counter.get_total_flops()
    # the peak: the config's, else the GPU's by name (bf16 or fp32), else none
    assert vpd.peak_tflops(vpd.Config(peak_tflops=500.0), torch.device("cpu")) == 500.0
    assert vpd.peak_tflops(vpd.Config(), torch.device("cpu")) == 0.0
    for name, dtype, peak in (("NVIDIA H100 80GB HBM3", "bfloat16", 989), ("NVIDIA H100 PCIe", "bfloat16", 756),
                              ("NVIDIA A100-SXM4-80GB", "float32", 19.5), ("NVIDIA L40S", "bfloat16", 362),
                              ("NVIDIA L4", "bfloat16", 121), ("Some Future GPU", "bfloat16", 0.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
        assert vpd.peak_tflops(vpd.Config(dtype=dtype), torch.device("cuda")) == peak, name
    model, tcfg = tiny_lm()
    cfg = lm_config(out_dir=str(tmp_path), steps=3, batch_size=4, log_interval=1, eval_interval=0, peak_tflops=0.5)
    vpd.train(cfg, model, models.token_batches(tcfg, 4, seed=0))
    records = train_losses(tmp_path / "metrics.jsonl")
    assert len(records) == 3 and all(r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in records)


def test_memory_plan_stops_a_run_that_cannot_fit():
    model, tcfg = tiny_lm()
    cfg = lm_config(batch_size=4)
    dec = vpd.Decomposition(model, cfg)
    x, _ = models.token_batches(tcfg, 4, seed=0)("train", 0)
    vpd.measure_step(dec, cfg, x)  # the plan reads the positions per sample off the forward it ran
    plan = vpd.memory_plan(dec, cfg, x, activations=12345)
    ssc = sum(LM_MODULES.values()) * 2  # 2 layers
    assert plan["adversary sources and moments"] == 12 * 4 * 8 * (ssc + 12)
    assert plan["activations"] == 12345
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    vpd.check_memory(plan, torch.device("cpu"), cfg)  # tiny: fits
    with pytest.raises(SystemExit, match="lower batch_size"):
        vpd.check_memory({**plan, "activations": 2**50, "total": 2**50}, torch.device("cpu"), cfg)


# -- Appendix E: the configurator ----------------------------------------------------------------------------

def test_configurator(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nlr = 3e-4\nsteps = 7\nmodules = {'h.*.mlp': 8}\n_private = 1\n")
    cfg, tcfg = vpd.configure([str(path), "--imp_coeff=1", "--eval_adv_steps=[20, 40]", "--out_dir=a=b/c",
                               "--n_features=40", "--compile=True"], vpd.Config(), models.TargetConfig())
    assert (cfg.lr, cfg.steps, cfg.modules, cfg.out_dir) == (3e-4, 7, {"h.*.mlp": 8}, "a=b/c")
    assert cfg.imp_coeff == 1.0 and isinstance(cfg.imp_coeff, float)  # an int is fine for a float key
    assert cfg.eval_adv_steps == [20, 40] and tcfg.n_features == 40 and cfg.compile is True
    (cfg,) = vpd.configure(["--steps=9", str(path)], vpd.Config())  # an override wins wherever it stands
    assert (cfg.steps, cfg.lr) == (9, 3e-4)
    path.write_text("from math import sqrt\nlr = sqrt(4e-6)\n")  # imported names are not keys
    (cfg,) = vpd.configure([str(path), "--out_dir=2024"], vpd.Config())  # a string key keeps its text
    assert cfg.lr == pytest.approx(2e-3) and cfg.out_dir == "2024"


def test_configurator_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'imp_coef'.*did you mean 'imp_coeff'"):
        vpd.configure(["--imp_coef=1"], vpd.Config())
    with pytest.raises(SystemExit, match="'steps' .* takes an int"):
        vpd.configure(["--steps=1.5"], vpd.Config())
    with pytest.raises(SystemExit, match="does not exist"):
        vpd.configure([str(tmp_path / "missing.py")], vpd.Config())
    bad = tmp_path / "bad.py"
    bad.write_text("ci_hiden = 3\n")
    with pytest.raises(SystemExit, match=f"unknown config key 'ci_hiden' in {bad}.*'ci_hidden'"):
        vpd.configure([str(bad)], vpd.Config())
    with pytest.raises(SystemExit, match="expected --key=value"):
        vpd.configure(["--steps"], vpd.Config())
    for wrong in ("--steps=None", "--compile=false", "--modules={[]: 1}"):  # None only where it is the default
        with pytest.raises(SystemExit, match="takes a"):
            vpd.configure([wrong], vpd.Config())
    assert vpd.configure(["--compile=None"], vpd.Config())[0].compile is None


# -- models.py: targets and their data -----------------------------------------------------------------------

def test_residual_mlp_configs_build_and_their_truth_names_decomposed_matrices(tmp_path):
    """configs/resid_mlp{1,2,3}.py: a fixed unit-norm embedding, residual ReLU MLPs without biases, label
    x + ReLU(x); the truth expects one subcomponent per feature in every mlp_in and a dense block of the
    layer's neurons in every mlp_out; a short target training lowers the loss."""
    for n_layers, config in ((1, "resid_mlp1.py"), (2, "resid_mlp2.py"), (3, "resid_mlp3.py")):
        cfg, tcfg = vpd.configure([os.path.join(os.path.dirname(__file__), "configs", config)],
                                  vpd.Config(), models.TargetConfig())
        model = models.build_model(tcfg)
        assert tcfg.n_layers == n_layers and not model.W_E.requires_grad
        torch.testing.assert_close(model.W_E.norm(dim=1), torch.ones(tcfg.n_features))
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
        truth = models.toy_truth(tcfg, model, "cpu")
        assert set(truth["patterns"]) == set(vpd.find_matrices(model, cfg.modules))
        assert truth["patterns"]["layers.0.mlp_in"] == ("identity", tcfg.n_features)
        assert truth["patterns"]["layers.0.mlp_out"] == ("dense", tcfg.d_mlp)
        x = models.sparse_features(tcfg, 64, 0)("train", 0)[0]
        assert x.min() < 0 and torch.equal(models.toy_label(tcfg, x), x + x.relu())
    with torch.no_grad():  # the forward written out: embed, residual MLPs, unembed
        resid = x @ model.W_E
        for layer in model.layers:
            resid = resid + layer["mlp_out"](layer["mlp_in"](resid).relu())
        torch.testing.assert_close(model(x), resid @ model.W_E.T)
    small = dataclasses.replace(tcfg, n_layers=1, target_steps=300, target_batch_size=256)
    before = toy_loss(models.build_model(small), small)
    trained = models.train_target(small, str(tmp_path / "resid.pt"))
    assert toy_loss(trained, small) < 0.8 * before


def toy_loss(model, tcfg):
    x = models.sparse_features(tcfg, 2048, 7)("val", 0)[0]
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), models.toy_label(tcfg, x)).item()


def test_language_model_target_trains_and_is_saved(tmp_path, capsys, monkeypatch):
    """The LM branch of models.train_target (what configs/fortunes.py runs first): next-token CE falls on
    a learnable stream, the state dict is written whole, and the printed CE says what it is measured on."""
    tokens = np.arange(4000, dtype=np.uint16) % 16  # 0, 1, ..., 15, 0, 1, ...
    for split in ("train", "val"):
        tokens.tofile(tmp_path / f"{split}.bin")
    _, tcfg = tiny_lm(dataset=str(tmp_path), target_steps=60, target_batch_size=8, target_lr=1e-2)
    model = models.train_target(tcfg, str(tmp_path / "lm.pt"))
    ce = float(re.search(r"cross-entropy ([0-9.]+) nats on 10 validation batches", capsys.readouterr().out)[1])
    assert ce < 0.5 * math.log(32)  # a counting sequence: far below a uniform guess
    sd = torch.load(tmp_path / "lm.pt", weights_only=True)
    assert not os.path.exists(tmp_path / "lm.pt.tmp") and sd.keys() == model.state_dict().keys()
    os.remove(tmp_path / "val.bin")  # its CE is printed after training: missing, it must fail before
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: pytest.fail("trained before checking val"))
    with pytest.raises(FileNotFoundError, match="val.bin is missing"):
        models.train_target(tcfg, str(tmp_path / "never.pt"))


def reference_llama_logits(sd, tokens, n_heads):
    """LlamaSimpleMLP written out independently from Goodfire's description: rotate-half RoPE with
    inverse frequencies base^(-i / (D/2)), causal softmax attention, tanh GELU, RMSNorm eps 1e-6."""
    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = sd["wte.weight"][tokens]
    B, T, d = x.shape
    D = d // n_heads
    inv = 10000.0 ** (-torch.arange(D // 2) / (D // 2))
    ang = torch.arange(T)[:, None] * inv.repeat(2)[None]            # [T, D], the frequencies repeated
    def rot(v):
        half = torch.cat([-v[..., D // 2:], v[..., :D // 2]], -1)
        return v * ang.cos() + half * ang.sin()
    i = 0
    while f"h.{i}.rms_1.weight" in sd:
        p = lambda name: sd[f"h.{i}.{name}.weight"]
        h = rms(x, p("rms_1"))
        q, k, v = (h @ p(f"attn.{n}_proj").T for n in "qkv")
        q, k, v = (t.view(B, T, n_heads, D).transpose(1, 2) for t in (q, k, v))
        att = (rot(q) @ rot(k).transpose(-1, -2)) / math.sqrt(D)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, d) @ p("attn.o_proj").T
        u = rms(x, p("rms_2")) @ p("mlp.c_fc").T
        gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + gelu @ p("mlp.down_proj").T
        i += 1
    return rms(x, sd["ln_f.weight"]) @ sd["lm_head.weight"].T


def test_llama_loads_goodfire_key_names_and_matches_reference():
    model, tcfg = tiny_lm()
    names = ["wte.weight", "ln_f.weight", "lm_head.weight"] + [
        f"h.{i}.{n}.weight" for i in range(2) for n in
        ("rms_1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "rms_2", "mlp.c_fc", "mlp.down_proj")]
    assert sorted(model.state_dict()) == sorted(names)
    g = torch.Generator().manual_seed(1)
    sd = {n: torch.randn(model.state_dict()[n].shape, generator=g) * 0.3 for n in names}
    sd["wte.weight"] = sd["lm_head.weight"]  # tied in Goodfire's checkpoints too
    model.load_state_dict(sd, strict=True)
    assert model.wte.weight is model.lm_head.weight
    tokens = torch.randint(32, (3, 8), generator=g)
    torch.testing.assert_close(model(tokens), reference_llama_logits(sd, tokens, n_heads=2), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**sd, "h.0.attn.c_attn.weight": torch.zeros(1)}, strict=True)


def test_padded_logits_equal_the_unpadded_ones():
    """The logits matmul runs on the vocabulary padded to a multiple of 64 with zero rows, and the logits
    are a view of its first `vocab` columns: the same as the plain matmul's, to fp32 rounding (bitwise on
    the CPUs tried, but a GEMM library may split another N differently). The state dict keeps its shapes,
    and the tied lm_head cannot be decomposed (its other use, the embedding, would stay whole)."""
    torch.manual_seed(0)
    model = models.LlamaSimpleMLP(50, 16, 2, 2, 32)
    tokens = torch.randint(50, (3, 8))
    padded = model(tokens)
    assert padded.shape == (3, 8, 50) and padded.stride(-2) == 64  # a view into the aligned buffer
    model.vocab_multiple = 1
    torch.testing.assert_close(padded, model(tokens), rtol=1e-6, atol=1e-6)
    model.vocab_multiple = 64
    assert model.state_dict()["lm_head.weight"].shape == model.state_dict()["wte.weight"].shape == (50, 16)
    with pytest.raises(ValueError, match="'lm_head' shares its weight with another module"):  # tied to wte
        vpd.Decomposition(model, lm_config(modules={"lm_head": 4}))


def test_batch_streams_differ_across_ranks_steps_and_splits():
    """Data parallelism must not replay one rank's batches on another (an odd rank stride once did:
    rank 2 at step 0 drew rank 0's batch of step 7919; a stride of 2^40 gave every rank the same batch),
    nor validation batches in training."""
    def stream(rank, split, step):  # the numbers drawn, not the seed: torch keeps only 32 bits of it
        return tuple(torch.randint(2**62, (2,), generator=models.batch_generator(0, rank, split, step)).tolist())
    draws = [stream(rank, split, step) for rank in range(8) for split in ("train", "val") for step in range(2000)]
    assert len(set(draws)) == len(draws)
    assert stream(2, "train", 0) != stream(0, "train", 7919) and stream(1, "val", 0) != stream(0, "train", 3960)
    x0, _ = models.sparse_features(models.TargetConfig(), 64, seed=0, rank=0)("train", 5)
    x1, _ = models.sparse_features(models.TargetConfig(), 64, seed=0, rank=1)("train", 5)
    assert not torch.equal(x0, x1)


def pile_fixture(tmp_path):
    """A local Hugging Face-style dataset with the Pile's schema: rows of 12 `input_ids`, row r of the
    training split holding 100 r, ..., 100 r + 11 (validation: offset by 10,000)."""
    ds = tmp_path / "pile"
    ds.mkdir()
    for split, offset in (("train", 0), ("validation", 10_000)):
        with open(ds / f"{split}.jsonl", "w") as f:
            for r in range(20):
                f.write(json.dumps({"input_ids": list(range(offset + 100 * r, offset + 100 * r + 12))}) + "\n")
    return str(ds)


def test_token_batches_random_memmap_and_datasets_fixture(tmp_path):
    _, tcfg = tiny_lm()
    x, y = models.token_batches(tcfg, 4, seed=0)("train", 3)
    assert x.shape == y.shape == (4, 8) and (y[:, :-1] == x[:, 1:]).all()
    # nanoGPT-style memmaps
    (tmp_path / "bin").mkdir()
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "bin" / "train.bin")
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "bin" / "val.bin")
    get = models.token_batches(dataclasses.replace(tcfg, dataset=str(tmp_path / "bin")), 4, seed=0)
    x, y = get("train", 5)
    assert (y == x + 1).all() and (x[:, 1:] == x[:, :-1] + 1).all()  # windows of consecutive tokens
    torch.testing.assert_close(get("train", 5)[0], x)                  # a function of the step
    (tmp_path / "unprepared").mkdir()
    (tmp_path / "unprepared" / "prepare.py").write_text("")
    with pytest.raises(FileNotFoundError, match="train.bin is missing: run python .*prepare.py"):
        models.token_batches(dataclasses.replace(tcfg, dataset=str(tmp_path / "unprepared")), 4, seed=0)("train", 0)
    (tmp_path / "bin" / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    with pytest.raises(ValueError, match="vocabulary of 64 tokens but vocab_size=32"):
        models.token_batches(dataclasses.replace(tcfg, dataset=str(tmp_path / "bin")), 4, seed=0)
    short = tmp_path / "short"
    short.mkdir()
    np.arange(9, dtype=np.uint16).tofile(short / "train.bin")
    with pytest.raises(ValueError, match="holds 9 tokens; windows of seq_len \\+ 1 = 9 need at least 10"):
        models.token_batches(dataclasses.replace(tcfg, dataset=str(short)), 2, seed=0)("train", 0)
    tcfg_ds = dataclasses.replace(tcfg, dataset=pile_fixture(tmp_path), val_split="validation")
    get = models.token_batches(tcfg_ds, 2, seed=0)
    x, y = get("train", 0)
    assert x.tolist() == [list(range(0, 8)), list(range(100, 108))] and y[0].tolist() == list(range(1, 9))
    x, y = models.token_batches(dataclasses.replace(tcfg_ds, seq_len=12), 2, seed=0)("train", 0)
    assert x[0].tolist() == list(range(12)) and y[0].tolist() == list(range(1, 12)) + [-1]  # rows of exactly T
    assert get("train", 1)[0][0, 0] == 200 and get("train", 3)[0][0, 0] == 600  # later steps skip ahead
    # two ranks on one file (rows dealt in turn): a reader started at step 2, as after a resume, gives the
    # rows a reader running from step 0 gives there, and the ranks never share a row
    ranks = [models.token_batches(tcfg_ds, 2, seed=0, rank=r, world=2) for r in (0, 1)]
    firsts = [[int(get("train", step)[0][b, 0]) for step in range(3) for b in (0, 1)] for get in ranks]
    assert firsts[0] == [0, 200, 400, 600, 800, 1000] and firsts[1] == [100, 300, 500, 700, 900, 1100]
    resumed = models.token_batches(tcfg_ds, 2, seed=0, rank=0, world=2)("train", 2)[0][:, 0].tolist()
    assert resumed == [800, 1000]
    assert get("val", 0)[0][0, 0] == 10_000
    ranks = [models.token_batches(tcfg_ds, 2, seed=0, rank=r, world=2)("train", 0)[0][:, 0].tolist() for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])  # each rank reads its own shard
    with pytest.raises(ValueError, match="ran out of rows"):
        get("train", 10)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        models.token_batches(dataclasses.replace(tcfg_ds, seq_len=64), 2, seed=0)("train", 0)


def test_a_missing_target_is_an_error_where_the_config_forbids_training_one(tmp_path):
    cfg, tcfg = vpd.configure([os.path.join(os.path.dirname(__file__), "configs", "pile4l.py"),
                               f"--target_path={tmp_path}/typo.pt", "--device='cpu'"], vpd.Config(), models.TargetConfig())
    with pytest.raises(SystemExit, match="typo.pt not found .train_target=False"):
        models.build(tcfg, cfg)
    assert not os.path.exists(tmp_path / "typo.pt")


def test_wandb_target_uses_the_local_copy_or_says_what_is_missing(tmp_path, monkeypatch):
    root = tmp_path / "spd-t-9d2b8f02"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SystemExit, match="pip install wandb"):  # no copy, no wandb here: how to get it
        models.download_wandb("wandb:goodfire/spd/runs/t-9d2b8f02", out_dir=str(tmp_path))
    root.mkdir()
    for step in (900, 10_000, "final"):  # a file that is no step's is not a candidate
        torch.save({}, root / f"model_step_{step}.pt")
    # downloaded before: the latest by step (not by name), without asking W&B (offline resume)
    assert models.download_wandb("wandb:goodfire/spd/runs/t-9d2b8f02", out_dir=str(tmp_path)) == \
        str(root / "model_step_10000.pt")


def test_pile_prepare_keeps_rows_whole(tmp_path):
    """data/pile/prepare.py's memmaps: every window is the start of one row, never two rows joined."""
    out = tmp_path / "bin"
    subprocess.run([sys.executable, "data/pile/prepare.py", "--dataset", pile_fixture(tmp_path), "--val_split",
                    "validation", "--train_rows", "20", "--val_rows", "5", "--out_dir", str(out)], check=True,
                   capture_output=True)
    assert json.load(open(out / "meta.json")) == {"row_len": 12}
    assert np.fromfile(out / "val.bin", dtype=np.uint16)[12] == 10_100
    _, tcfg = tiny_lm()
    for T in (8, 12):
        x, y = models.token_batches(dataclasses.replace(tcfg, dataset=str(out), seq_len=T), 16, seed=0)("train", 0)
        assert (x[:, 0] % 100 == 0).all() and (x == x[:, :1] + torch.arange(T)).all()  # whole rows from their start
        assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == (x[:, -1] + 1 if T < 12 else -1)).all()
    with pytest.raises(ValueError, match="rows of 12 tokens, fewer than seq_len=16"):
        models.token_batches(dataclasses.replace(tcfg, dataset=str(out), seq_len=16), 4, seed=0)


def test_fortunes_prepare_on_a_fixture(tmp_path):
    root = tmp_path / "fortunes"
    for sub, text in (("", "Hello world"), ("de", "Guten Tag"), ("es", "Hola mundo"), ("it", "Ciao mondo")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        cookies = [f"{text}, number {i}." for i in range(20)]
        (root / sub / "cookies").write_text("\n%\n".join(cookies + cookies[:2]) + "\n%\n")  # two repeats
        (root / sub / "cookies.dat").write_bytes(b"\x00binary index")
    out = tmp_path / "out"
    subprocess.run([sys.executable, "data/fortunes/prepare.py", "--root", str(root), "--out_dir", str(out),
                    "--vocab_size", "300", "--held_out", "0.1", "--mix", "en=1,de=0.5,es=0.25,it=0.25"],
                   check=True, capture_output=True)
    meta = json.load(open(out / "meta.json"))
    assert meta["vocab_size"] == 300 and meta["eot"] == 299
    sys.path.insert(0, "data/fortunes")
    import prepare
    assert prepare.gpt2_encoding().encode("Hello world") == [15496, 995]  # GPT-2's ids, from the hash-checked files
    enc = prepare.gpt2_encoding(300)
    docs = {}
    for path in out.glob("*.bin"):  # every split of every language: whole fortunes, none in two splits
        ids = np.fromfile(path, dtype=np.uint16).tolist()
        assert max(ids) < 300 and ids[-1] == 299
        text = enc.decode(ids)
        assert "\ufffd" not in text                                     # no <unk>: a truncated BPE encodes anything
        docs[path.stem] = text.split("<|endoftext|>")[:-1]
    for lang, word in (("en", "Hello"), ("de", "Guten"), ("es", "Hola"), ("it", "Ciao")):
        splits = [set(docs[f"{s}_{lang}"]) for s in ("train", "val", "dev", "test")]
        assert all(d.startswith(word) for s in splits for d in s)
        assert sum(map(len, splits)) == len(set.union(*splits)) == len(splits[0]) + 6  # disjoint; 2 held out each
    assert sorted(docs["train"]) == sorted(d for lang in ("en", "de", "es", "it") for d in docs[f"train_{lang}"])
    assert len(docs["train_en"]) == 14 and len(docs["train_de"]) == 7   # the mix: German half of English's tokens


# -- Hugging Face models (transformers is optional for users; .ci/run installs it) ---------------------------

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (optional; .ci/run installs it)")


HF_VOCAB = 32


def tiny_hf(kind):
    """A tiny random Hugging Face causal LM built from its config (no download), in train mode as built
    (GPT-2's dropout on), and module patterns covering its block matrices. Weights of std 0.2, not 0.02:
    logits far from uniform, so that reconstruction is checked on a model that says something."""
    import transformers as tf
    torch.manual_seed(0)
    common = dict(vocab_size=HF_VOCAB, initializer_range=0.2, use_cache=False, bos_token_id=0, eos_token_id=0)
    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    if kind == "gpt2":  # Conv1D projections; c_attn is q, k, v fused
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, **common)), \
            {"transformer.h.*.attn.c_attn": 8, "transformer.h.*.attn.c_proj": 4, "transformer.h.*.mlp.c_*": 6}
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **sizes, **common)), \
            {"model.layers.*.self_attn.*_proj": 4, "model.layers.*.mlp.*_proj": 6}
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**sizes, **common)), \
        {"gpt_neox.layers.*.attention.query_key_value": 8, "gpt_neox.layers.*.attention.dense": 4,
         "gpt_neox.layers.*.mlp.dense_*": 6}


def hf_batches(split, step, pad=0):
    """Keyword inputs as a tokenizer gives them; with pad > 0 the first sequence is right-padded (mask 0,
    label -1), which vpd.train refuses."""
    g = torch.Generator().manual_seed(2 * step + (split == "val"))
    tokens = torch.randint(HF_VOCAB, (4, 9), generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, 8 - pad:] = 0
    return {"input_ids": tokens[:, :-1], "attention_mask": mask}, tokens[:, 1:].masked_fill(mask == 0, -1)


@needs_transformers
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
def test_hf_models_decompose_and_all_ones_masks_reproduce_their_logits(kind, tmp_path):
    model, modules = tiny_hf(kind)
    cfg = lm_config(modules=modules, out_dir=str(tmp_path), steps=3, batch_size=4, eval_interval=3, log_interval=3,
                    ckpt_interval=3, faith_warmup_steps=5, eval_adv_steps=[0, 2])
    x, y = hf_batches("val", 0)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(**x).logits                  # [B, T, vocab]
        dec = vpd.Decomposition(copy.deepcopy(model), cfg)              # random V, U: Δ carries all of W
        assert len(dec.comps) == (14 if kind == "llama" else 8)
        torch.testing.assert_close(dec.masked(x, ones_masks(dec, x)), expected, atol=1e-6, rtol=1e-6)
    metrics = vpd.train(cfg, model, hf_batches)  # keyword inputs through the memory plan, training and evaluation
    assert metrics["step"] == 3 and all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="the train batch of step 0 is padded"):  # pads would count in the losses
        vpd.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "padded")), tiny_hf(kind)[0],
                  lambda split, step: hf_batches(split, step, pad=2))
    assert metrics["ce/target"] == pytest.approx(vpd.lm_ce(expected, y), rel=1e-6)  # the logits, dropout off


@needs_transformers
def test_conv1d_is_decomposed_as_the_linear_holding_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(nf=5, nx=4)  # weight [d_in, d_out]
    nn.init.normal_(conv.bias)
    linear = nn.Linear(4, 5)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = vpd.Components(conv, 3), vpd.Components(linear, 3)
    assert a.weight is conv.weight and a.V.shape == (4, 3) and a.U.shape == (3, 5)  # V [d_in, C], U [C, d_out]
    with torch.no_grad():
        b.V.copy_(a.V)
        b.U.copy_(a.U)
    torch.testing.assert_close(a.delta(), b.delta())
    x = torch.randn(2, 6, 4)
    torch.testing.assert_close(a(x), conv(x))  # no masks: the Conv1D itself
    for _ in range(3):  # any masks and δ: the same outputs and the same gradients of V and U
        a.mask = b.mask = (torch.rand(2, 6, 3), torch.rand(2, 6))
        out_a, out_b = a(x), b(x)
        torch.testing.assert_close(out_a, out_b)
        for ga, gb in zip(torch.autograd.grad(out_a.sum(), [a.V, a.U]), torch.autograd.grad(out_b.sum(), [b.V, b.U])):
            torch.testing.assert_close(ga, gb)


@needs_transformers
def test_a_conv1d_run_resumes_from_its_checkpoint(tmp_path):
    """GPT-2: the checkpoint keeps the Conv1D weights as stored ([d_in, d_out], same keys) and resumes to
    the uninterrupted run's losses."""
    def run(name, get_batch, **overrides):
        model, modules = tiny_hf("gpt2")
        cfg = lm_config(modules=modules, out_dir=str(tmp_path / name), steps=4, batch_size=4, eval_interval=0,
                        log_interval=1, ckpt_interval=2, faith_warmup_steps=5, **overrides)
        return vpd.train(cfg, model, get_batch), cfg
    _, cfg = run("whole", hf_batches)
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert set(ckpt["target"]) == set(tiny_hf("gpt2")[0].state_dict())
    assert ckpt["target"]["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)
    assert ckpt["components"]["transformer.h.0.attn.c_attn"]["V"].shape == (16, 8)
    assert ckpt["components"]["transformer.h.0.attn.c_attn"]["U"].shape == (8, 48)

    def crashing(split, step):
        if split == "train" and step == 3:
            raise KeyboardInterrupt
        return hf_batches(split, step)
    with pytest.raises(KeyboardInterrupt):
        run("crash", crashing)
    run("crash", hf_batches, init_from="resume")
    whole, resumed = (train_losses(tmp_path / d / "metrics.jsonl") for d in ("whole", "crash"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert {k: a[k] for k in ("faith", "imp", "stoch", "adv")} == {k: b[k] for k in ("faith", "imp", "stoch", "adv")}


@needs_transformers
def test_hf_config_path_loads_a_local_model_offline(tmp_path, monkeypatch, capsys):
    """model = "hf:<dir>" loads a save_pretrained directory through AutoModelForCausalLM, its vocabulary
    rules the data, and configs/pythia14m.py runs end to end on it (a tiny GPT-NeoX in Pythia's layout)."""
    saved, _ = tiny_hf("gpt_neox")
    saved.save_pretrained(tmp_path / "tiny")
    config = os.path.join(os.path.dirname(__file__), "configs", "pythia14m.py")
    small = [f"--model=hf:{tmp_path / 'tiny'}", "--dataset=random", "--seq_len=8", "--batch_size=2", "--device=cpu",
             "--ci_d_model=16", "--ci_n_blocks=1", "--ci_n_heads=2", "--ci_d_mlp=32"]
    cfg, tcfg = vpd.configure([config, *small], vpd.Config(), models.TargetConfig())
    model, get_batch, truth = models.build(tcfg, cfg)
    x, _ = get_batch("train", 0)
    assert tcfg.vocab_size == HF_VOCAB and x.max() < HF_VOCAB and truth is None
    torch.testing.assert_close(model(x).logits, saved.eval()(x).logits)
    vpd.main([config, *small, f"--out_dir={tmp_path / 'run'}", "--steps=2", "--faith_warmup_steps=2",
              "--eval_adv_steps=[0]"])
    assert "final: " in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "recon/ci" in r] == [2]
    for recorded in (json.load(open(tmp_path / "run" / "config.json")),
                     torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["config"]):
        assert recorded["vocab_size"] == HF_VOCAB  # the model's own (edit.py reads it), not the default 50277
    with pytest.raises(SystemExit, match="(?s)'vpd-tests/missing'.*hf download vpd-tests/missing"):
        models.hf_causal_lm("vpd-tests/missing")  # not in the cache, and the tests run offline
    (tmp_path / "empty").mkdir()  # a directory, but no model in it
    with pytest.raises(SystemExit, match="cannot load the Hugging Face model"):
        models.hf_causal_lm(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SystemExit, match="needs transformers: pip install transformers"):
        models.hf_causal_lm("vpd-tests/missing")


# -- edit.py: edits, gates, the frontier and the sweep -------------------------------------------------------

def edit_config(root, data, ckpt, **overrides):
    base = dict(ckpt=ckpt, out_dir=str(root / "edit"), data=str(data), tokenizer="ids", seq_len=8,
                analysis_windows=16, eval_windows=16, top_k=3, n_contexts=1, frontier_windows=4,
                frontier_grid=[-10.0, 0.0, 3.0], budgets=[1, 12], seeds=[0], steps=3, keep_batch=2, scalar_lrs=[0.1],
                log_lrs=[0.1], lora_lrs=[1e-2], lambdas=[0.5, 2.0], save_budget=12,
                methods=["one", "top", "best", "best_act", "best_ci", "random_act", "lora1_all", "lora4_all",
                         "lora1_matrix", "lora1_matrix_act"])
    return edit.EditConfig(**{**base, **overrides})


def test_edits_at_identity_change_nothing_and_bake_into_plain_weights(lm_decomposition, tmp_path):
    _, _, ckpt = lm_decomposition
    target, dec, comps, tcfg, _ = vpd.load_decomposition(ckpt)
    x = torch.randint(32, (3, 8), generator=torch.Generator().manual_seed(1))
    before = target(x)
    keys = ["h.0.attn.v_proj:1", "h.1.mlp.c_fc:5"]
    thresholds = {k: 0.1 for k in keys}
    gates = [None, edit.Gate("act", keys, comps, thresholds), edit.Gate("ci", keys, comps, thresholds, dec, tau=0.0)]
    identities = [edit.ScalarEdit(comps, keys, gate=g) for g in gates] + [edit.LoRA(target, list(comps), 4, seed=0)]
    for identity in identities + [edit.ScalarEdit(comps, keys, gate=gates[1], log_scale=True)]:  # m = 1; B = 0
        with edit.applied(identity, target):
            assert torch.equal(target(x), before)                      # bit for bit
        if identity.gate is None or identity.gate.kind == "act":
            assert torch.equal(edit.bake(identity, target)(x), before)
    assert all(torch.equal(a, b) for a, b in zip(edit.bake(identities[0], target).state_dict().values(),
                                                 target.state_dict().values()))
    with pytest.raises(ValueError, match="CI-gated edit runs the decomposition's CI function at inference"):
        edit.bake(identities[2], target)
    # m = 0 removes exactly one rank-1 term, W' = W - (V[:, c] ⊗ U[c, :])^T, and nothing else
    baked = edit.bake(edit.ScalarEdit(comps, ["h.0.attn.v_proj:1"], init=0.0), target)
    V, U = comps["h.0.attn.v_proj"]["V"], comps["h.0.attn.v_proj"]["U"]
    for name, w in baked.state_dict().items():
        expected = target.state_dict()[name] - (torch.outer(V[:, 1], U[1]).T if name == "h.0.attn.v_proj.weight" else 0)
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)
    # a log-scale scalar is sign(init) exp(u), starting at init
    assert edit.ScalarEdit(comps, keys, init=-30.0, log_scale=True).m().tolist() == pytest.approx([-30.0, -30.0])
    # a trained edit: the hooks while training and the baked model give the same logits; saved, it reloads into
    # the plain model class with weights_only=True (an activation gate as a small module, without the decomposition)
    trained = [edit.ScalarEdit(comps, keys), edit.LoRA(target, ["h.1.mlp.down_proj"], 1, seed=0),
               edit.ScalarEdit(comps, keys, init=-5.0, gate=gates[1]),
               edit.LoRA(target, ["h.1.mlp.c_fc"], 2, seed=0, gate=edit.Gate("act", ["h.1.mlp.c_fc:5"], comps, thresholds))]
    for ed in trained:
        with torch.no_grad():
            for p in ed.parameters():
                p.add_(torch.randn(p.shape) * 0.3)
        with edit.applied(ed, target):
            hooked = target(x)
        baked = edit.bake(ed, target)
        torch.testing.assert_close(baked(x), hooked, rtol=1e-5, atol=1e-5)
        assert not torch.equal(hooked, before)
        edit.save_edited(str(tmp_path / "edited.pt"), baked)
        reloaded = edit.load_edited(str(tmp_path / "edited.pt"), tcfg)
        assert type(reloaded) is models.LlamaSimpleMLP and torch.equal(reloaded(x), baked(x))
        if ed.gate is None:  # a weight edit is a plain state dict
            plain = models.build_model(tcfg)
            plain.load_state_dict(torch.load(tmp_path / "edited.pt", weights_only=True))
            assert torch.equal(plain(x), baked(x))


def test_gates_act_exactly_where_they_are_on(lm_decomposition):
    """The CI gate is exactly 0 where the subcomponent's CI (of the unedited input) is at most tau, the activation
    gate where |x·V_c| is at most its threshold: there the edited matrix's output is the target's, bit for bit."""
    _, _, ckpt = lm_decomposition
    target, dec, comps, _, _ = vpd.load_decomposition(ckpt)
    x = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(2))
    key, path, col = "h.0.mlp.c_fc:2", "h.0.mlp.c_fc", sum(c["V"].shape[1] for n, c in comps.items() if n < "h.0.mlp.c_fc") + 2
    with torch.no_grad():
        dec(x)
        ci = dec.causal_importance()[0][..., col]                      # [4, 8]
        h = dec.comps[path].input @ comps[path]["V"][:, 2]             # [4, 8]
    tau, theta = ci.median().item(), h.abs().median().item()
    assert 0 < (ci > tau).sum() < ci.numel() and 0 < (h.abs() > theta).sum() < h.numel()
    for gate, on in ((edit.Gate("ci", [key], comps, {}, dec, tau), ci > tau),
                     (edit.Gate("act", [key], comps, {key: theta}), h.abs() > theta)):
        outs = []
        for ed in (nullcontext(), edit.applied(edit.ScalarEdit(comps, [key], init=-20.0, gate=gate), target)):
            with torch.no_grad(), ed:  # the matrix's output, after the edit's hook
                hook = target.get_submodule(path).register_forward_hook(lambda m, i, o: outs.append(o))
                target(x)
                hook.remove()
        moved = (outs[1] - outs[0]).abs().amax(-1)                      # [4, 8]
        assert (moved[~on] == 0).all() and (moved[on] > 0).all()
        if gate.kind == "ci":
            assert torch.equal(gate(path, dec.comps[path].input), on.float()[..., None])


class PlantedSwitch(nn.Module):
    """logits = head(e + proj(e)), e = wte(token); German tokens (8-15) carry a unit feature e[0] that no other
    token has. proj holds two planted subcomponents that read e[0]: 0 writes +b (head turns b into +1 on every German
    token's logit: the model's German confidence), 1 writes -0.2 b (a small brake). Inverting 0 (m < 0) or
    amplifying 1 (m > 1) raises German CE; nothing reads e[0] on English."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wte, self.proj, self.head = nn.Embedding(32, 6), nn.Linear(6, 6, bias=False), nn.Linear(6, 32, bias=False)
        with torch.no_grad():
            self.wte.weight.copy_(torch.randn(32, 6, generator=g) * 0.3)
            self.wte.weight[:, 0] = (torch.arange(32) // 8 == 1).float()
            b = torch.zeros(6)
            b[1] = 2.0
            self.head.weight.copy_(torch.randn(32, 6, generator=g) * 0.1)
            self.head.weight[:, 1] = 0.0
            self.head.weight[8:16, 1] = 0.5                            # b -> +1 on German tokens
            self.V = torch.zeros(6, 3)
            self.V[0, 0] = self.V[0, 1] = 1.0
            self.V[2, 2] = 1.0                                          # 2 reads a feature every token has
            self.U = torch.stack([b, -0.2 * b, torch.randn(6, generator=g) * 0.1])
            self.proj.weight.copy_((self.V @ self.U).T)

    def forward(self, x):
        e = self.wte(x)
        return self.head(e + self.proj(e))


def test_frontier_finds_a_planted_switch_on_both_sides_of_one_and_matches_the_edits():
    model = PlantedSwitch()
    dec = vpd.Decomposition(copy.deepcopy(model), vpd.Config(modules={"proj": 3}, ci_hidden=4))
    dec.comps["proj"].V.data.copy_(model.V)
    dec.comps["proj"].U.data.copy_(model.U)
    comps = {"proj": {"V": model.V, "U": model.U}}
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(16, 32, (600,), generator=g)              # tokens of neither language
    own = {"de": torch.randint(8, 16, (600,), generator=g), "en": torch.randint(0, 8, (600,), generator=g)}
    texts = {lang: models.windows(torch.where(torch.rand(600, generator=g) < 0.8, own[lang], shared), 6, 8) for lang in own}
    keys, grid = ["proj:0", "proj:1", "proj:2"], [-5.0, -1.0, 0.0, 3.0, 10.0]
    thresholds = dict(zip(keys, edit.activation_thresholds(dec, texts["en"], 0.99).tolist()))
    raw = edit.frontier(model, dec, comps, keys, texts, grid, thresholds, tau=0.5, batch=7)
    best = {k: grid[edit.best_point(raw["plain"][k]["de"], raw["plain"][k]["en"], 10.0, 0.1)] for k in keys}
    assert best["proj:0"] == -5.0 and best["proj:1"] == 10.0          # the right sign, found on both sides of 1
    de0, de1 = raw["plain"]["proj:0"]["de"], raw["plain"]["proj:1"]["de"]
    assert de0[0] > de0[1] > de0[2] > 0 > de0[3] and de1[-1] > 0 > de1[0]
    assert raw["plain"]["proj:0"]["en"] == [0.0] * 5 and raw["act"]["proj:0"] == raw["plain"]["proj:0"]
    assert max(raw["plain"]["proj:0"]["de"]) > max(raw["plain"]["proj:2"]["de"])
    # every batched frontier row equals the edit itself, applied by the hooks that training and evaluation use
    base = edit.ce_by_language(model, texts)
    for form in edit.FORMS:
        for key in keys:
            for i in (0, 3):
                gate = None if form == "plain" else edit.Gate(form, [key], comps, thresholds, dec, 0.5)
                ce = edit.ce_by_language(model, texts, edit.ScalarEdit(comps, [key], init=grid[i], gate=gate))
                for lang in texts:
                    assert raw[form][key][lang][i] == pytest.approx(ce[lang] - base[lang], abs=1e-5)


def test_language_labels_by_hand():
    cfg = edit.EditConfig()  # only 0.8, pair 0.8, foreign at most 0.1 of the mean CI on English, dead 1e-3
    mean = torch.tensor([[0.2, 0.033, 0.05, 0.05, 0.25],     # en
                         [0.2, 0.900, 0.50, 0.35, 0.25],     # de
                         [0.2, 0.033, 0.40, 0.30, 0.25],     # es
                         [0.2, 0.034, 0.05, 0.30, 0.25]])    # it
    freq = torch.full_like(mean, 0.5)
    freq[:, 0] = 1e-4
    assert edit.labels_of(mean, freq, cfg.languages, cfg) == ["dead", "de-only", "de+es", "foreign", "general"]


def test_edit_objective_hand_values_and_token_budget():
    V, T = 50, 8
    uniform = torch.zeros(2, T, V)
    y = torch.randint(V, (2, T))
    keep = torch.randn(3, T, V)
    loss, ce, kl = edit.edit_objective(uniform, y, keep, keep, lam=2.0, chance=math.log(V))
    assert ce.item() == pytest.approx(math.log(V)) and kl.item() == pytest.approx(0, abs=1e-6)
    assert loss.item() == pytest.approx(0, abs=1e-6)                     # at chance: nothing left to gain
    peaked = torch.full((2, T, V), -10.0).scatter(-1, y[..., None], 10.0)
    loss, ce, _ = edit.edit_objective(peaked, y, keep, keep + 1.0, lam=2.0, chance=math.log(V))  # a shift: KL 0
    assert loss.item() == pytest.approx(math.log(V) - ce.item(), abs=1e-5)
    tokens = torch.arange(1000)
    for n in (1, 5, 8, 13, 64):
        x, y = edit.budget_batch(tokens, n, T, seed=n)
        assert (y != -1).sum() == n and x.shape == (-(-n // T), T)       # exactly n supervised tokens
        assert (y[y != -1] == (x + 1)[y != -1]).all()                    # the next token is the label


def test_edit_pipeline_end_to_end_resumable_with_choices_on_dev(lm_decomposition, monkeypatch):
    root, data, ckpt = lm_decomposition
    cfg = edit_config(root, data, ckpt)
    edit.sweep(cfg)
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "results.jsonl"))]
    assert {(r["method"], r["n"]) for r in rows} == {(m, n) for m in cfg.methods for n in cfg.budgets}
    assert all(set(r["test"]) == set(LANGS) and len(r["dev_grid"]) == 2 for r in rows)
    analysis = json.load(open(os.path.join(cfg.out_dir, "components.json")))
    assert len(analysis["ranked"]) == 3
    scores = [r["score"] for r in analysis["ranked"]]  # mean CI on German minus on English, best first
    assert scores == sorted(scores, reverse=True) and all(
        r["score"] == pytest.approx(r["mean_ci"]["de"] - r["mean_ci"]["en"], abs=1e-6) for r in analysis["ranked"])
    assert len(analysis["labels"]) == len(analysis["thresholds"]) == sum(LM_MODULES.values()) * 2
    # the frontier: every alive subcomponent x gate, its best m on the grid; the best per gate starts `best`
    front = json.load(open(os.path.join(cfg.out_dir, "frontier.json")))
    assert len(front["entries"]) == 3 * len(analysis["alive"]) and front["candidates"] == len(analysis["alive"])
    for form, b in front["best"].items():
        entries = [e for e in front["entries"] if e["form"] == form]
        assert b == max(entries, key=lambda e: (min(e["remove"], front["gap"]) if e["keep"] <= 0.1 else -1e9, -e["keep"]))
        assert all(e["m"] == cfg.frontier_grid[edit.best_point(e["grid"]["remove"], e["grid"]["keep"], front["gap"], 0.1)]
                   for e in entries)
    best = [r for r in rows if r["method"] == "best_act" and r["n"] == 12][0]
    assert list(best["prefactors"]) == [front["best"]["act"]["key"]]
    for name in ("summary.json", "frontier.png", "edited_one.pt", "edited_lora4_all.pt", "edited_best_act.pt"):
        assert os.path.exists(os.path.join(cfg.out_dir, name))
    assert not os.path.exists(os.path.join(cfg.out_dir, "edited_best_ci.pt"))   # runs only beside the decomposition
    summary = json.load(open(os.path.join(cfg.out_dir, "summary.json")))
    assert summary["cost"]["methods"]["best_ci"]["inference"] > 1.5 > summary["cost"]["methods"]["best_act"]["inference"]
    assert summary["cost"]["methods"]["lora1_all"]["parameters"] == 2 * (4 * (16 + 16) + 2 * (16 + 32))
    assert set(summary["methods"]) == set(cfg.methods) and all(
        set(m["by_n"]) == {"1", "12"} and "tokens_to_chance" in m for m in summary["methods"].values())
    # resumable: a rerun with one more budget trains only the new rows
    calls = []
    real_cell = edit.Editing.cell
    monkeypatch.setattr(edit.Editing, "cell", lambda self, *a: calls.append(a[:3]) or real_cell(self, *a))
    edit.sweep(dataclasses.replace(cfg, budgets=[1, 12, 2], methods=["one"]))
    assert [c[:2] for c in calls] == [("one", 2)]
    # the screen alone (no methods): its analysis and frontier reused, a summary without edits
    screen = cfg.out_dir + "_screen"
    os.makedirs(screen)
    for name in ("components.json", "frontier.json"):
        shutil.copy(os.path.join(cfg.out_dir, name), screen)
    edit.sweep(dataclasses.replace(cfg, out_dir=screen, methods=[]))
    assert json.load(open(os.path.join(screen, "summary.json")))["methods"] == {}
    assert os.path.exists(os.path.join(screen, "frontier.png"))
    # but never on other inputs: the finished cells of German removal are not Spanish removal's
    with pytest.raises(ValueError, match=r"holds a sweep of other inputs \(differing: \['remove'\]\)"):
        edit.sweep(dataclasses.replace(cfg, remove="es"))
    # hyper-parameters are chosen on dev: make dev prefer λ = 2 and test prefer λ = 0.5
    ed = edit.Editing(cfg)
    # "only": one scalar for every subcomponent labelled de-only (this tiny model has none: a clear error)
    labels = {"h.0.attn.q_proj:1": "de-only", "h.0.attn.q_proj:2": "general", "h.1.mlp.c_fc:5": "de-only"}
    assert ed.edit_for("only", {"labels": labels}, front, 0).keys == ["h.0.attn.q_proj:1", "h.1.mlp.c_fc:5"]
    with pytest.raises(ValueError, match="no subcomponent is labelled de-only"):
        edit.sweep(dataclasses.replace(cfg, methods=["only"]))
    with pytest.raises(ValueError, match="a gate belongs to one subcomponent, so to lora<r>_matrix only"):
        edit.sweep(dataclasses.replace(cfg, methods=["lora1_all_act"]))
    # gated LoRA: on the frontier's best matrix, under its gate; the random control: the best's start and gate
    lora = ed.edit_for("lora1_matrix_ci", analysis, front, 0)
    assert lora.paths == [front["best"]["ci"]["key"].rpartition(":")[0]] and lora.gate.kind == "ci"
    control = ed.edit_for("random_act", analysis, front, 0)
    assert control.keys[0] in analysis["alive_others"] and control.m().item() == pytest.approx(front["best"]["act"]["m"])

    def fake_ce(model, texts, edit_=None, batch=32):
        lam = fake_ce.lam
        prefer = 2.0 if texts is ed.dev else 0.5
        return {lang: (3.0 if lam == prefer else 1.0) if lang == cfg.remove else 0.0 for lang in texts}
    real_train = edit.train_edit
    monkeypatch.setattr(edit, "train_edit", lambda *a, **k: setattr(fake_ce, "lam", a[6]) or real_train(*a, **k))
    monkeypatch.setattr(edit, "ce_by_language", fake_ce)
    ed.base_dev, ed.base_test = {l: 0.0 for l in ed.dev}, {l: 0.0 for l in ed.test}
    row = ed.cell("one", 1, 0, analysis, front)
    assert row["lam"] == 2.0

    def damaging_ce(model, texts, edit_=None, batch=32):  # the dev-preferred λ now costs English 0.5 nats
        return {**fake_ce(model, texts), cfg.keep: 0.5 if fake_ce.lam == 2.0 and texts is ed.dev else 0.0}
    monkeypatch.setattr(edit, "ce_by_language", damaging_ce)
    assert ed.cell("one", 1, 0, analysis, front)["lam"] == 0.5  # more than max_damage = 0.1: not chosen


def test_edit_cost_counts_the_decomposition_s_own_data(lm_decomposition, tmp_path):
    """The German tokens a decomposition saw come from its own data's meta.json (fortunes: the corpus it
    was trained on), not from the edit's texts (pile4l edits Wikipedia but decomposes on the Pile)."""
    root, data, ckpt = lm_decomposition
    texts = tmp_path / "texts"
    shutil.copytree(data, texts)
    (texts / "meta.json").write_text(json.dumps({"train_share": {"de": 0.5}}))
    (data / "meta.json").write_text(json.dumps({"train_share": {"de": 0.25}}))
    try:
        ed = edit.Editing(edit_config(root, texts, ckpt, methods=["one"], frontier_top=2))
        analysis = ed.analyse(str)
        cost = ed.costs(analysis, ed.frontier(analysis))
    finally:
        os.remove(data / "meta.json")
    assert cost["decomposition_tokens"] == 10 * 8 * 8 and cost["decomposition_remove_tokens"] == 0.25 * 640


def test_edit_bad_input_is_a_clear_error(lm_decomposition, tmp_path):
    root, data, ckpt = lm_decomposition
    _, _, comps, _, _ = vpd.load_decomposition(ckpt)
    with pytest.raises(KeyError, match=r"not a decomposed matrix; decomposed: \[.*h.0.attn.q_proj"):
        edit.ScalarEdit(comps, ["h.9.attn.q_proj:0"])
    with pytest.raises(KeyError, match=r"integer in \[0, 6\) for h.0.mlp.c_fc"):
        edit.ScalarEdit(comps, ["h.0.mlp.c_fc:6"])
    with pytest.raises(FileNotFoundError, match="val_en.bin is missing"):
        edit.Editing(edit_config(root, tmp_path, ckpt))
    for typo in ("lora4", "lora_all", "lora4_foo", "ones", "best_gate"):  # named before any text is read (no ckpt needed)
        with pytest.raises(ValueError, match=rf"unknown methods \['{typo}'\]: see METHOD in edit.py"):
            edit.sweep(edit_config(root, tmp_path, "missing.pt", methods=["one", typo]))
    cfg, tcfg, model = toy_run(tmp_path, steps=2, eval_interval=0)
    vpd.train(cfg, model, models.sparse_features(tcfg, cfg.batch_size, cfg.seed),
              run_config={**dataclasses.asdict(cfg), **dataclasses.asdict(tcfg)})
    with pytest.raises(ValueError, match="decomposes a 'tms' model"):
        edit.Editing(edit_config(root, data, os.path.join(cfg.out_dir, "ckpt.pt")))
    with pytest.raises(ValueError, match=r"'fr' must be one of languages=\['en', 'de', 'es', 'it'\]"):
        edit.Editing(edit_config(root, data, ckpt, remove="fr"))
    foreign = tmp_path / "foreign"  # text tokenized for a larger vocabulary, then one file too short
    foreign.mkdir()
    for split in models.SPLITS:
        for lang in LANGS:
            np.full(100, 40 if lang == "de" else 3, dtype=np.uint16).tofile(foreign / f"{split}_{lang}.bin")
    with pytest.raises(ValueError, match="de text holds token ids beyond the model's vocabulary of 32"):
        edit.Editing(edit_config(root, foreign, ckpt))
    for split in models.SPLITS:  # German in the vocabulary now, but its dev split only 5 tokens long
        np.full(5 if split == "dev" else 100, 3, dtype=np.uint16).tofile(foreign / f"{split}_de.bin")
    with pytest.raises(ValueError, match="a token file of 5 tokens holds no window of 9"):
        edit.Editing(edit_config(root, foreign, ckpt))


def test_pile4l_edit_config_on_a_tiny_stand_in(tmp_path):
    """configs/edit_pile4l.py as written, on a tiny Goodfire-format decomposition imported as the README says, with
    its Wikipedia streams and tokenizer replaced by local stand-ins: per-language `text` datasets and a
    character-level tokenizer saved in a temp dir."""
    pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    write_goodfire_run(tmp_path / "run", **TINY_GOODFIRE)
    ckpt = vpd.import_goodfire(str(tmp_path / "run"), str(tmp_path / "ours"), n_heads=2)
    chars = "abcdefghijklmnopqrstuvwxyz .,!?"
    tok = Tokenizer(tok_models.WordLevel({c: i for i, c in enumerate(chars)} | {"<eos>": 31}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path / "tokenizer")
    sources = {}
    for i, lang in enumerate(LANGS + ["fr"]):  # the config adds French to the demo's languages
        (tmp_path / lang).mkdir()
        letters = chars[6 * i:6 * i + 6]
        with open(tmp_path / lang / "train.jsonl", "w") as f:
            for r in range(200):
                f.write(json.dumps({"text": "".join(letters[(r * k) % 6] for k in range(1, 30)) + "."}) + "\n")
        sources[lang] = str(tmp_path / lang)
    (cfg,) = vpd.configure([os.path.join(os.path.dirname(__file__), "configs", "edit_pile4l.py"), f"--ckpt={ckpt}",
                            f"--out_dir={tmp_path / 'out'}", f"--sources={sources}", f"--tokenizer=hf:{tmp_path / 'tokenizer'}",
                            "--seq_len=8", "--split_tokens=1200", "--analysis_windows=8", "--eval_windows=8", "--top_k=2",
                            "--budgets=[2]", "--seeds=[0]", "--methods=['one','best_act','lora1_matrix']", "--steps=2",
                            "--keep_batch=2", "--save_budget=2", "--device='cpu'"], edit.EditConfig())
    assert cfg.tokenizer.startswith("hf:") and cfg.frontier_top == 512 and cfg.keep_windows == 32  # the config
    ed = edit.Editing(cfg)
    assert all(ed.test[lang].max() < 32 for lang in LANGS + ["fr"]) and ed.chance == pytest.approx(math.log(32))
    edit.sweep(cfg)
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 3
    contexts = json.load(open(tmp_path / "out" / "components.json"))["ranked"][0]["contexts"]
    assert any("[[" in c and "?" not in c for c in contexts)            # decoded by the stand-in tokenizer


# -- the README's snippets and the notebooks -----------------------------------------------------------------

def test_readme_library_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    snippet = re.search(r"## Library use\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["metrics"]["step"] == 200 and os.path.exists(tmp_path / "out/mine/ckpt.pt")
    assert scope["ci"].shape == (64, 48) and scope["masked_out"].shape == scope["target_out"].shape


@needs_transformers
def test_readme_hugging_face_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    snippet = re.search(r"## Library use\n.*?```python\n(.*?)```.*?```python\n(.*?)```", readme, re.S).group(2)
    monkeypatch.chdir(tmp_path)
    scope = {"torch": torch, "vpd": vpd}  # imported by the first snippet
    exec(compile(snippet, "README.md", "exec"), scope)
    metrics = scope["hf_metrics"]
    assert metrics["step"] == 20 and abs(metrics["ce/ones"] - metrics["ce/target"]) < 0.02 and "ce/ci" in metrics
    assert os.path.exists(tmp_path / "out/gpt2/ckpt.pt")


@pytest.mark.parametrize("name, figures", [("tms_method", ["tms_ci.png", "tms_edit.png"]),
                                           ("language_model", ["lm_training.png", "lm_language_profiles.png"]),
                                           ("editing", ["editing.png", "editing_off_target.png", "editing_frontier.png"]),
                                           ("attribution_graph", ["attribution_graphs.png", "attribution_de_optimised.json"])])


def test_notebooks_run_headless(name, figures, lm_decomposition, tmp_path):
    """Each notebook runs top to bottom as a script, on a few TMS steps or on the tiny LM fixture."""
    root, data, ckpt = lm_decomposition
    if name == "editing":
        edit.sweep(edit_config(root, data, ckpt, out_dir=str(tmp_path / "edit"), methods=["one", "best_act", "lora1_all"],
                               seeds=[0, 1], frontier_top=4))  # several seeds per budget, as in the real sweep
    env = {**os.environ, "NB_OUT": str(tmp_path), "NB_STEPS": "40", "NB_CKPT": ckpt, "NB_DATA": str(data),
           "NB_TOKENIZER": "ids", "NB_WINDOWS": "8", "NB_EDIT": str(tmp_path / "edit"), "NB_PROMPT_LEN": "6"}
    path = os.path.join(os.path.dirname(__file__), "notebooks", f"{name}.py")
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for figure in figures:
        assert os.path.exists(tmp_path / figure), (figure, os.listdir(tmp_path))
