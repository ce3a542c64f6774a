# The same pipeline as configs/edit_fortunes.py, cut to about 2 minutes on 2 CPU cores: 3 budgets, one
# seed, shorter edits and smaller text samples.
#   python edit.py configs/edit_fortunes_quick.py
exec(open(__file__.replace("_quick.py", ".py")).read())
out_dir = "out/edit_fortunes_quick"
analysis_windows, eval_windows = 64, 48
budgets, seeds, steps = [1, 8, 64], [0], 30
