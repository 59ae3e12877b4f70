"""Typed config and DeepSpeed-config merging: unknown keys, bad values and conflicts fail before compute."""
import json
import re

import pytest

from engine.config.schema import (ConfigError, OptimConfig, RunConfig, ScheduleConfig, load_json, resolve, save_json,
                           to_dict)
from engine.loop.schedule import lr_at, total_and_warmup_steps, weight_decay_at
from engine.parallel.ds_setup import build_ds_config, param_groups
from pretrain.tokenizer.config import RECIPES, TokenizerConfig


def test_recipe_then_overrides():
    cfg = resolve(TokenizerConfig, RECIPES, "vqkd_base_clip", {"optim.lr": 1e-3, "run": {"seed": 7},
                                                               "data.train_path": "x.beton",
                                                               "teacher.weights": "clip.pt"})
    assert cfg.arch == "vqkd_encoder_base_decoder_3x768x12_clip"
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99) and cfg.run.seed == 7
    assert cfg.schedule.epochs == 100 and cfg.run.precision == "bf16"


@pytest.mark.parametrize("overrides,message", [
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
    ({"nope": 1}, "unknown config key 'nope'"),
    ({"optim.lr": -1.0}, "'optim.lr' = -1.0 must be in (0, 1]"),
    ({"optim.lr": 1e30}, "'optim.lr' = 1e+30 must be in (0, 1]"),
    ({"optim.weight_decay": 1e6}, "'optim.weight_decay' = 1000000.0 times optim.lr (0.002) must be < 1"),
    ({"optim.weight_decay_end": 600.0}, "'optim.weight_decay' = 600.0 times optim.lr (0.002) must be < 1"),
    ({"run.seed": 2 ** 40}, "'run.seed' = 1099511627776 must be in [0, 2**32)"),
    ({"run.precision": "fp8"}, "'run.precision' = 'fp8' must be one of"),
    ({"run.compile_mode": "fast"}, "'run.compile_mode' = 'fast' must be one of default, reduce-overhead"),
    ({"run.micro_batch_size": "many"}, "'run.micro_batch_size' must be an integer"),
    ({"optim.betas": [0.9]}, "'optim.betas' must be a list of 2 values"),
    ({"arch": "vqkd_giant"}, "'arch' = 'vqkd_giant' must be one of"),
    ({"teacher.name": "clip_b16"}, "'teacher.weights' is required"),
    ({"optim.weight_decay": 1e999}, "'optim.weight_decay' must be a finite number, got inf"),
    ({"optim.lr": float("nan")}, "'optim.lr' must be a finite number, got nan"),
    ({"schedule.epochs": 1e999}, "'schedule.epochs' must be a finite number"),
    ({"optim.weight_decay_end": -5.0}, "'optim.weight_decay_end' = -5.0 must be >= 0"),
    ({"run.output_dir": ""}, "'run.output_dir' = '' must name a folder"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", overrides)
    assert "\n" not in str(err.value)


def _numeric_keys(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _numeric_keys(value, f"{prefix}{key}.")
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            yield f"{prefix}{key}"


def _stages():
    from finetune.classify.config import RECIPES as CLS_RECIPES, ClassifyConfig
    from finetune.segment.config import RECIPES as SEG_RECIPES, SegmentConfig
    from pretrain.mim.config import RECIPES as MIM_RECIPES, MIMConfig
    return [(TokenizerConfig, RECIPES, "vqkd_tiny_test", {}),
            (MIMConfig, MIM_RECIPES, "beitv2_tiny_test", {"tokenizer": "tok.pt"}),
            (ClassifyConfig, CLS_RECIPES, "beitv2_tiny_test_ft", {}),
            (SegmentConfig, SEG_RECIPES, "upernet_beitv2_tiny_test", {})]


@pytest.mark.parametrize("stage", range(4))
def test_every_number_of_every_stage_refuses_negatives_and_non_finite_values(stage):
    """No count, rate or size of any stage means anything below zero: each is a one-line error naming its key."""
    cls, recipes, recipe, base = _stages()[stage]
    keys = list(_numeric_keys(to_dict(resolve(cls, recipes, recipe, base))))
    assert "optim.lr" in keys and "run.seed" in keys and len(keys) > 25
    for key in keys:
        for bad in (-1, float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=f"'{re.escape(key)}'") as err:
                resolve(cls, recipes, recipe, {**base, key: bad})
            assert "\n" not in str(err.value)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        resolve(TokenizerConfig, RECIPES, "fast", {})


def test_saved_config_round_trips(tmp_path):
    cfg = resolve(TokenizerConfig, RECIPES, "vqkd_small_demo", {})
    save_json(cfg, str(tmp_path / "c.json"))
    assert load_json(TokenizerConfig, str(tmp_path / "c.json")) == cfg


def _ds(tmp_path, content, **run):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return build_ds_config(RunConfig(ds_config=str(path), **run), OptimConfig(grad_clip=3.0), world_size=2)


def test_ds_config_takes_batch_precision_and_optimizer_from_the_run(tmp_path):
    ds = _ds(tmp_path, {"zero_optimization": {"stage": 2}}, micro_batch_size=4, grad_accum_steps=3,
             precision="bf16")
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 3.0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.99] and ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("content,message", [
    ({"train_micro_batch_size_per_gpu": 16}, "sets 'train_micro_batch_size_per_gpu' = 16"),
    ({"gradient_clipping": 1.0}, "sets 'gradient_clipping' = 1.0"),
    ({"bf16": {"enabled": True}}, "sets 'bf16.enabled' = True but run.precision is 'fp32'"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' block"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1}}}, "has an 'optimizer' block"),
])
def test_ds_json_disagreeing_with_the_run_is_an_error(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        _ds(tmp_path, content)


def test_missing_ds_json(tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config not found: /nope.json"):
        build_ds_config(RunConfig(ds_config="/nope.json"), OptimConfig(), 1)


def test_schedule_warmup_then_cosine():
    optim = OptimConfig(lr=1.0, min_lr=0.1, weight_decay=0.05, weight_decay_end=0.5)
    total, warmup = total_and_warmup_steps(ScheduleConfig(epochs=2, warmup_epochs=0.5), steps_per_epoch=10)
    assert (total, warmup) == (20, 5)
    assert lr_at(0, optim, total, warmup) == 0 and lr_at(5, optim, total, warmup) == pytest.approx(1.0)
    assert lr_at(20, optim, total, warmup) == pytest.approx(0.1)
    values = [lr_at(s, optim, total, warmup) for s in range(5, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert weight_decay_at(0, optim, total) == pytest.approx(0.05)
    assert weight_decay_at(20, optim, total) == pytest.approx(0.5)


def test_no_weight_decay_groups():
    from pretrain.tokenizer import build_tokenizer
    model = build_tokenizer("vqkd_tiny_test")
    groups = param_groups(model, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["wd_scale"] > 0 for p in g["params"]}
    assert all(g["weight_decay"] == 0 for g in groups if g["wd_scale"] == 0)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    assert not any(n.endswith(("bias", "cls_token", "pos_embed")) or "norm" in n for n in decayed)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_command_flags_are_checked_against_their_types(capsys):
    from engine.config.cli import run_cli
    seen = []

    def command(augment: bool = True, name: str = "", batch: int = 1, lr: float = 0.5):
        """Doc."""
        seen.append((augment, name, batch, lr))

    words = {"false": False, "False": False, "0": False, "no": False, "true": True, "TRUE": True, "1": True}
    for word in words:
        assert run_cli({"evaluate": command}, ["evaluate", f"--augment={word}"]) == 0
    assert [s[0] for s in seen] == list(words.values())   # fire alone passes 'false', a true string
    assert run_cli(command, ["--augment", "false"]) == 0 and seen[-1][0] is False
    assert run_cli(command, ["--augment"]) == 0 and seen[-1][0] is True
    assert run_cli(command, ["--name=false", "--batch=3", "--lr=2"]) == 0
    assert seen[-1] == (True, "false", 3, 2.0) and isinstance(seen[-1][3], float)   # only bool flags respelled
    for args, text in ((["--name=2024"], "2024"), (["--name=1e3"], "1e3"), (["--name", "0x10"], "0x10"),
                       (["--name=\"quoted\""], "quoted"), (["--name=[1, 2]"], "[1, 2]")):
        assert run_cli(command, args) == 0 and seen[-1][1] == text   # a str flag arrives exactly as typed
    capsys.readouterr()
    for args, error in ((["--augment=maybe"], "--augment must be true or false, got 'maybe'"),
                        (["--batch=abc"], "--batch must be an integer, got 'abc'"),
                        (["--batch=1.5"], "--batch must be an integer, got 1.5"),
                        (["--lr=fast"], "--lr must be a number, got 'fast'"),
                        (["--lr=1e999"], "--lr must be a finite number, got inf")):
        assert run_cli(command, args) == 2
        assert capsys.readouterr().err.strip() == f"error: {error}"
    assert len(seen) == len(words) + 8   # no bad call ran


def test_positional_text_arrives_as_typed_and_overrides_keep_their_values():
    from engine.config.cli import run_cli
    seen = []

    def export(checkpoint: str, out: str = "x", **overrides):
        seen.append((checkpoint, out, overrides))

    for text in ("True", "None", "1e3", "[1]", "a,b", "2024"):   # fire alone: a bool, None, 1000.0, a list, ...
        assert run_cli({"export": export}, ["export", text, "--out", text]) == 0
        assert seen[-1] == (text, text, {})
    assert run_cli(export, ["--out=o", "ckpt", "--optim.lr", "1e-3", "--run.compile=false"]) == 0
    assert seen[-1] == ("ckpt", "o", {"optim.lr": 1e-3, "run.compile": "false"})   # overrides: the config types them


@pytest.mark.parametrize("stage,key,value,message", [
    # issue 23: 0 fell back to the arch's crop (`model.img_size or ...`) and trained at 32 px without a word.
    (3, "model.img_size", 0, "'model.img_size' = 0 must be >= 1 (or null for the arch's crop)"),
    (3, "model.img_size", -16, "'model.img_size' = -16 must be >= 1"),
    # issue 23: smoothing 1 makes every target uniform; the fine-tune trained on them.
    (2, "augment.smoothing", 1.0, "'augment.smoothing' = 1.0 must be in [0, 1) (0.1 official, 0 off; 1 makes"),
    (2, "augment.smoothing", 1, "'augment.smoothing' = 1.0 must be in [0, 1)"),
])
def test_finetune_values_that_train_on_something_else_are_refused(stage, key, value, message):
    cls, recipes, recipe, base = _stages()[stage]
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        resolve(cls, recipes, recipe, {**base, key: value})
    assert "\n" not in str(err.value)
    resolve(cls, recipes, recipe, {**base, key: 32 if key == "model.img_size" else 0.3})   # in range: fine


def test_an_ema_of_weights_sharded_by_zero3_is_refused_when_the_config_resolves():
    """The EMA copies whole weights: under ZeRO-3 a rank holds a shard. Refused with the config (so --dry_run says
    so too), before any rank starts."""
    cls, recipes, recipe, base = _stages()[2]
    with pytest.raises(ConfigError, match=re.escape("model.ema_decay needs whole weights on every rank: use ZeRO")):
        resolve(cls, recipes, recipe, {**base, "model.ema_decay": 0.99, "run.ds_config": "ds_configs/zero3.json"})
    resolve(cls, recipes, recipe, {**base, "model.ema_decay": 0.99, "run.ds_config": "ds_configs/zero2.json"})
    resolve(cls, recipes, recipe, {**base, "model.ema_decay": 0.0, "run.ds_config": "ds_configs/zero3.json"})


def test_segment_train_with_img_size_0_stops_in_one_line_before_compute(capsys, tmp_path):
    from finetune.segment.__main__ import COMMANDS
    from tests.conftest import cli_error
    err = cli_error(capsys, COMMANDS, "train", "upernet_beitv2_tiny_test", f"--run.output_dir={tmp_path / 'x'}",
                    "--model.img_size=0")
    assert err == "error: config key 'model.img_size' = 0 must be >= 1 (or null for the arch's crop)"
    assert not (tmp_path / "x").exists()


def test_a_comma_list_flag_for_a_text_key_is_the_text_typed():
    """fire reads `--run.report_to=wandb,mlflow` as ('wandb', 'mlflow'): a text key takes the words joined back, a
    pair keeps its tuple, and a number key still refuses a list."""
    cls, recipes, recipe, base = _stages()[0]
    cfg = resolve(cls, recipes, recipe, {**base, "run.report_to": ("wandb", "mlflow"), "optim.betas": (0.9, 0.95)})
    assert cfg.run.report_to == "wandb,mlflow" and cfg.optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="'run.seed' must be an integer"):
        resolve(cls, recipes, recipe, {**base, "run.seed": ("1", "2")})


def test_a_damaged_saved_run_config_is_one_line_naming_the_file_and_the_fix(tmp_path):
    from engine.config.schema import ConfigError, saved_run_config
    assert saved_run_config(str(tmp_path / "mim.pt")) == {}   # no config.json beside it
    (tmp_path / "config.json").write_text('{"run": {"seed": 1,}}')
    with pytest.raises(ConfigError) as err:
        saved_run_config(str(tmp_path / "mim.pt"))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message and message.endswith(
        "fix or delete it and give the settings as flags")
