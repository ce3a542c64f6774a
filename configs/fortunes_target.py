# A small LlamaSimpleMLP trained on fortune cookies in English, German, Spanish and Italian: the
# offline language-model target (data: python data/fortunes/prepare.py, needs the Debian packages).
# python vpd.py configs/fortunes.py trains it first when out/targets/fortunes.pt is missing.
out_dir = "out/fortunes"
model, dataset = "llama_simple_mlp", "data/fortunes"
n_layers, d_model, n_heads, d_mlp, vocab_size, seq_len = 2, 128, 4, 512, 4096, 64
target_path = "out/targets/fortunes.pt"
# 800 steps x 64 sequences x 64 tokens: ~2.6 passes over the 1.28M training tokens, a few minutes on a CPU
target_steps, target_batch_size, target_lr, target_weight_decay = 800, 64, 3e-3, 0.1
target_schedule, target_warmup = "cosine", 50
