"""Tests of vpd.py and models.py: hand-computed losses, invariants of the masked forward, the sigmoids,
routing, the adversary, checkpoints and resume, the configurator, and recovery of TMS 5-2.
Run: python -m pytest -q   (offline, CPU, a few minutes on 2 cores)"""
import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

import models
import vpd


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


# -- §4 losses against hand-computed values ---------------------------------------------------------

def test_importance_minimality_hand_values():
    g = {"m": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}  # two positions, two subcomponents
    # s = [4, 6], mean = [2, 3]
    assert vpd.importance_minimality_loss(g, p=1.0, beta=0.0).item() == pytest.approx(5.0)
    expected = 2 * (1 + math.log2(5)) + 3 * (1 + math.log2(7))
    assert vpd.importance_minimality_loss(g, p=1.0, beta=1.0).item() == pytest.approx(expected, rel=1e-6)
    # p = 2: s = [1 + 9, 4 + 16] = [10, 20], mean = [5, 10]; two matrices add up
    two = {"a": g["m"], "b": torch.tensor([[0.5], [0.0]])}
    assert vpd.importance_minimality_loss(two, p=2.0, beta=0.0).item() == pytest.approx(15 + 0.125)


def test_importance_minimality_positions_are_all_leading_dims():
    g = torch.rand(3, 5, 4)
    flat = {"m": g.reshape(15, 4)}
    assert vpd.importance_minimality_loss({"m": g}, 2.0, 0.5).item() == pytest.approx(
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


# -- §1-2 components and the masked forward -----------------------------------------------------------

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
    out = dec.masked(x, ones_masks(dec, x), dec.deltas())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_masked_forward_formula_per_position():
    dec, _ = decomposition()
    x = torch.randn(5, 4)
    dec(x)
    c = dec.comps["0"]
    m, d = torch.rand(5, 5), torch.rand(5)
    out = dec.masked(x, {"0": (m, d)}, dec.deltas())
    hidden = torch.stack([x[i] @ (c.V * m[i]) @ c.U + d[i] * (x[i] @ c.delta().T) + c.bias for i in range(5)])
    expected = dec.target[2](torch.relu(hidden))  # "2" is absent from the masks: its original weight
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_routing_reproduces_target_where_unrouted():
    model = tiny_mlp()
    x = torch.randn(6, 4)
    dec, _ = decomposition(model)
    dec(x)
    masks = {n: (torch.rand(6, c.V.shape[1]), torch.rand(6)) for n, c in dec.comps.items()}
    routed = torch.zeros(6, 2, dtype=torch.bool)
    routed[:3, 0] = True  # positions 0-2 route the first matrix only
    out = dec.masked(x, vpd.route(masks, routed), dec.deltas())
    torch.testing.assert_close(out[3:], model(x)[3:], atol=1e-5, rtol=1e-5)
    only_first = dec.masked(x[:3], {"0": (masks["0"][0][:3], masks["0"][1][:3])}, dec.deltas())
    torch.testing.assert_close(out[:3], only_first, atol=1e-5, rtol=1e-5)


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


def test_bad_module_pattern_names_the_problem():
    with pytest.raises(ValueError, match="matches no nn.Linear.*closest"):
        vpd.install_components(tiny_mlp(), {"linear9": 3})
    with pytest.raises(ValueError, match="two patterns"):
        vpd.install_components(tiny_mlp(), {"0": 3, "[0]": 3})


def test_install_keeps_target_state_dict_keys_and_freezes_target():
    model = tiny_mlp()
    keys = set(model.state_dict())
    comps = vpd.install_components(model, {"*": 3})
    assert list(comps) == ["0", "2"]
    assert {k for k in model.state_dict() if not k.endswith((".V", ".U"))} == keys
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith((".V", ".U")))


# -- §3 the leaky hard sigmoids -------------------------------------------------------------------------

