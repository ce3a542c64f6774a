# Remove German from the offline demo model (configs/fortunes.py) by editing its components, against LoRA,
# at German-token budgets 1-1024 with 3 seeds: Goodfire's German-removal experiment on a CPU, with gates.
#   python data/fortunes/prepare.py && python vpd.py configs/fortunes.py && python edit.py configs/edit_fortunes.py
ckpt = "out/fortunes/ckpt.pt"
out_dir = "out/edit_fortunes"
data, tokenizer, seq_len = "data/fortunes", "gpt2", 64
languages, remove, keep = ["en", "de", "es", "it"], "de", "en"
# labels, fixed before any edit: "de-only" when German holds 80% of a subcomponent's mean CI
analysis_windows, fire_threshold, only_share, pair_share, foreign_share = 200, 0.1, 0.8, 0.8, 0.1
top_k = 16                                   # Goodfire's top-16
# gates: CI above 0.5, or |x·V_c| above its 99th percentile on English (1% of English positions edited)
ci_tau, act_quantile = 0.5, 0.99
# the frontier: every alive subcomponent, each gate, m on both sides of 1 up to |m| = 100, on 8 dev windows
# per language (512 tokens: enough to rank; the chosen edits are then selected on dev and reported on test)
frontier_windows, frontier_top = 8, 0
frontier_grid = [-100.0, -30.0, -10.0, -1.0, 0.0, 3.0, 10.0, 30.0]
# Goodfire's procedure (one, top-16) and the decomposition's German parts (only) from m = 1, with and without
# gates; the frontier's best per gate, with controls: a random subcomponent and a rank-1 LoRA under the same
# gate; LoRA without a gate on every matrix and on one's matrix
methods = ["one", "top", "top_ci", "top_act", "only", "best", "best_ci", "best_act", "random", "random_ci", "random_act",
           "lora1_all", "lora4_all", "lora1_matrix", "lora4_matrix", "lora1_matrix_ci", "lora1_matrix_act"]
budgets = [1, 4, 16, 64, 256, 1024]
seeds = [0, 1, 2]
# the same for every method: Adam, 40 steps, a 2 x 3 grid chosen on the dev split: learning rates on the
# scale each kind of parameter moves (m by O(1), log|m| by O(0.1), LoRA factors by O(1/sqrt(d))) and three
# KL weights (how much English damage buys how much German)
steps, keep_batch = 40, 8
scalar_lrs, log_lrs, lora_lrs, lambdas = [0.1, 0.3], [0.03, 0.1], [3e-3, 1e-2], [0.1, 1.0, 10.0]
eval_windows, max_damage, chance_fraction, save_budget = 96, 0.1, 0.95, 64
