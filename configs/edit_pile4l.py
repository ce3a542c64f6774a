# German removal on the VPD paper's Pile-4L decomposition (python vpd.py configs/pile4l.py; chance is
# ln 50277 = 10.83 nats), as Goodfire ran it, for a GPU. Text per language: Wikipedia, streamed with
# `datasets` and tokenized with the model's gpt-neox-20b tokenizer (needs `pip install transformers`
# and the Hub, or both in the local cache).
#   python edit.py configs/edit_pile4l.py
exec(open(__file__.replace("_pile4l.py", "_fortunes.py")).read())  # methods, budgets, grid as the demo
ckpt = "out/pile4l/ckpt.pt"
out_dir = "out/edit_pile4l"
tokenizer, seq_len = "hf:EleutherAI/gpt-neox-20b", 512
languages = ["en", "de", "es", "it", "fr"]    # French too: the paper's edit spared it, and Spanish, not Italian
sources = {lang: f"wikimedia/wikipedia:20231101.{lang}" for lang in languages}
split_tokens = 400_000                       # per split and language: 200 analysis windows of 513 need 103k
keep_batch, keep_windows = 8, 32           # 32 windows of 512 tokens: 3.3 GB of cached logits
decomposition_processes = 8                  # torchrun --nproc_per_node=8, 8 sequences each
