"""A word-piece tokenizer for the mini-world SigLIP2 teacher, trained offline with `tokenizers`.

The real SigLIP2 uses Gemma's 256k vocabulary, which needs a hub download; the mini-world has a few
hundred words, so we train a small WordPiece vocabulary on the training captions. SigLIP2's text
canonicalisation (lower-case, strip punctuation, collapse whitespace) is built into the tokenizer's
normaliser, so every caller gets it without remembering to apply it; captions end with an EOS token
and are padded to `max_length` (the pooled text output is the last position, as in SigLIP).
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def canonicalize(text: str) -> str:
    """SigLIP's rule in plain Python (the tokenizer's normaliser does the same)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def train_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(Regex("[" + "".join("\\" + c for c in string.punctuation) + "]"), ""),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], min_frequency=1,
                                        show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=max_length, padding_side="right")
    return fast


def encode(tokenizer, texts: list[str], max_length: int):
    """SigLIP convention: pad to max_length, no attention mask given to the model."""
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")["input_ids"]
