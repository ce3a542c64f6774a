# VPD on the small fortunes language model (configs/fortunes_target.py, trained first when missing):
# the pile-4L recipe shrunk to a short run on a CPU: same losses, routing and adversary; fewer steps at a
# higher rate and a stronger sparsity pressure.
#   python data/fortunes/prepare.py && python vpd.py configs/fortunes.py
exec(open(__file__.replace("fortunes.py", "fortunes_target.py")).read())  # the target and its data
# C >= rank (128) for every matrix, so the subcomponents can hold all of W and Δ can vanish (a smaller C
# leaves part of W in Δ for good); 2x for the MLP matrices, which hold more mechanisms
modules = {"h.*.attn.q_proj": 128, "h.*.attn.k_proj": 128, "h.*.attn.v_proj": 128, "h.*.attn.o_proj": 128,
           "h.*.mlp.c_fc": 256, "h.*.mlp.down_proj": 256}
ci_fn, ci_d_model, ci_n_blocks, ci_n_heads, ci_d_mlp = "transformer", 128, 1, 4, 512
# imp 1e-3 (pile-4L: 2e-4): the sparsity pressure has 1,500 steps instead of 400k
faith_coeff, imp_coeff, p_start, p_end, beta = 1e7, 1e-3, 2.0, 0.4, 0.5
stoch_coeff, adv_coeff, recon_loss = 0.5, 0.5, "kl"
routing, adv_routing, adv_steps, adv_lr = "uniform_k_subset", "all", 2, 0.01
# 400k steps at lr 5e-5 in the paper; 1500 steps here need a larger rate
steps, batch_size, lr, lr_final, grad_clip = 1500, 8, 1e-3, 0.1, 0.01
faith_warmup_steps, faith_warmup_lr = 200, 1e-3   # pile-4L: 400, for matrices 36x larger
eval_interval, eval_batches, eval_adv_steps, ci_threshold = 500, 4, [20, 40], 0.0
log_interval, ckpt_interval = 100, 500
