# The VPD paper's decomposition of the 67M-parameter 4-layer LlamaSimpleMLP trained on the Pile:
# 38,912 subcomponents over the 24 block matrices, one global transformer computing every CI.
#   torchrun --standalone --nproc_per_node=8 vpd.py configs/pile4l.py    # the paper's 64 sequences: 8 GPUs x 8
#   python vpd.py configs/pile4l.py --batch_size=24                       # one 80 GB GPU (the plan says what fits)
# Target: Goodfire's pretrained weights from W&B (needs `pip install wandb` and a login), or a local
# state dict with --target_path=... Data: streamed from the Hub, or --dataset=data/pile after
# python data/pile/prepare.py for a local, repeatable copy.
import os

out_dir = "out/pile4l"
model = "llama_simple_mlp"
n_layers, d_model, n_heads, d_mlp, vocab_size, seq_len = 4, 768, 6, 3072, 50277, 512
target_path = "wandb:goodfire/spd/runs/t-9d2b8f02"
dataset = "danbraunai/pile-uncopyrighted-tok-shuffled"
train_target = False   # a mistyped target_path is an error, not a cue to pre-train a 67M model here

modules = {"h.*.attn.q_proj": 512, "h.*.attn.k_proj": 512, "h.*.attn.v_proj": 1024, "h.*.attn.o_proj": 1024,
           "h.*.mlp.c_fc": 3072, "h.*.mlp.down_proj": 3584}
ci_fn, ci_d_model, ci_n_blocks, ci_n_heads, ci_d_mlp = "transformer", 2048, 8, 16, 8192   # ~539M parameters
faith_coeff, imp_coeff, p_start, p_end, beta = 1e7, 2e-4, 2.0, 0.4, 0.5
stoch_coeff, adv_coeff, recon_loss = 0.5, 0.5, "kl"
routing, adv_routing, adv_steps, adv_lr = "uniform_k_subset", "all", 2, 0.01
steps, lr, lr_warmup, lr_final, grad_clip = 400_000, 5e-5, 0.0, 0.1, 0.01
faith_warmup_steps, faith_warmup_lr = 400, 1e-3
batch_size = 64 // int(os.environ.get("WORLD_SIZE", 1))   # per process; 64 in all when the world size divides 64
dtype = "bfloat16"                                          # autocast; Δ and L_faith stay fp32
eval_interval, eval_batches, eval_adv_steps = 1000, 2, [20]  # 2 x 64 = 128 sequences (at 24: --eval_batches=5)
# the paper also reports the adversary at 40-320 steps: --eval_adv_steps=[20,40,80,160,320] (16x the cost)
ci_threshold = 0.0                                          # L0 counts any CI > 0
log_interval, ckpt_interval = 100, 5000
