"""MIM model: official layout, masked-position gather, attention and checkpointing switches, init, loading, export."""
import functools
import json
import logging
import math
import os

import pytest
import timm
import torch
from timm.models.beit import Beit

from pretrain.mim import (BlockMaskGenerator, build_mim_model, export_to_timm, gather_masked, load_mim_model,
                          save_mim_model, to_timm_state_dict)
from pretrain.mim.model import read_mim_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Key names and shapes of the official releases (a copy kept in the repository).
OFFICIAL_KEYS = os.path.join(ROOT, "reference", "official_state_dict_keys.json")
TINY = "beitv2_tiny_test"   # 32 px, 8 px patches (4 x 4), width 64, 3 blocks, early 2, head 2, vocab 64, k = 6


def tiny(**overrides):
    torch.manual_seed(0)
    model = build_mim_model(TINY, **overrides)
    # Zero-initialised tensors (bias table, q/v biases) would hide wiring mistakes: give them values.
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(std=0.1)
    return model


def batch(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    mask = BlockMaskGenerator(grid_size=4, num_masked=6, min_num_patches=2)(b, generator=g)
    return images, mask


@pytest.mark.parametrize("arch", ["beit_base_patch16_224_8k_vocab_cls_pt", "beit_large_patch16_224_8k_vocab_cls_pt"])
def test_state_dict_matches_official(arch):
    with open(OFFICIAL_KEYS) as f:
        official = json.load(f)[f"pretrain/{arch}"]
    with torch.device("meta"):
        model = build_mim_model(arch)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # The only official tensor we do not store is the derived index buffer.
    assert {k for k in official if k not in ours} == {"rel_pos_bias.relative_position_index"}
    assert ours == {k: v for k, v in official.items() if k != "rel_pos_bias.relative_position_index"}


def test_forward_equals_boolean_indexing():
    model = tiny().eval()
    images, mask = batch()
    logits, agg_logits = model(images, mask)
    assert logits.shape == agg_logits.shape == (3 * 6, 64)
    tokens, agg = model.forward_features(images, mask)
    torch.testing.assert_close(logits, model.lm_head(model.norm(tokens[:, 1:]))[mask])
    torch.testing.assert_close(agg_logits, model.lm_head(model.norm(agg[:, 1:]))[mask])
    # An explicit count gives the same answer; a different static count changes the shape.
    torch.testing.assert_close(model(images, mask, num_masked=6)[0], logits)


@pytest.mark.parametrize("overrides", [{}, {"early_layers": 3}, {"head_layers": 0}, {"head_layers": 1},
                                       {"drop_path_rate": 0.3}])
def test_forward_skips_the_mlp_of_unread_rows_and_computes_the_same(overrides):
    """The last backbone block (unless the head reads its patch tokens) and the last head block run their MLP on the
    CLS and masked rows only: the same logits as the whole forward gathered, and the same gradients to rounding,
    also with drop path and activation checkpointing (which replays the same random draws)."""
    model = tiny(**overrides).train()
    images, mask = batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(outs):
        return sum(o.logsumexp(-1).sum() for o in outs if o is not None)

    torch.manual_seed(1)
    tokens, agg = model.forward_features(images, mask)
    want = [model.lm_head(model.norm(t[:, 1:]))[mask] for t in (tokens, agg) if t is not None]
    want_grads = torch.autograd.grad(loss(want), params, allow_unused=True)
    mlp_rows = {}
    has_head = len(model.cls_pt_layers) > 0
    last_blocks = {"backbone": model.blocks[-1], **({"head": model.cls_pt_layers[-1]} if has_head else {})}
    for name, blk in last_blocks.items():
        blk.mlp.fc1.register_forward_hook(lambda m, i, o, name=name: mlp_rows.__setitem__(name, i[0].shape[:-1]))
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        got = [o for o in model(images, mask) if o is not None]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for g, w in zip(torch.autograd.grad(loss(got), params, allow_unused=True), want_grads):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        pruned_backbone = not has_head or model.early_layers < len(model.blocks)
        assert mlp_rows["backbone"] == ((3, 1 + 6) if pruned_backbone else (3, 1 + 16))
        if has_head:
            assert mlp_rows["head"] == (3, 1 + 6)


def test_aggregation_head_reads_final_cls_and_early_patches():
    model = tiny().eval()
    images, mask = batch()
    with torch.no_grad():
        x = model.patch_embed(images)
        x = torch.where(mask[..., None], model.mask_token, x)
        x = torch.cat([model.cls_token.expand(3, -1, -1), x], 1)
        bias = model.rel_pos_bias()
        states = []
        for blk in model.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
            states.append(x)
        agg = torch.cat([states[-1][:, :1], states[model.early_layers - 1][:, 1:]], 1)
        for blk in model.cls_pt_layers:
            agg = blk(agg, shared_rel_pos_bias=bias)
        tokens, ours = model.forward_features(images, mask)
    torch.testing.assert_close(tokens, states[-1])
    torch.testing.assert_close(ours, agg)


def test_gather_masked_equals_boolean_indexing():
    _, mask = batch(b=5)
    codes = torch.randint(0, 64, (5, 16))
    feats = torch.randn(5, 16, 7)
    assert torch.equal(gather_masked(codes, mask, 6), codes[mask])
    assert torch.equal(gather_masked(feats, mask, 6), feats[mask])


def test_masked_patches_are_replaced_by_mask_token():
    model = tiny().eval()
    images, mask = batch(b=1)
    patch_masked = mask[0].view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)  # pixel-level mask
    changed_masked = images + 5.0 * patch_masked
    changed_visible = images + 5.0 * ~patch_masked
    with torch.no_grad():
        out = model(images, mask)
        same = model(changed_masked, mask)
        diff = model(changed_visible, mask)
    # Pixels under masked patches cannot reach the output; visible ones do.
    torch.testing.assert_close(same, out)
    assert not torch.allclose(diff[0], out[0])
    # The mask token itself does: it gets a gradient.
    model.train()
    sum(o.sum() for o in model(images, mask)).backward()
    assert model.mask_token.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_attention_kernels_compute_the_same_function():
    model = tiny().eval()   # tiny() gives the relative position bias non-zero values
    images, mask = batch()
    outputs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "explicit", "flex"):   # flex runs eagerly here: CPU forward only
            model.set_attention(kernel)
            outputs[kernel] = model(images, mask)
    torch.testing.assert_close(outputs["sdpa"], outputs["explicit"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["flex"], outputs["explicit"], rtol=1e-5, atol=1e-5)
    # Files written when the kernel was an on/off switch still build.
    built = build_mim_model(TINY, fused_attn=False)
    assert {b.attn.kernel for b in (*built.blocks, *built.cls_pt_layers)} == {"explicit"}
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        build_mim_model(TINY, attention="flash")


def test_flex_attention_training_on_cpu_is_a_clear_error():
    model = tiny(attention="flex").train()
    images, mask = batch()
    with pytest.raises(RuntimeError, match="attention='flex' trains on CUDA only"):
        model(images, mask)


def test_grad_checkpointing_checkpoints_every_block_with_the_same_grads(monkeypatch):
    import pretrain.mim.model as mim_model
    images, mask = batch()
    checkpointed = []

    def counted(fn, *args, **kwargs):   # what the model calls for each checkpointed block
        checkpointed.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)
    monkeypatch.setattr(mim_model, "checkpoint", counted)

    def grads(checkpointing: bool) -> dict:
        model = tiny()
        model.set_grad_checkpointing(checkpointing)
        checkpointed.clear()
        logits, agg_logits = model(images, mask)
        # Equal gradients alone would not show that anything was recomputed: count what went through checkpoint.
        # The last blocks go through as `partial(block_at_rows, block)`: their MLP runs on the read rows only.
        blocks = [fn.args[0] if isinstance(fn, functools.partial) else fn for fn in checkpointed]
        assert blocks == ([*model.blocks, *model.cls_pt_layers] if checkpointing else []), checkpointing
        (logits.logsumexp(-1).mean() + agg_logits.logsumexp(-1).mean()).backward()
        with torch.no_grad():   # nothing to recompute without gradients: blocks run plain
            model(images, mask)
        assert len(checkpointed) == (len(model.blocks) + len(model.cls_pt_layers)) * checkpointing
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and all(g is not None for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_init_follows_official():
    model = build_mim_model(TINY)
    std = 0.02
    for t in (model.cls_token, model.mask_token, model.lm_head.weight, model.blocks[0].mlp.fc1.weight):
        assert t.abs().max() <= std and t.std() > 0.4 * std        # normal truncated at +-std
    assert model.lm_head.bias.abs().max() == 0
    assert model.rel_pos_bias.relative_position_bias_table.abs().max() == 0
    for layer_id, blk in enumerate(model.blocks, start=1):
        bound = std / math.sqrt(2 * layer_id)
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert 0.8 * bound < w.abs().max() <= bound + 1e-7
        assert torch.equal(blk.gamma_1, torch.full_like(blk.gamma_1, 0.1))
    # Aggregation blocks keep PyTorch's default Linear init (uniform, 1/sqrt(fan_in)), rescaled as layers
    # early_layers + 1, ... (the official model creates them after its init pass).
    for layer_id, blk in enumerate(model.cls_pt_layers, start=model.early_layers + 1):
        w = blk.mlp.fc2.weight
        bound = 1 / math.sqrt(w.shape[1]) / math.sqrt(2 * layer_id)
        assert 0.9 * bound < w.abs().max() <= bound + 1e-7


def test_drop_path_rates_follow_official_schedule():
    model = build_mim_model(TINY, drop_path_rate=0.3)   # depth 3, early 2, head 2: 4 slots
    rates = torch.linspace(0, 0.3, 4).tolist()
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)
    assert [b.drop_path1.drop_prob for b in model.blocks[1:]] == pytest.approx(rates[1:3])
    assert [b.drop_path1.drop_prob for b in model.cls_pt_layers] == pytest.approx(rates[2:4])


