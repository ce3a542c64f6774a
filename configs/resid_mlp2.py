# Residual MLP, 2 layers of 25 neurons. Expected per layer: 100 mlp_in subcomponents (one per feature)
# and 25 mlp_out subcomponents firing together (50 in all).      python vpd.py configs/resid_mlp2.py
exec(open(__file__.replace("2.py", "1.py")).read())  # everything else as in resid_mlp1.py
out_dir = "out/resid_mlp2"
n_layers, d_mlp = 2, 25
target_path = "out/targets/resid_mlp2.pt"
modules = {"layers.*.mlp_in": 400, "layers.*.mlp_out": 400}   # SPD: C = 400
# resid_mlp1's VPD recipe with SPD's C. Goodfire's own resid_mlp2 recipe (METHOD.md §7) needs a CI MLP
# shared by all subcomponents, which vpd.py does not have (per-subcomponent MLPs or the transformer)
# measured, the whole config on an H100 (~3 min; ~2 h at 1 CPU thread), seeds 0 / 1: mlp_in one subcomponent per
# feature in both layers (target-CI errors 0 / 4 and 0 / 6); mlp_out 75-87 alive, ~3 on per input, not the dense block
