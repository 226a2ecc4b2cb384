"""The VQ tokenizer (official-compatible VQGAN) and the project's own demo tokenizer training."""

from enat.tokenizer.vqgan import VQGAN, build_tokenizer, load_tokenizer

__all__ = ["VQGAN", "build_tokenizer", "load_tokenizer"]
