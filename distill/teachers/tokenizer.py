"""The mini-world SigLIP2 teacher's tokenizer: a Gemma-style BPE trained offline with `tokenizers`.

The real SigLIP2 uses Gemma's 256k vocabulary (a hub download). The mini-world has a few hundred
words, so we train a small BPE vocabulary on the training captions with the *same pipeline* as
transformers' `Siglip2Tokenizer` (lower-case, spaces as "▁", byte fallback, Gemma's special tokens),
and build the final tokenizer as a `Siglip2Tokenizer` (a `PreTrainedTokenizerFast`). The saved dir
therefore loads back through `Siglip2Processor` / `AutoTokenizer` exactly like a hub SigLIP2.

Text convention (as for the real SigLIP2): canonicalise (lower-case, strip punctuation, collapse
whitespace), pad to `max_length` (64, the model's position count) on the right, and give the model no
attention mask: the pooled text output is the last position.
"""
from __future__ import annotations

import json
import string

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4
BYTES = [f"<0x{i:02X}>" for i in range(256)]               # byte fallback for unseen characters
# Part of every teacher's fingerprint: a change to how the vocabulary is learnt retrains the teachers.
# 2: pieces no longer cross word boundaries (version 1 merged whole captions into single tokens).
TOKENIZER_VERSION = 2


def canonicalize(text: str) -> str:
    """SigLIP's canonicalisation: lower-case, strip punctuation, collapse whitespace."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def train_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> Siglip2Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Siglip2Tokenizer's normaliser turns spaces into "▁" before its pre-tokeniser runs, so at load time
    # nothing splits words: Gemma's vocabulary simply holds no piece across a word boundary (SentencePiece
    # trains word by word). Training must keep that property, or BPE on a small corpus of repeated
    # prompts merges whole captions into single tokens ("a▁photo▁of▁a▁circle") and the text tower sees
    # one opaque id per caption, with nothing shared between "red circle" and "red square". So the
    # trainer splits before each "▁"; the merges it learns then apply identically without the split.
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next", invert=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(SPECIALS) + len(BYTES),
                                  special_tokens=SPECIALS + BYTES, show_progress=False)
    tok.train_from_iterator([canonicalize(c) for c in corpus], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Siglip2Tokenizer(vocab=model["vocab"], merges=merges, padding_side="right", model_max_length=max_length)


def encode(tokenizer, texts: list[str], max_length: int):
    """Canonicalised, padded to max_length; the model takes no attention mask (SigLIP convention)."""
    return tokenizer([canonicalize(t) for t in texts], padding="max_length", truncation=True,
                     max_length=max_length, return_tensors="pt")["input_ids"]
