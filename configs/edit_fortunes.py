# Remove German from the offline demo model (configs/fortunes.py) by editing its components, against
# LoRA, at German-token budgets 1-1024 with 3 seeds: Goodfire's German-removal experiment on a CPU.
#   python data/fortunes/prepare.py && python vpd.py configs/fortunes.py && python edit.py configs/edit_fortunes.py
ckpt = "out/fortunes/ckpt.pt"
out_dir = "out/edit_fortunes"
data, tokenizer, seq_len = "data/fortunes", "gpt2", 64
languages, remove, keep = ["en", "de", "es", "it"], "de", "en"
# labels, fixed before any edit: "de-only" when German holds 80% of a subcomponent's mean CI
analysis_windows, fire_threshold, only_share, pair_share, foreign_share = 200, 0.1, 0.8, 0.8, 0.1
top_k = 16                                   # Goodfire's top-16
methods = ["one", "top", "only", "random", "lora1_all", "lora4_all", "lora1_matrix", "lora4_matrix"]
budgets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
seeds = [0, 1, 2]
# the same for every method: Adam from the unedited model, 40 steps, a 2 x 2 grid chosen on the dev
# split: learning rates on the scale each kind of parameter moves (a scalar by O(1), LoRA factors by
# O(1/sqrt(d))) and two KL weights (how much English damage buys how much German)
steps, keep_batch = 40, 8
scalar_lrs, lora_lrs, lambdas = [0.1, 0.3], [3e-3, 1e-2], [1.0, 10.0]
eval_windows, max_damage, chance_fraction, save_budget = 96, 0.1, 0.95, 64
