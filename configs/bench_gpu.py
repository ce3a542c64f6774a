# The fixed configuration for speed comparisons on a GPU: the Pile-4L recipe's step (configs/pile4l.py:
# its sizes, losses and CI transformer) at batch 8, what each GPU gets under torchrun --nproc_per_node=8,
# on a randomly initialised target with random tokens; bf16, compiled, 50 steps, no evaluation, no warm-up.
# Prints the median ms/step (and tokens/s, TFLOP/s, MFU). Its keys are all older than this file, so that
# earlier versions of vpd.py run it too.
#   python vpd.py configs/bench_gpu.py
#   python vpd.py configs/bench_gpu.py --batch_size=40 --steps=15     # all one H200 holds (~95 GiB planned)
# The last step writes a checkpoint of ~10 GB (V, U, the CI transformer, AdamW and adversary state), after the
# timings: --out_dir=/dev/shm/bench_gpu keeps it off the disk.
exec(open(__file__.replace("bench_gpu.py", "pile4l.py")).read())  # the recipe
out_dir = "out/bench_gpu"
target_path, train_target, target_steps = "out/targets/pile4l_random.pt", True, 0  # the random init is the target
dataset = "random"
batch_size, steps, faith_warmup_steps = 8, 50, 0
dtype, compile = "bfloat16", True
log_interval, eval_interval, ckpt_interval = 1, 0, 10**9   # one timing per step; the median drops the first
