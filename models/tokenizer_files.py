"""Write a CLIP BPE tokenizer (saved with ``save_pretrained``) for a small, known vocabulary.

Real checkpoints ship their tokenizer; tiny test pipelines and the toy world need one that works
offline. Every word of the given vocabulary becomes a single token where BPE ranks allow; any other
text still tokenizes, byte by byte.
"""
from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

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


def write_clip_tokenizer(directory: str | Path, words: list[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Write tokenizer files into ``directory`` and return the loaded tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for word in sorted({w.lower() for w in words if w}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                vocab.append(merged)
                seen.add(merged)
            left = merged
    vocab += [BOS, EOS]
    tokenizer = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer
