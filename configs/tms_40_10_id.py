# TMS 40-10-id: TMS 40-10 with a frozen 10x10 identity between its matrices, which should come out as
# exactly 10 subcomponents that are always active together.      python vpd.py configs/tms_40_10_id.py
exec(open(__file__.replace("_id.py", ".py")).read())  # everything else as in tms_40_10.py
out_dir = "out/tms_40_10_id"
identity_layer = True
target_path = "out/targets/tms_40_10_id.pt"
modules = {"linear1": 200, "hidden": 200, "linear2": 200}
steps = 8000
# tied as tms_40_10.py; measured, seeds 0 and 1: MMCS 0.9999, target-CI error 0 / 0 on linear1 / linear2,
# 10 / 11 identity subcomponents alive but only ~4 on per input, not always on together (untied: errors 0 / 2, 0 / 0)
