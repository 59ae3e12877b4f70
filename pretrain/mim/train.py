"""MIM pretraining stage: BEiT v2 with patch aggregation against a frozen tokenizer, on the shared engine."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from data_tools.gpu_augment import MimAug, generator_for, mim_views
from data_tools.sources import train_source
from engine.config.schema import ConfigError, describe
from engine.loop.frozen import frozen_entry, shards_frozen
from engine.loop.stage import StagePlan, train_stage
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import COMPUTE_DTYPES, PARAM_DTYPES, param_groups
from engine.reporting.metrics import forward_flops_per_image
from engine.storage.weights import load_strict
from pretrain.mim.config import RECIPES, MIMConfig
from pretrain.mim.masking import BlockMaskGenerator
from pretrain.mim.model import (BeitV2MIM, build_mim_model, gather_masked, masked_positions, patch_pixel_targets,
                                read_mim_file, save_mim_model)
from pretrain.mim.visualize import attention_pictures
from pretrain.tokenizer import VQKD, load_tokenizer


class TokenizerMismatch(ValueError):
    pass


def check_tokenizer(tokenizer: VQKD, model: BeitV2MIM, path: str) -> None:
    """The tokenizer must see the same crop on the same patch grid and speak the model's vocabulary."""
    problems = []
    if tokenizer.num_codes != model.lm_head.out_features:
        problems.append(f"vocabulary {tokenizer.num_codes} vs the model's {model.lm_head.out_features}")
    img_size, grid = model.patch_embed.img_size[0], tuple(model.patch_embed.grid_size)
    if tokenizer.img_size != img_size:
        problems.append(f"input size {tokenizer.img_size} vs {img_size}")
    if tuple(tokenizer.grid) != grid:
        problems.append(f"patch grid {tuple(tokenizer.grid)} vs {grid}")
    if problems:
        raise TokenizerMismatch(f"tokenizer {path} does not fit the MIM model: {'; '.join(problems)}; train a "
                                f"matching tokenizer or pick another arch")


class MaskedSource:
    """Adds block-wise masks to each micro-batch of an image source.

    Masks are drawn on the CPU for the whole batch at once, one batch ahead in a thread (torch releases the GIL),
    from a generator seeded by (seed, step, rank, micro): a resumed run draws the same masks.
    """

    def __init__(self, images, masks: BlockMaskGenerator, micro_batch_size: int, grad_accum_steps: int, seed: int,
                 device: torch.device):
        self.images, self.masks = images, masks
        self.steps_per_epoch = images.steps_per_epoch
        self.micro, self.accum, self.seed, self.device = micro_batch_size, grad_accum_steps, seed, device
        self._pool = ThreadPoolExecutor(max_workers=1)

    def _mask(self, step: int, micro: int) -> torch.Tensor:
        g = generator_for(self.seed + 7919, step, dist_utils.rank(), micro, "cpu")
        mask = self.masks(self.micro, generator=g, device=torch.device("cpu"))
        # Pinned, so the copy to the GPU really is asynchronous (from pageable memory it would block the step).
        return mask.pin_memory() if self.device.type == "cuda" else mask

    def micro_batches(self, start_step: int):
        step, micro = start_step, 0
        pending = self._pool.submit(self._mask, step, micro)
        for batch in self.images.micro_batches(start_step):
            mask = pending.result()
            micro += 1
            if micro == self.accum:
                step, micro = step + 1, 0
            pending = self._pool.submit(self._mask, step, micro)
            yield {**batch, "mask": mask.to(self.device, non_blocking=True)}


def build_model(cfg: MIMConfig) -> BeitV2MIM:
    m = cfg.model
    overrides = {"drop_path_rate": m.drop_path, "attention": m.attention, "target": m.target}
    for ours, theirs in (("layer_scale_init", "init_values"), ("early_layers", "early_layers"),
                         ("head_layers", "head_layers")):
        if getattr(m, ours) is not None:
            overrides[theirs] = getattr(m, ours)
    if not m.aggregation:
        overrides["head_layers"] = 0   # no aggregation head: the final layer's masked-token loss alone
    if cfg.masking.num_masked is not None:
        overrides["num_masked_patches"] = cfg.masking.num_masked
    model = build_mim_model(cfg.arch, **overrides)
    if cfg.init_weights:
        try:
            load_strict(model, read_mim_file(cfg.init_weights)[0], cfg.init_weights, f"MIM arch {cfg.arch}")
        except ValueError as e:
            raise ValueError(f"{e}; --init_weights takes weights of the run's arch: pick the recipe or --arch that "
                             f"matches the file") from None
    return model


