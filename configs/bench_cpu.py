# The fixed configuration for speed comparisons on a CPU: the full VPD step (global transformer CI,
# uniform-k-subset stochastic loss, persistent adversary with 2 inner steps, KL) on a randomly
# initialised 4-layer LlamaSimpleMLP with random tokens. No evaluation. Prints the median ms/step.
#   OMP_NUM_THREADS=2 python vpd.py configs/bench_cpu.py
out_dir = "out/bench_cpu"
model, dataset = "llama_simple_mlp", "random"
n_layers, d_model, n_heads, d_mlp, vocab_size, seq_len = 4, 128, 4, 512, 512, 64
target_path, target_steps = "out/targets/bench_cpu.pt", 0   # the random init is the target

modules = {"h.*.attn.q_proj": 64, "h.*.attn.k_proj": 64, "h.*.attn.v_proj": 128, "h.*.attn.o_proj": 128,
           "h.*.mlp.c_fc": 384, "h.*.mlp.down_proj": 448}
ci_fn, ci_d_model, ci_n_blocks, ci_n_heads, ci_d_mlp = "transformer", 256, 2, 4, 1024
# the pile-4L losses and coefficients
faith_coeff, imp_coeff, p_start, p_end, beta = 1e7, 2e-4, 2.0, 0.4, 0.5
stoch_coeff, adv_coeff, recon_loss, adv_steps = 0.5, 0.5, "kl", 2
lr, lr_final, grad_clip = 5e-5, 0.1, 0.01
batch_size, steps, faith_warmup_steps = 8, 30, 0
log_interval, eval_interval, ckpt_interval = 1, 0, 10**9   # one timing per step; the median drops the first
compile = True   # the CI function and sigmoids fused: a little faster per step; the first step compiles
