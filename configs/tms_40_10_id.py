# TMS 40-10-id: TMS 40-10 with a frozen 10x10 identity between its matrices, which should come out as
# exactly 10 subcomponents that are always active together.      python vpd.py configs/tms_40_10_id.py
exec(open(__file__.replace("_id.py", ".py")).read())  # everything else as in tms_40_10.py
out_dir = "out/tms_40_10_id"
identity_layer = True
target_path = "out/targets/tms_40_10_id.pt"
modules = {"linear1": 200, "hidden": 200, "linear2": 200}
steps = 8000  # SPD: 10k-40k; linear1 and linear2 come out exact well before 8k
# tied as tms_40_10.py, but without the frequency term: tied, linear2 no longer needs it, and it penalises the
# identity's always-on pieces
beta = 0.0
