# TMS 40-10: 40 sparse features in 10 dimensions (about 2 active per input). One subcomponent per feature
# in each matrix is the right answer.      python vpd.py configs/tms_40_10.py
out_dir = "out/tms_40_10"
model, n_features, n_hidden = "tms", 40, 10
zero_bias = True                     # the output bias starts at zero (SPD's 40-10 target)
target_path = "out/targets/tms_40_10.pt"
target_batch_size = 8192

modules = {"linear1": 200, "linear2": 200}
imp_coeff, p_start, p_end = 1e-4, 2.0, 0.4   # SPD: 1e-4 at p = 2; annealed to 0.4 as for 5-2
steps, batch_size, lr = 3000, 1024, 2e-3   # shortened for a 2-core CPU (SPD: 10k-40k at 4096)
eval_interval, log_interval, ckpt_interval = 5000, 500, 1000
