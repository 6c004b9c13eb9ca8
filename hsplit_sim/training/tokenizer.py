"""Tokenizers behind one small interface: encode, decode, pad_id, eos_id, vocab_size."""

import re
from collections import Counter

WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


class WordTokenizer:
    """Word-level vocabulary for the tiny random models: deterministic, offline and small enough for their embeddings."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.vocab_size = len(tokens)

    @classmethod
    def build(cls, texts: list[str], vocab_size: int) -> "WordTokenizer":
        """The specials plus the most frequent words (ties by spelling), at most vocab_size tokens in all."""
        counts = Counter(word for text in texts for word in cls.split(text))
        words = sorted(counts, key=lambda word: (-counts[word], word))
        return cls(SPECIALS + words[: vocab_size - len(SPECIALS)])

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercased words and single punctuation characters."""
        return WORD_PATTERN.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk_id) for word in self.split(text)]

    def decode(self, ids: list[int]) -> str:
        """Words joined by spaces; padding and end-of-sequence are dropped."""
        return " ".join(self.tokens[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id))


class HFTokenizer:
    """A transformers tokenizer behind the same interface; special tokens are added by the data code, not here."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
