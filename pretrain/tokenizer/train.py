"""VQ-KD tokenizer stage: train on the shared engine, evaluate codebook quality, encode images to token ids."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from data_tools import sources
from data_tools.config import DataConfig
from engine.config.cli import check_counts
from engine.config.schema import config_section, describe, saved_run_config
from engine.loop.evaluation import eval_device, write_result
from engine.loop.frozen import frozen_entry
from engine.loop.stage import StagePlan, train_stage
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import COMPUTE_DTYPES, param_groups
from engine.reporting.metrics import forward_flops_per_image
from engine.storage.files import write_atomically
from pretrain.tokenizer import data
from pretrain.tokenizer.config import RECIPES, TokenizerConfig
from pretrain.tokenizer.pictures import code_colours, token_map_grid
from pretrain.tokenizer.quantizer import codebook_stats
from pretrain.tokenizer.model import VQKD, build_tokenizer, load_tokenizer, save_tokenizer
from pretrain.tokenizer.teachers import TeacherConfig, build_teacher

def build_model(cfg: TokenizerConfig, teacher_dim: int) -> VQKD:
    q = cfg.quantizer
    return build_tokenizer(cfg.arch, teacher_dim=teacher_dim, decay=q.decay, beta=q.beta, kmeans_init=q.kmeans_init,
                           dead_code_threshold=q.dead_code_threshold, restart_interval=q.restart_interval,
                           seed=cfg.run.seed)


def token_map_pictures(model: VQKD, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Tensorboard picture of a training run: the fixed images beside their token maps, coloured by the current
    codebook's principal components (`pictures.code_colours`)."""
    ids = model.get_codebook_indices(images).view(-1, *model.grid).cpu().numpy()
    colours = code_colours(model.quantize.embedding.weight)
    return {"pictures/token_maps": token_map_grid(images, ids, colours, columns=2)}   # 2 x 2 pairs, 4 images


def prepare(cfg: TokenizerConfig, device: torch.device) -> StagePlan:
    """The tokenizer's training: a frozen teacher's features of each image are the target of encoder + codebook +
    decoder (cosine loss, in the model's forward)."""
    teacher = build_teacher(cfg.teacher, seed=cfg.run.seed).to(device=device, dtype=COMPUTE_DTYPES[cfg.run.precision])
    model = build_model(cfg, teacher.out_dim)
    source = data.train_source(cfg, model.img_size, device)
    groups = param_groups(model, model.no_weight_decay())
    probe = torch.zeros(3, model.img_size, model.img_size, device=device)   # FLOPs do not depend on the pixels
    teacher_flops = forward_flops_per_image(lambda x: teacher(x, model.grid), probe)   # it runs every step
    teacher_features = frozen_entry(teacher, "forward", cfg.run)   # partitioned at ZeRO-3 (engine.loop.frozen)

    def step(engine, batch):
        images = batch["image"]
        with torch.no_grad():   # frozen teacher: no graph; its output is a plain (non-inference) tensor
            target = teacher_features(images, model.grid)
        return engine(images, target)

    return StagePlan(model, groups, source, step, "tokenizer.pt", save_tokenizer,
                     flops_per_image=model.flops_per_image(teacher_flops), keep_fp32_buffers=("quantize.",),
                     pictures=token_map_pictures)


def train(recipe: str = "vqkd_small_demo", **overrides) -> dict:
    """Train a tokenizer. Flags override the recipe, e.g. `--run.output_dir runs/x --optim.lr 1e-3`."""
    return train_stage(TokenizerConfig, RECIPES, recipe, overrides, prepare)


train.__doc__ += "\n\n" + describe(TokenizerConfig, RECIPES, train)


@torch.no_grad()
def evaluate(checkpoint: str, teacher: dict | None = None, data_cfg: dict | None = None, batch_size: int = 64,
             out: str = "") -> dict:
    """Codebook usage (% of codes used), perplexity and mean cosine to the teacher on held-out images; under a
    launcher each rank encodes its share of the batches and the counts are summed (the numbers of one process).

    Args:
        checkpoint: tokenizer file (ours or official).
        teacher: teacher settings (as in training); defaults to those saved beside an output-dir checkpoint.
        data_cfg: data settings; defaults likewise.
        out: optional JSON path for the result.
    """
    check_counts(batch_size=batch_size)
    saved = saved_run_config(checkpoint)
    tcfg = config_section(TeacherConfig, saved.get("teacher", {}), teacher, "teacher")
    dcfg = config_section(DataConfig, saved.get("data", {}), data_cfg, "data_cfg")
    device = eval_device()
    model = load_tokenizer(checkpoint).to(device)
    teach = build_teacher(tcfg, seed=saved.get("run", {}).get("seed", 0)).to(device)   # random_init: that seed
    counts = torch.zeros(model.num_codes, dtype=torch.long, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)   # summed per-image teacher cosine, images
    for batch in sources.eval_batches(dcfg, model.img_size, batch_size, device, rank=dist_utils.rank(),
                                      world_size=dist_utils.world_size()):
        images = batch["image"]
        z_q, _, codes, _ = model.encode(images)
        rec = model.decode(z_q)
        target = teach(images, model.grid)
        sums[0] += F.cosine_similarity(rec.float(), target.float(), dim=-1).mean(1).sum()
        sums[1] += images.shape[0]
        counts += torch.bincount(codes.flatten(), minlength=model.num_codes)
    dist_utils.all_reduce_sum_(counts)
    dist_utils.all_reduce_sum_(sums)
    usage, perplexity = codebook_stats(counts)
    n = int(sums[1].item())
    result = {"images": n, "codebook_usage": usage.item(), "perplexity": perplexity.item(),
              "teacher_cosine": sums[0].item() / max(n, 1), "num_codes": model.num_codes}
    write_result({**result, "code_counts": counts.tolist()}, out)   # the file also holds each code's count
    return result


@torch.no_grad()
def encode(checkpoint: str, out: str, images: str = "", split: str = "test", count: int = 64,
           batch_size: int = 64, png: str = "") -> dict:
    """Images -> token ids saved as .npy [N, grid_h, grid_w] (+ optional PNG of token maps).

    Args:
        checkpoint: tokenizer file.
        out: .npy path for the ids.
        images: folder of image files; empty uses `count` Fashion-MNIST images of `split`.
        png: optional PNG path: each image beside its token map; a code's colour comes from the codebook's first
            three principal components (`pictures.code_colours`), so similar codes look alike.
    """
    check_counts(batch_size=batch_size)
    device = eval_device()
    model = load_tokenizer(checkpoint).to(device)
    pixels = data.images_for_encoding(images, split, count, model.img_size)
    ids = torch.cat([model.get_codebook_indices(pixels[i:i + batch_size].to(device)).cpu()
                     for i in range(0, len(pixels), batch_size)])
    ids = ids.view(-1, *model.grid).numpy()
    out = out if out.endswith(".npy") else out + ".npy"   # what np.save would name it

    def save_ids(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, ids)
    write_atomically(out, save_ids)
    if png:
        data.save_token_map_png(pixels, ids, code_colours(model.quantize.embedding.weight), png)
    return {"images": int(ids.shape[0]), "grid": list(model.grid), "ids": out, "png": png or None}
