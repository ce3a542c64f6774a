# The teaching example of edit.py: on a TMS 5-2 decomposition (python vpd.py), rescale the subcomponent
# that reads feature 0 (suppress m = 0, invert -1, amplify 2) and see that only inputs with feature 0
# move; then train that scalar against a rank-1 LoRA on 1-16 examples.
#   python vpd.py && python edit.py configs/edit_tms.py --ckpt=out/tms_5_2/ckpt.pt
task = "tms"
ckpt = "out/tms_5_2/ckpt.pt"
out_dir = "out/edit_tms"
feature = 0
tms_budgets = [1, 2, 4, 8, 16]
