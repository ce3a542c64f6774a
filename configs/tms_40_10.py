# TMS 40-10: 40 sparse features in 10 dimensions (about 2 active per input). One subcomponent per feature
# in each matrix is the right answer.      python vpd.py configs/tms_40_10.py
out_dir = "out/tms_40_10"
model, n_features, n_hidden = "tms", 40, 10
zero_bias = True                     # the output bias starts at zero (SPD's 40-10 target)
target_path = "out/targets/tms_40_10.pt"
target_batch_size = 8192

modules = {"linear1": 200, "linear2": 200}
# tied target (linear2 = linear1^T): tie the subcomponents, as in tms_5_2.py (untied recovers fewer seeds)
tie = {"linear2": "linear1"}
# SPD's coefficient (1e-4 at p = 2), p annealed only to 1, and VPD's frequency penalty β: without it a
# few linear2 subcomponents stay on for tens of features each
imp_coeff, p_start, p_end, beta = 1e-4, 2.0, 1.0, 0.5
# SPD: 10k-40k steps at batch 4096 and lr 1e-3; a quarter of the batch at twice the rate is ~4x cheaper per
# step on a CPU and recovers as well
steps, batch_size, lr = 12000, 1024, 2e-3
eval_interval, log_interval, ckpt_interval = 4000, 500, 2000
compile = True                       # the CI MLP and sigmoids fused: a few percent, for ~20 s of compilation
