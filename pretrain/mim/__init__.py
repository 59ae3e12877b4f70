"""BEiT v2 masked image modeling (stage 2): the model, block-wise masking and export to timm.

Stable API: `build_mim_model(arch, **overrides)`, `load_mim_model(path, arch=None)`, on the model
`model(images, mask) -> (logits, aggregation_logits)` over the masked patches, `gather_masked` for the matching
labels, `BlockMaskGenerator(...)(batch_size, generator, device)` and `export_to_timm(model_or_sd, out_path)`.
"""
from pretrain.mim.export import export_to_timm, to_timm_state_dict
from pretrain.mim.masking import BlockMaskGenerator
from pretrain.mim.model import (MIM_ARCHS, BeitV2MIM, build_mim_model, gather_masked, load_mim_model,
                                masked_positions, read_mim_file, save_mim_model)

__all__ = ["MIM_ARCHS", "BeitV2MIM", "BlockMaskGenerator", "build_mim_model", "export_to_timm", "gather_masked",
           "load_mim_model", "masked_positions", "read_mim_file", "save_mim_model", "to_timm_state_dict"]
