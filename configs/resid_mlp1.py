# Residual MLP, 1 layer: 100 features through 50 ReLU neurons ("compressed computation"). Expected:
# mlp_in splits into 100 subcomponents, one per feature; mlp_out into 50 that fire together.
#   python vpd.py configs/resid_mlp1.py
out_dir = "out/resid_mlp1"
model, n_features, n_layers, d_mlp, d_embed = "resid_mlp", 100, 1, 50, 1000
feature_prob = 0.01                  # about one active feature per input
target_path = "out/targets/resid_mlp1.pt"
target_steps, target_batch_size, target_lr, target_schedule = 1000, 2048, 3e-3, "cosine"

modules = {"layers.*.mlp_in": 100, "layers.*.mlp_out": 100}
# SPD's coefficient (1e-5 at p = 2), p annealed only to 1 (lower p splits mlp_out further) and VPD's
# frequency penalty β, which keeps a subcomponent from staying on for many features
imp_coeff, p_start, p_end, beta = 1e-5, 2.0, 1.0, 0.5
steps, batch_size, lr = 8000, 1024, 2e-3     # SPD: 20k-30k at 2048; half the batch at a higher rate for a CPU
eval_interval, log_interval, ckpt_interval = 4000, 500, 2000
compile = True
