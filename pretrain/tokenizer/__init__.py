"""VQ-KD visual tokenizer (BEiT v2 stage 1).

Stable API: `build_tokenizer(arch, **overrides)`, `load_tokenizer(path, arch=None)` and, on the model,
`get_codebook_indices(images) -> LongTensor[B, num_patches]` for RGB in [0, 1].
CLI: `python -m pretrain.tokenizer {train,evaluate,encode} --help`.
"""
from pretrain.tokenizer.model import ARCHS, VQKD, build_tokenizer, load_tokenizer, save_tokenizer

__all__ = ["ARCHS", "VQKD", "build_tokenizer", "load_tokenizer", "save_tokenizer"]
