# VPD on EleutherAI's Pythia-14m (GPT-NeoX: 6 layers, d_model 128, 4 heads, MLP 512, trained on the Pile),
# loaded from the Hugging Face Hub with transformers' AutoModelForCausalLM. The pile-4L recipe scaled to
# its size; a starting point for a GPU, not a tuned recipe.
#   pip install transformers==5.24.0 && python vpd.py configs/pythia14m.py
# Needs: transformers (optional elsewhere); the model (~55 MB) from the Hub, or offline from the local cache
# (run once online, or `hf download EleutherAI/pythia-14m`; or a save_pretrained directory with
# --model=hf:path/to/dir); the Pile streamed from the Hub, or python data/pile/prepare.py and
# --dataset=data/pile for a local copy.
import os

out_dir = "out/pythia14m"
model = "hf:EleutherAI/pythia-14m"   # vocab_size comes from the model: 50,304 (its embedding is padded)
dataset = "danbraunai/pile-uncopyrighted-tok-shuffled"   # tokenized with gpt-neox-20b's tokenizer: Pythia's own
seq_len = 512

# C per matrix: pile-4L's C / d_model ratios at d_model 128, rounded up to a multiple of 64. Every matrix
# has rank <= 128; the fused q, k, v and the MLP matrices get several times that, as in pile-4L.
modules = {
    "gpt_neox.layers.*.attention.query_key_value": 384,  # q, k, v fused [384, 128], decomposed whole: 3 x 128
    "gpt_neox.layers.*.attention.dense": 192,            # the output projection: pile-4L's o_proj 1024 / 768
    "gpt_neox.layers.*.mlp.dense_h_to_4h": 512,          # MLP in: pile-4L's c_fc 3072 / 768 = 4 x d_model
    "gpt_neox.layers.*.mlp.dense_4h_to_h": 640,          # MLP out: pile-4L's down_proj 3584 / 768 = 4.67 x d_model
}
# ~21M parameters for a 1.2M-parameter decomposition (pile-4L: 539M for 28M)
ci_fn, ci_d_model, ci_n_blocks, ci_n_heads, ci_d_mlp = "transformer", 512, 4, 8, 2048
faith_coeff, imp_coeff, p_start, p_end, beta = 1e7, 2e-4, 2.0, 0.4, 0.5
stoch_coeff, adv_coeff, recon_loss = 0.5, 0.5, "kl"
routing, adv_routing, adv_steps, adv_lr = "uniform_k_subset", "all", 2, 0.01
# 400k steps at lr 5e-5 in pile-4L; 50k here at a higher rate
steps, lr, lr_warmup, lr_final, grad_clip = 50_000, 1e-4, 0.0, 0.1, 0.01
faith_warmup_steps, faith_warmup_lr = 400, 1e-3
# memory: mostly logits over 50,304 tokens; the plan printed at the start stops a run that cannot fit and
# says which batch size would (per process)
batch_size = 64 // int(os.environ.get("WORLD_SIZE", 1))   # per process; 64 in all when the world size divides 64
dtype = "bfloat16"                                          # autocast; Δ and L_faith stay fp32
eval_interval, eval_batches, eval_adv_steps = 1000, 2, [20]
ci_threshold = 0.0
log_interval, ckpt_interval = 100, 5000