def test_lower_leaky_hard_sigmoid_values_and_gradients():
    z = torch.tensor([-0.5, -0.5, 0.0, 0.5, 1.0, 1.5, 1.5], requires_grad=True)
    g = torch.tensor([-1.0, 1.0, -2.0, 3.0, 4.0, -5.0, 5.0])
    y = vpd.LowerLeakyHardSigmoid.apply(z)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    y.backward(g)
    # below 0: α·g only where g < 0 (the loss wants CI to rise); (0, 1]: g; above 1: 0
    assert z.grad.tolist() == pytest.approx([-0.01, 0.0, -0.02, 3.0, 4.0, 0.0, 0.0])


def test_upper_leaky_hard_sigmoid_values_and_gradients():
    z = torch.tensor([-1.0, 0.25, 0.75, 3.0], requires_grad=True)
    y = vpd.upper_leaky_hard_sigmoid(z)
    assert y.tolist() == pytest.approx([0.0, 0.25, 0.75, 1.02])
    y.sum().backward()
    assert z.grad.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.01])


def test_ci_functions_shapes():
    dec, _ = decomposition()
    dec(torch.randn(8, 4))
    lower, upper = dec.causal_importance()
    assert {n: v.shape for n, v in lower.items()} == {"0": (8, 5), "2": (8, 7)}
    assert all(((v >= 0) & (v <= 1)).all() for v in lower.values())
    cfg = vpd.Config(modules={"0": 5, "2": 7}, ci_fn="transformer", ci_d_model=16, ci_n_blocks=1, ci_n_heads=2,
                     ci_d_mlp=32)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dec = vpd.Decomposition(model, cfg)
    dec(torch.randn(2, 3, 4))  # [B, T, d]: the transformer mixes positions
    lower, _ = dec.causal_importance()
    assert {n: v.shape for n, v in lower.items()} == {"0": (2, 3, 5), "2": (2, 3, 7)}


# -- §4 the adversaries -------------------------------------------------------------------------------

def test_persistent_adversary_ascent_raises_loss_and_stays_in_unit_box():
    dec, cfg = decomposition()
    x = torch.randn(64, 4)
    with torch.no_grad():
        target_out = dec(x)
        ci = {n: torch.full((64, c.V.shape[1]), 0.3) for n, c in dec.comps.items()}
    deltas = {n: d.detach() for n, d in dec.deltas().items()}
    adversary = vpd.Adversary()
    losses = []
    for _ in range(30):
        sources = adversary.leaves(ci)
        loss = vpd.adversarial_recon_loss(dec, x, target_out, ci, sources, deltas, cfg)
        losses.append(loss.item())
        adversary.ascend(dict(zip(sources, torch.autograd.grad(loss, list(sources.values())))), lr=0.05)
        assert all(((s >= 0) & (s <= 1)).all() for s in adversary.sources.values())
    assert losses[-1] > 1.5 * losses[0]
    assert adversary.sources["0"].shape == (64, 6)  # C + 1: the last channel masks Δ


def test_eval_adversary_shared_source_raises_loss():
    dec, cfg = decomposition()
    x = torch.randn(32, 4)
    with torch.no_grad():
        target_out = dec(x)
    ci = {n: torch.full((32, c.V.shape[1]), 0.5) for n, c in dec.comps.items()}
    found = vpd.eval_adversary(dec, x, target_out, ci, dec.deltas(), cfg, [0, 5, 20])
    assert found[20] > found[0] and found[5] >= found[0] * 0.99


# -- metrics ------------------------------------------------------------------------------------------

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


# -- the configurator ---------------------------------------------------------------------------------