def test_build_rejects_unknown_settings():
    with pytest.raises(ValueError, match="bogus_key"):
        build_mim_model(TINY, bogus_key=1)
    with pytest.raises(ValueError, match="no_such_arch"):
        build_mim_model("no_such_arch")
    with pytest.raises(ValueError, match="early_layers"):
        build_mim_model(TINY, early_layers=4)


def test_no_weight_decay_names_are_parameters():
    model = build_mim_model(TINY)
    assert model.no_weight_decay() == {"cls_token"}
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


def test_flops_close_to_design_numbers():
    with torch.device("meta"):
        base = build_mim_model("beit_base_patch16_224_8k_vocab_cls_pt")
    # ViT-B's MIM model by formula: 128.5 GFLOPs per training image for every block on every row, 121.6 with the
    # last backbone and head blocks' MLP on the 1 + 75 read rows only (docs/measurements.md); the frozen tokenizer's
    # forward, about 34 more, is counted separately.
    assert 121e9 < base.flops_per_image() < 122e9


def test_save_and_load_roundtrip(tmp_path):
    model = tiny(vocab_size=32)
    path = tmp_path / "mim.pt"
    save_mim_model(model, path)
    loaded = load_mim_model(path)   # arch comes from the file, including the vocab override
    assert loaded.lm_head.out_features == 32
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_mim_model(path, drop_path_rate=0.1).blocks[-1].drop_path1.drop_prob == pytest.approx(0.1 * 2 / 3)


