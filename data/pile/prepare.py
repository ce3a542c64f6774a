"""
A local, repeatable copy of the pre-tokenized Pile that the VPD paper decomposes on
(`danbraunai/pile-uncopyrighted-tok-shuffled`: rows of 512 gpt-neox-20b token ids in `input_ids`).

    python data/pile/prepare.py --train_rows=2000000 --val_rows=10000   # -> data/pile/{train,val}.bin

Streams the rows with `datasets` and writes nanoGPT-style uint16 memmaps (the vocabulary, 50,277, fits
in 16 bits), and meta.json with the row length. Then `--dataset=data/pile` reads random whole rows: a
window never straddles two unrelated rows, so the target sees the inputs it was trained on. Without this
step, configs/pile4l.py streams the dataset directly, each rank reading its own shard.
"""
import argparse
import itertools
import json
import os

import numpy as np
from tqdm import tqdm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="danbraunai/pile-uncopyrighted-tok-shuffled")
    parser.add_argument("--train_rows", type=int, default=1_000_000)  # 512M tokens, 1 GB
    parser.add_argument("--val_rows", type=int, default=10_000)
    parser.add_argument("--val_split", default="val")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    import datasets
    os.makedirs(args.out_dir, exist_ok=True)
    row_len = None
    for split, name, n_rows in (("train", "train", args.train_rows), ("val", args.val_split, args.val_rows)):
        rows = datasets.load_dataset(args.dataset, split=name, streaming=True)
        path = os.path.join(args.out_dir, f"{split}.bin")
        with open(path + ".tmp", "wb") as f:
            for row in tqdm(itertools.islice(rows, n_rows), total=n_rows, desc=split):
                ids = np.asarray(row["input_ids"])
                row_len = row_len or len(ids)
                if len(ids) != row_len:  # the reader finds rows by their index: all must be equally long
                    raise ValueError(f"{args.dataset} has rows of {row_len} and of {len(ids)} tokens")
                if ids.max(initial=0) >= 2**16:
                    raise ValueError(f"token id {ids.max()} does not fit in uint16")
                ids.astype(np.uint16).tofile(f)
        os.replace(path + ".tmp", path)  # a half-written file never looks finished
        print(f"wrote {path}")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump({"row_len": row_len}, f)


if __name__ == "__main__":
    main()
