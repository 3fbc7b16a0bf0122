"""Instruction tokenizer: HF `tokenizers` JSON -> fixed-length int64 ids and attention mask.

The language graph has a static sequence length so that one engine serves every instruction;
an instruction that does not fit is refused rather than silently truncated, because a cut-off
instruction can name a different goal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import BundleError, InputError

DEFAULT_MAX_TOKENS = 32
MAX_INSTRUCTION_CHARS = 512


class InstructionTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise BundleError(f"tokenizer file {path} is missing; rebuild the bundle with build-engines")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise BundleError(f"tokenizer file {path} cannot be read ({exc}); rebuild the bundle") from exc
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_tokens = max_tokens
        self.pad_id = 0

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (input_ids, attention_mask), both int64 [1, max_tokens]."""
        ids = np.zeros((1, self.max_tokens), dtype=np.int64)
        mask = np.zeros((1, self.max_tokens), dtype=np.int64)
        self.encode_into(text, ids[0], mask[0])
        return ids, mask

    def encode_into(self, text: str, ids: np.ndarray, mask: np.ndarray) -> int:
        """Fill caller-owned rows; returns the number of tokens."""
        if not isinstance(text, str):
            raise InputError(f"instruction must be text, got {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise InputError("instruction is empty; say what the robot should do, e.g. 'go to the red block'")
        if len(stripped) > MAX_INSTRUCTION_CHARS:
            raise InputError(
                f"instruction has {len(stripped)} characters; at most {MAX_INSTRUCTION_CHARS} are accepted"
            )
        encoding = self._tokenizer.encode(stripped)
        n = len(encoding.ids)
        if n > self.max_tokens:
            raise InputError(
                f"instruction is {n} tokens long; the policy accepts at most {self.max_tokens} "
                "(including [CLS] and [SEP]): shorten it"
            )
        ids[:] = self.pad_id
        mask[:] = 0
        ids[:n] = encoding.ids
        mask[:n] = 1
        return n

    def decode(self, ids: np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids if i != self.pad_id])
