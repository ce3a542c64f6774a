# Residual MLP, 2 layers of 25 neurons. Expected per layer: 100 mlp_in subcomponents (one per feature)
# and 25 mlp_out subcomponents firing together (50 in all).      python vpd.py configs/resid_mlp2.py
exec(open(__file__.replace("2.py", "1.py")).read())  # everything else as in resid_mlp1.py
out_dir = "out/resid_mlp2"
n_layers, d_mlp = 2, 25
target_path = "out/targets/resid_mlp2.pt"
modules = {"layers.*.mlp_in": 400, "layers.*.mlp_out": 400}   # SPD: C = 400
# resid_mlp1's VPD recipe with SPD's C. Goodfire's own resid_mlp2 recipe uses a CI MLP shared by all
# subcomponents, which vpd.py does not have (it has per-subcomponent MLPs and the transformer)
