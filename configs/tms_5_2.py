# TMS 5-2: 5 sparse features squeezed into 2 dimensions. The decomposition should find exactly one
# subcomponent per feature in each matrix.      python vpd.py configs/tms_5_2.py   (also: python vpd.py)
out_dir = "out/tms_5_2"
model, n_features, n_hidden = "tms", 5, 2
target_path = "out/targets/tms_5_2.pt"
target_batch_size = 1024

modules = {"linear1": 20, "linear2": 20}   # C = 20 > 5: superfluous subcomponents must die
imp_coeff, p_start, p_end = 3e-3, 1.0, 1.0
steps, batch_size, lr = 4000, 4096, 1e-3
eval_interval, log_interval, ckpt_interval = 1000, 500, 1000
