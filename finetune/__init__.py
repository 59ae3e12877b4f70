"""Transfer (BEiT v2 stage 3): classification fine-tuning with layer-wise lr decay, linear probing, k-NN and
UperNet segmentation. Not built yet; `pretrain.mim export` already writes the backbone in timm's `beitv2_*` layout,
and timm's `param_groups_layer_decay` gives the layer-decay groups."""
