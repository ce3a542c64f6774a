# Residual MLP, 3 layers of 17 neurons, 102 features. Expected per layer: 102 mlp_in subcomponents and
# 17 mlp_out subcomponents firing together (51 in all).      python vpd.py configs/resid_mlp3.py
exec(open(__file__.replace("3.py", "1.py")).read())  # everything else as in resid_mlp1.py
out_dir = "out/resid_mlp3"
n_features, n_layers, d_mlp = 102, 3, 17
target_path = "out/targets/resid_mlp3.pt"
target_steps = 10_000
modules = {"layers.*.mlp_in": 500, "layers.*.mlp_out": 500}   # SPD: C = 500, CI hidden 128
ci_hidden = 128
