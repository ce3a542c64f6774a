# German removal on Goodfire's own decomposition of the VPD paper's Pile-4L model (run s-55ea3f9b: 400k steps on 8
# GPUs), imported first; chance is ln 50277 = 10.83 nats. For a GPU (a CPU runs it, slowly: the 67M target and the
# 539M CI transformer over 512-token windows). Text per language: Wikipedia, streamed with `datasets` and tokenized
# with the model's gpt-neox-20b tokenizer (needs `pip install transformers` and the Hub, or both in the local cache).
#   python vpd.py import wandb:goodfire/spd/runs/s-55ea3f9b out/pile4l_goodfire --n_heads=6
#   python edit.py configs/edit_pile4l.py
exec(open(__file__.replace("_pile4l.py", "_fortunes.py")).read())  # methods, budgets, grid as the demo
ckpt = "out/pile4l_goodfire/ckpt.pt"         # or your own: --ckpt=out/pile4l/ckpt.pt --decomposition_processes=8
out_dir = "out/edit_pile4l"
tokenizer, seq_len = "hf:EleutherAI/gpt-neox-20b", 512
languages = ["en", "de", "es", "it", "fr"]    # French too: the paper's edit spared it, and Spanish, not Italian
sources = {lang: f"wikimedia/wikipedia:20231101.{lang}" for lang in languages}
split_tokens = 400_000                       # per split and language: 200 analysis windows of 513 need 103k
keep_batch, keep_windows = 8, 32           # 32 windows of 512 tokens: 3.3 GB of cached logits
frontier_top = 512                           # of ~10k alive: the 512 most German-selective (Goodfire's 513 is among them)
decomposition_processes = 1                  # the imported config holds the run's global batch (64 sequences)
