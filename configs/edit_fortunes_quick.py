# The same pipeline as configs/edit_fortunes.py, cut to a few minutes on 2 CPU cores: 5 budgets, one
# seed, a 2 x 2 grid, shorter edits and smaller evaluation sets.
#   python edit.py configs/edit_fortunes_quick.py
exec(open(__file__.replace("_quick.py", ".py")).read())
out_dir = "out/edit_fortunes_quick"
analysis_windows, eval_windows = 100, 64
budgets, seeds = [1, 4, 16, 64, 256], [0]
steps, keep_batch = 50, 8
scalar_lrs, lora_lrs, lambdas = [0.1, 0.3], [3e-3, 1e-2], [0.3, 1.0]
