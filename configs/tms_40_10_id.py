# TMS 40-10-id: TMS 40-10 with a frozen 10x10 identity between its matrices, which should come out as
# exactly 10 subcomponents that are always active together.      python vpd.py configs/tms_40_10_id.py
exec(open(__file__.replace("_id.py", ".py")).read())  # everything else as in tms_40_10.py
out_dir = "out/tms_40_10_id"
identity_layer = True
target_path = "out/targets/tms_40_10_id.pt"
modules = {"linear1": 200, "hidden": 200, "linear2": 200}
tie = {}       # measured untied (below); tying, which fixed tms_40_10, is not yet measured here
steps = 8000   # measured: MMCS 0.9995, target-CI error 0 / 2 on linear1 / linear2; the identity is not always on together
