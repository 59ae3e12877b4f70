"""VQ-KD tokenizer stage: train on the shared engine, evaluate codebook quality, encode images to token ids."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from data_tools import sources
from engine import distributed as dist_utils
from engine.cli import check_counts
from engine.config import DataConfig, config_section, describe, resolve, saved_run_config
from engine.ds_setup import COMPUTE_DTYPES, param_groups
from engine.evaluation import eval_device, write_result
from engine.files import write_atomically
from engine.global_batch import keep_global_batch
from engine.metrics import forward_flops_per_image
from engine.trainer import fit, seed_everything
from pretrain.tokenizer import data
from pretrain.tokenizer.config import RECIPES, TokenizerConfig
from pretrain.tokenizer.quantizer import codebook_stats
from pretrain.tokenizer.model import VQKD, build_tokenizer, load_tokenizer, save_tokenizer
from pretrain.tokenizer.teachers import TeacherConfig, build_teacher

def build_model(cfg: TokenizerConfig, teacher_dim: int) -> VQKD:
    q = cfg.quantizer
    return build_tokenizer(cfg.arch, teacher_dim=teacher_dim, decay=q.decay, beta=q.beta, kmeans_init=q.kmeans_init,
                           dead_code_threshold=q.dead_code_threshold, restart_interval=q.restart_interval,
                           seed=cfg.run.seed)


def train(recipe: str = "vqkd_small_demo", **overrides) -> dict:
    """Train a tokenizer. Flags override the recipe, e.g. `--run.output_dir runs/x --optim.lr 1e-3`."""
    cfg = resolve(TokenizerConfig, RECIPES, recipe, overrides)
    device = dist_utils.init()
    keep_global_batch(cfg.run)   # on resume: the saved micro x accum x ranks; before the data source
    seed_everything(cfg.run.seed)   # same seed on every rank: identical initial weights
    teacher = build_teacher(cfg.teacher).to(device=device, dtype=COMPUTE_DTYPES[cfg.run.precision])
    model = build_model(cfg, teacher.out_dim)
    if cfg.run.grad_checkpointing:
        model.set_grad_checkpointing(True)
    source = data.train_source(cfg, model.img_size, device)
    groups = param_groups(model, model.no_weight_decay())
    seed_everything(cfg.run.seed + dist_utils.rank())   # per-rank randomness (dropout, drop path) from here on

    probe = torch.rand(3, model.img_size, model.img_size, device=device)
    teacher_flops = forward_flops_per_image(lambda x: teacher(x, model.grid), probe)   # it runs every step

    def step_fn(engine, batch):
        images = batch["image"]
        with torch.no_grad():   # frozen teacher: no graph; its output is a plain (non-inference) tensor
            target = teacher(images, model.grid)
        return engine(images, target)

    result = fit(cfg, cfg.run, cfg.optim, cfg.schedule, model, groups, source, step_fn,
                 flops_per_image=model.flops_per_image(teacher_flops), keep_fp32_buffers=("quantize.",),
                 final_weights=("tokenizer.pt", lambda path, sd: save_tokenizer(model, path, sd)))
    return result.summary()


train.__doc__ += "\n\n" + describe(TokenizerConfig, RECIPES)


@torch.no_grad()
def evaluate(checkpoint: str, teacher: dict | None = None, data_cfg: dict | None = None, batch_size: int = 64,
             out: str = "") -> dict:
    """Codebook usage (% of codes used), perplexity and mean cosine to the teacher on held-out images.

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
    teach = build_teacher(tcfg).to(device)
    counts = torch.zeros(model.num_codes, dtype=torch.long, device=device)
    cos_sum, n = torch.zeros((), device=device), 0
    for images in sources.eval_batches(dcfg, model.img_size, batch_size, device):
        z_q, _, codes, _ = model.encode(images)
        rec = model.decode(z_q)
        target = teach(images, model.grid)
        cos_sum += F.cosine_similarity(rec.float(), target.float(), dim=-1).mean(1).sum()
        counts += torch.bincount(codes.flatten(), minlength=model.num_codes)
        n += images.shape[0]
    usage, perplexity = codebook_stats(counts)
    result = {"images": n, "codebook_usage": usage.item(), "perplexity": perplexity.item(),
              "teacher_cosine": cos_sum.item() / max(n, 1), "num_codes": model.num_codes}
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
        png: optional PNG path: each image beside its token map (one colour per id).
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
        data.save_token_map_png(pixels, ids, model.num_codes, png)
    return {"images": int(ids.shape[0]), "grid": list(model.grid), "ids": out, "png": png or None}
