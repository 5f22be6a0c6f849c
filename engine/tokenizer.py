"""Token ids -> caption text, from a bundle's `tokenizer.json` with the `tokenizers` library."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from engine.errors import BundleError


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`, applied when the tokenizer config asks for it."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class CaptionTokenizer:
    """Decodes generated ids like transformers' `tokenizer.decode(ids, skip_special_tokens=True)`."""

    def __init__(self, tokenizer_json: Path, clean_up_spaces: bool = False) -> None:
        """Raises BundleError when the file is missing or not a tokenizers JSON."""
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"{tokenizer_json}: cannot load tokenizer: {exc}") from exc
        self.path = Path(tokenizer_json)
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_bundle_dir(cls, directory: Path) -> CaptionTokenizer:
        """Load `tokenizer.json`; honour `clean_up_tokenization_spaces` from `tokenizer_config.json` if shipped."""
        clean_up = False
        config_path = Path(directory) / "tokenizer_config.json"
        if config_path.is_file():
            try:
                clean_up = bool(json.loads(config_path.read_text(encoding="utf-8")).get("clean_up_tokenization_spaces"))
            except (OSError, ValueError, AttributeError) as exc:
                raise BundleError(f"{config_path}: unreadable tokenizer config: {exc}") from exc
        return cls(Path(directory) / "tokenizer.json", clean_up_spaces=clean_up)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def decode_batch(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in sequences]

    def encode(self, text: str) -> list[int]:
        """Ids of `text` including the tokenizer's post-processing (e.g. a trailing EOS)."""
        return list(self._tokenizer.encode(text).ids)
