"""Write CLIP BPE and T5 unigram tokenizers (saved with ``save_pretrained``) for a small, known vocabulary.

Real checkpoints ship their tokenizer; tiny test pipelines and the toy world need one that works
offline. Every word of the given vocabulary becomes a single token; any other text still
tokenizes, byte by byte.
"""
from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as the tokenizer does it: repeatedly merge the lowest-ranked adjacent pair."""
    pieces = list(pieces)
    while len(pieces) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_clip_tokenizer(directory: str | Path, words: list[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Write tokenizer files into ``directory`` and return the loaded tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab)
    for word in sorted({w.lower() for w in words if w}):
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            # New merges rank after all earlier ones, so words already single tokens stay so.
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                vocab.append(pair[0] + pair[1])
                seen.add(pair[0] + pair[1])
            pieces = _apply_bpe(pieces, ranks)
    vocab += [BOS, EOS]
    tokenizer = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def write_t5_tokenizer(directory: str | Path, words: list[str] = (), model_max_length: int = 32) -> T5Tokenizer:
    """Write a small T5 (unigram) tokenizer into ``directory`` and return the loaded tokenizer: ``words`` are
    single tokens, any other text falls back to letters (``<unk>`` for other characters)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in sorted({w.lower() for w in words if w})]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(directory))
    return T5Tokenizer.from_pretrained(str(directory))