def test_load_official_layout_infers_arch(tmp_path):
    model = tiny()
    sd = dict(model.state_dict())
    sd["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)   # as official files
    path = tmp_path / "official_like.pth"
    torch.save({"module": sd, "epoch": 3}, path)
    loaded = load_mim_model(path)
    assert loaded.arch_kwargs["early_layers"] == model.early_layers
    images, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images, mask), model.eval()(images, mask))


def test_load_safetensors(tmp_path):
    from safetensors.torch import save_file
    model = tiny()
    path = tmp_path / "mim.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": json.dumps(model.arch_kwargs)})
    loaded = load_mim_model(path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_load_mismatch_is_one_line_naming_file_and_keys(tmp_path):
    sd = dict(tiny().state_dict())
    del sd["blocks.1.norm1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as err:
        load_mim_model(path, arch=TINY)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "blocks.1.norm1.weight" in msg and "extra.weight" in msg
    # Shape mismatches are named too (here: a file with 64 codes read as a 128-code model).
    save_mim_model(tiny(), path)
    with pytest.raises(ValueError, match=r"wrong shapes \['lm_head.weight"):
        load_mim_model(path, arch=TINY, vocab_size=128)


def test_read_checkpoint_rejects_pickled_objects(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"model": {}, "opt": torch.optim.SGD}, path)   # a class: needs full unpickling
    with pytest.raises(ValueError, match="contains pickled code/objects that are not weights"):
        read_mim_file(path)


def test_a_tokenizer_file_given_as_a_mim_model_is_a_one_line_error(tmp_path):
    from pretrain.tokenizer import build_tokenizer, save_tokenizer
    save_tokenizer(build_tokenizer("vqkd_tiny_test"), str(tmp_path / "tok.pt"))
    with pytest.raises(ValueError, match="is a 'beitv2-ds/tokenizer/1' file, not a BEiT v2 MIM model; pass a BEiT"):
        load_mim_model(tmp_path / "tok.pt")


def test_compile_fullgraph_forward_backward():
    # aot_eager traces forward and backward like inductor does, without code generation: a graph break,
    # a data-dependent shape or a host sync in the step fails here.
    model = tiny()
    images, mask = batch()
    eager = model(images, mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(images, mask)
    sum(o.sum() for o in out).backward()
    torch.testing.assert_close(out, eager)
    assert model.lm_head.weight.grad is not None
    # A new mask (same count) reuses the graph: the count is static, the positions are data.
    _, other_mask = batch(seed=1)
    assert not torch.equal(other_mask, mask)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(images, other_mask), model(images, other_mask))


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    # About a minute of C++ code generation on two cores.
    torch._dynamo.reset()
    model = tiny()
    images, mask = batch()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(images, mask), model(images, mask), rtol=1e-4, atol=1e-4)


