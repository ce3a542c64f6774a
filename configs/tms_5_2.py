# TMS 5-2: 5 sparse features squeezed into 2 dimensions. The decomposition should find exactly one
# subcomponent per feature in each matrix.      python vpd.py configs/tms_5_2.py   (also: python vpd.py)
out_dir = "out/tms_5_2"
model, n_features, n_hidden = "tms", 5, 2
target_path = "out/targets/tms_5_2.pt"
target_batch_size = 1024

modules = {"linear1": 20, "linear2": 20}     # C = 20 > 5: the superfluous subcomponents must die
# the target is tied (linear2's weight is linear1's transposed), so tie the subcomponents too: untied,
# linear1 is recovered on far fewer seeds
tie = {"linear2": "linear1"}
# VPD machinery (vpd.Config's defaults): persistent adversary with 2 inner steps, uniform-k-subset
# routing, the lower-leaky sigmoid. SPD's losses instead: --adv_coeff=0 --routing=layerwise --p_start=1.0
# --p_end=1.0 (the sigmoid stays lower-leaky: SPD's negative forward values are not implemented)
# SPD's coefficient (3e-3) with VPD's p anneal 2 -> 0.4: p = 1 throughout left features split over
# two subcomponents after 4k steps; p < 1 at the end makes one subcomponent per feature cheaper.
imp_coeff, p_start, p_end = 3e-3, 2.0, 0.4
# batch 2048 recovers better than half the steps at 4096, and 7k steps as many seeds as 8k; lr 2e-3
# (SPD: 1e-3 at batch 4096, 10k+ steps) for the shorter run
steps, batch_size, lr = 7000, 2048, 2e-3
eval_interval, log_interval, ckpt_interval = 2000, 500, 2000
compile = True   # the CI function fused even on a CPU: ~20 s of compilation buys ~30% per step