def frozen_tokenizer(cfg: MIMConfig, device: torch.device, num_masked: int) -> tuple[VQKD, float]:
    """The tokenizer as the step uses it, and its forward FLOPs per image for `num_masked` codes (counted before
    any compile)."""
    tokenizer = load_tokenizer(cfg.tokenizer, arch=cfg.tokenizer_arch or None)
    tokenizer.decoder = tokenizer.decode_task_layer = None   # MIM only needs the codes
    # The encoder runs in the training precision; the task layer and the codebook stay fp32 by construction.
    tokenizer.encoder.to(COMPUTE_DTYPES[cfg.run.precision])
    tokenizer.to(device)
    probe = torch.rand(3, tokenizer.img_size, tokenizer.img_size, device=device)
    rows = torch.arange(num_masked, device=device)[None]   # the step asks for the masked patches' codes only
    flops = forward_flops_per_image(lambda images: tokenizer.get_codebook_indices(images, rows), probe)
    # It runs every step: about a seventh of a ViT-B step in eager mode on an H200. A partitioned tokenizer runs
    # eagerly: its layers are gathered by DeepSpeed's hooks around each call.
    if cfg.run.compile and not shards_frozen(cfg.run):
        mode = None if cfg.run.compile_mode == "default" else cfg.run.compile_mode
        tokenizer.encoder_rows = torch.compile(tokenizer.encoder_rows, mode=mode)
    return tokenizer, flops


def prepare(cfg: MIMConfig, device: torch.device) -> StagePlan:
    """MIM with patch aggregation: the masked patches' tokenizer codes (or normalised pixels, `model.target`) are
    the targets of the final layer and of the aggregation head; the two losses are summed
    (`model.aggregation=false`: no head, the final layer's loss alone)."""
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise ConfigError("model.attention=flex trains on CUDA only (FlexAttention has no CPU backward); use "
                          "--model.attention=sdpa here")
    model = build_model(cfg)
    k = model.num_masked_patches
    if cfg.model.target == "codes":
        tokenizer, target_flops = frozen_tokenizer(cfg, device, k)
        check_tokenizer(tokenizer, model, cfg.tokenizer)
        # partitioned at ZeRO-3 (engine.loop.frozen)
        codes_of = frozen_entry(tokenizer, "get_codebook_indices", cfg.run)
    else:
        target_flops = 0.0
    patch = model.patch_embed.patch_size[0]
    masks = BlockMaskGenerator(grid_size=tuple(model.patch_embed.grid_size), num_masked=k,
                               min_num_patches=cfg.masking.min_patches, min_aspect=cfg.masking.min_aspect)
    images = train_source(cfg.data, cfg.run, MimAug(size=model.patch_embed.img_size[0]), device)
    source = MaskedSource(images, masks, cfg.run.micro_batch_size, cfg.run.grad_accum_steps, cfg.run.seed, device)
    groups = param_groups(model, model.no_weight_decay())
    dtype = PARAM_DTYPES[cfg.run.precision]

    pixels = cfg.model.target == "pixels"
    target_loss = F.mse_loss if pixels else F.cross_entropy

    def step(engine, batch):
        model_view, tokenizer_view = mim_views(batch["image"])
        mask = batch["mask"]
        if pixels:
            targets = gather_masked(patch_pixel_targets(tokenizer_view, patch), mask, k)
        else:
            with torch.inference_mode():   # the masked patches' codes only, [B, k]: what gather_masked would keep
                codes = codes_of(tokenizer_view, masked_positions(mask, k))
            targets = codes.flatten().clone()   # clone: a normal tensor that autograd may save
        # The final layer's and the aggregation head's predictions (None without the head).
        heads = {name: out for name, out in zip(("mim", "agg"), engine(model_view.to(dtype), mask)) if out is not None}
        losses = {name: target_loss(out.float(), targets) for name, out in heads.items()}
        metrics = {f"{name}_loss": loss.detach() for name, loss in losses.items()}
        if not pixels:
            with torch.no_grad():
                metrics.update({f"{name}_acc": (out.argmax(-1) == targets).float().mean()
                                for name, out in heads.items()})
        return sum(losses.values()), metrics

    return StagePlan(model, groups, source, step, "mim.pt", save_mim_model,
                     flops_per_image=model.flops_per_image() + target_flops,
                     pictures=attention_pictures if len(model.cls_pt_layers) else None)


def train(recipe: str = "beitv2_small_demo", **overrides) -> dict:
    """Pretrain a BEiT v2 model. Flags override the recipe, e.g. `--tokenizer=runs/x/tokenizer.pt`."""
    return train_stage(MIMConfig, RECIPES, recipe, overrides, prepare)


train.__doc__ += "\n\n" + describe(MIMConfig, RECIPES, train)