# ---- export to timm -------------------------------------------------------------------------------------------

def test_export_loads_strictly_into_timm_and_matches_features(tmp_path):
    model = tiny().eval()
    path = tmp_path / "tiny_timm.safetensors"
    sd = export_to_timm(model, path)
    assert not any(k.startswith(("mask_token", "lm_head", "cls_pt_layers", "rel_pos_bias", "norm.")) for k in sd)
    for i in range(3):
        assert torch.equal(sd[f"blocks.{i}.attn.relative_position_bias_table"],
                           model.rel_pos_bias.relative_position_bias_table)
    assert torch.equal(sd["fc_norm.weight"], torch.ones(64)) and torch.equal(sd["fc_norm.bias"], torch.zeros(64))
    ref = Beit(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=0, use_abs_pos_emb=False,
               use_rel_pos_bias=True, init_values=0.1).eval()
    ref.load_state_dict(sd, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, _ = model.forward_features(images)
        torch.testing.assert_close(ref.forward_features(images), ours)


def test_export_loads_through_timm_pretrained_path(tmp_path, caplog):
    model = tiny().eval()
    path = tmp_path / "tiny_timm.safetensors"
    export_to_timm(model, path)
    with caplog.at_level(logging.INFO, logger="timm"):
        loaded = timm.create_model("beitv2_base_patch16_224", pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(path)),
                                   img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2).eval()
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images), model.forward_features(images)[0])


def test_export_base_layout_matches_timm():
    with torch.device("meta"):
        ours = to_timm_state_dict(build_mim_model("beit_base_patch16_224_8k_vocab_cls_pt"))
        theirs = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_export_options(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    sd = to_timm_state_dict(model.state_dict(), fc_norm_from_norm=True)
    assert torch.equal(sd["fc_norm.weight"], model.norm.weight)
    with pytest.raises(ValueError, match="safetensors"):
        export_to_timm(model, tmp_path / "out.pth")
