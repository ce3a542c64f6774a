# TMS 40-10: 40 sparse features in 10 dimensions (about 2 active per input). One subcomponent per feature
# in each matrix is the right answer.      python vpd.py configs/tms_40_10.py   (~13 min on a 2-core CPU)
out_dir = "out/tms_40_10"
model, n_features, n_hidden = "tms", 40, 10
zero_bias = True                     # the output bias starts at zero (SPD's 40-10 target)
target_path = "out/targets/tms_40_10.pt"
target_batch_size = 8192

modules = {"linear1": 200, "linear2": 200}
# tied target (linear2 = linear1^T): tie the subcomponents, as in tms_5_2.py. Measured, seeds 0-3: MMCS 1.000,
# ML2R 1.013-1.015, target-CI error 0 / 0, 40 / 40 alive (41 / 40 on seed 0) (untied, seeds 0 / 2: errors 0 / 2, 0 / 4)
tie = {"linear2": "linear1"}
# SPD's coefficient (1e-4 at p = 2), p annealed only to 1, and VPD's frequency penalty: without β a few
# linear2 subcomponents stayed on for 20-30 features each (target-CI error 66-70 at 12k steps); with
# β = 0.5 seed 0 reaches MMCS 0.9993 and error 0 / 2 (already at 4k steps of 12k)
imp_coeff, p_start, p_end, beta = 1e-4, 2.0, 1.0, 0.5
# SPD: 10k-40k steps at batch 4096 and lr 1e-3; a quarter of the batch at twice the rate is ~4x cheaper per
# step on this CPU and recovers the 4 seeds above in 12k steps
steps, batch_size, lr = 12000, 1024, 2e-3
eval_interval, log_interval, ckpt_interval = 4000, 500, 2000
compile = True                       # the CI MLP and sigmoids fused: ~5% here, free after ~20 s
