# TMS 5-2-id: TMS 5-2 with a frozen 2x2 identity between its matrices. The identity is a dense rank-2
# matrix that every input uses: it should come out as exactly 2 subcomponents, always active together.
#   python vpd.py configs/tms_5_2_id.py
exec(open(__file__.replace("_id.py", ".py")).read())  # everything else as in tms_5_2.py
out_dir = "out/tms_5_2_id"
identity_layer = True
target_path = "out/targets/tms_5_2_id.pt"
modules = {"linear1": 20, "hidden": 20, "linear2": 20}
steps = 8000  # SPD: 10k-40k
