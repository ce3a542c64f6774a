# The same pipeline as configs/edit_fortunes.py, cut to a few minutes on 2 CPU cores: the frontier over the 64
# top-ranked subcomponents, 3 budgets, one seed, one learning rate per kind of parameter, fewer methods.
#   python edit.py configs/edit_fortunes_quick.py
exec(open(__file__.replace("_quick.py", ".py")).read())
out_dir = "out/edit_fortunes_quick"
analysis_windows, eval_windows = 64, 48
frontier_top = 64
methods = ["one", "top_act", "best", "best_act", "best_ci", "random_act", "lora1_matrix", "lora1_matrix_act"]
budgets, seeds, steps = [1, 8, 64], [0], 30
scalar_lrs, log_lrs, lora_lrs = [0.3], [0.1], [1e-2]