def test_configurator(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nlr = 3e-4\nsteps = 7\nmodules = {'h.*.mlp': 8}\n_private = 1\n")
    cfg, tcfg = vpd.configure([str(path), "--imp_coeff=1", "--eval_adv_steps=[20, 40]", "--out_dir=a=b/c",
                               "--n_features=40", "--compile=True"], vpd.Config(), models.TargetConfig())
    assert (cfg.lr, cfg.steps, cfg.modules, cfg.out_dir) == (3e-4, 7, {"h.*.mlp": 8}, "a=b/c")
    assert cfg.imp_coeff == 1.0 and isinstance(cfg.imp_coeff, float)  # an int is fine for a float key
    assert cfg.eval_adv_steps == [20, 40] and tcfg.n_features == 40 and cfg.compile is True


def test_configurator_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'imp_coef'.*did you mean 'imp_coeff'"):
        vpd.configure(["--imp_coef=1"], vpd.Config())
    with pytest.raises(SystemExit, match="'steps' .* takes a int"):
        vpd.configure(["--steps=1.5"], vpd.Config())
    with pytest.raises(SystemExit, match="does not exist"):
        vpd.configure([str(tmp_path / "missing.py")], vpd.Config())
    bad = tmp_path / "bad.py"
    bad.write_text("ci_hiden = 3\n")
    with pytest.raises(SystemExit, match=f"unknown config key 'ci_hiden' in {bad}.*'ci_hidden'"):
        vpd.configure([str(bad)], vpd.Config())
    with pytest.raises(SystemExit, match="expected --key=value"):
        vpd.configure(["--steps"], vpd.Config())


# -- training, checkpoints, resume --------------------------------------------------------------------

def toy_run(tmp_path, **overrides):
    tcfg = models.TargetConfig(target_steps=300)
    cfg = vpd.Config(**{**dict(out_dir=str(tmp_path / "run"), device="cpu", steps=20, batch_size=64, eval_interval=10,
                               ckpt_interval=10, log_interval=1, faith_warmup_steps=5), **overrides})
    target_path = tmp_path / "target.pt"
    if not target_path.exists():
        models.train_target(tcfg, str(target_path))
    model = models.build_toy(tcfg)
    model.load_state_dict(torch.load(target_path, weights_only=True))
    return cfg, tcfg, model


def train_losses(path):
    return [r for r in map(json.loads, open(path)) if "total" in r]


def test_checkpoint_contents_and_resume_equality(tmp_path, monkeypatch):
    cfg, tcfg, model = toy_run(tmp_path)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    vpd.train(cfg, model, get_batch, models.toy_truth(tcfg, model, "cpu"))
    uninterrupted = train_losses(os.path.join(cfg.out_dir, "metrics.jsonl"))

    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 20 and ckpt["config"]["steps"] == 20
    assert ckpt["components"]["linear1"]["V"].shape == (5, 20) and ckpt["components"]["linear1"]["U"].shape == (20, 2)
    assert set(ckpt["target"]) == {"linear1.weight", "linear2.weight", "linear2.bias"}
    assert ckpt["adversary"]["sources"]["linear2"].shape == (64, 21)

    # the same run, crashing at step 15 (after the checkpoint at 10), then resumed
    cfg2, _, model2 = toy_run(tmp_path, out_dir=str(tmp_path / "crash"))
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


def test_nan_loss_is_a_clear_error(tmp_path):
    cfg, tcfg, model = toy_run(tmp_path)
    get_batch = models.sparse_features(tcfg, cfg.batch_size, cfg.seed)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        vpd.train(cfg, model, lambda split, step: (get_batch(split, step)[0] * float("nan"), None))


def test_short_run_recovers_tms_5_2(tmp_path):
    """A shortened configs/tms_5_2.py run recovers one subcomponent per feature in both matrices."""
    cfg, tcfg = vpd.configure([os.path.join(os.path.dirname(__file__), "configs", "tms_5_2.py"),
                               f"--out_dir={tmp_path}", f"--target_path={tmp_path}/target.pt", "--device='cpu'"],
                              vpd.Config(), models.TargetConfig())
    model, get_batch, truth = models.build(tcfg, cfg)
    metrics = vpd.train(cfg, model, get_batch, truth)
    assert metrics["mmcs"] > 0.999
    assert abs(metrics["ml2r"] - 1) < 0.02
    assert metrics["ci_error/total"] == 0
    assert metrics["alive/linear1"] == 5 and metrics["alive/linear2"] == 5
    assert os.path.exists(tmp_path / "ci_probes.png") and os.path.exists(tmp_path / "features.png")
