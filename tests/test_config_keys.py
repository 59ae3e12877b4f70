"""Issue 22: each config key is declared once with its type, range and help (`engine.config.schema.key`); the checks and
a train command's --help are derived from the declarations."""
import re

import pytest

from data_tools.config import DataConfig
from engine.config.schema import ConfigError, OptimConfig, ScheduleConfig, _keys, config_section, resolve, validate


def _stage_configs():
    from finetune.classify.config import RECIPES as CLS, ClassifyConfig
    from finetune.segment.config import RECIPES as SEG, SegmentConfig
    from pretrain.mim.config import RECIPES as MIM, MIMConfig
    from pretrain.tokenizer.config import RECIPES as TOK, TokenizerConfig
    return {"tokenizer": (TokenizerConfig, TOK, "vqkd_tiny_test", {}),
            "mim": (MIMConfig, MIM, "beitv2_tiny_test", {"tokenizer": "tok.pt"}),
            "classify": (ClassifyConfig, CLS, "beitv2_tiny_test_ft", {}),
            "segment": (SegmentConfig, SEG, "upernet_beitv2_tiny_test", {})}


@pytest.mark.parametrize("stage", ["tokenizer", "mim", "classify", "segment"])
def test_every_key_of_every_stage_has_a_one_line_help(stage):
    cls = _stage_configs()[stage][0]
    keys = list(_keys(cls()))
    assert len(keys) > 40 and "optim.lr" in [name for name, _, _ in keys]
    missing = [name for name, _, f in keys if not f.metadata.get("help", "").strip() or "\n" in f.metadata["help"]]
    assert not missing, f"declare these keys with key(default, 'one-line help', ...): {missing}"


@pytest.mark.parametrize("stage,name,value,allowed", [
    ("tokenizer", "optim.eps", 0.0, "> 0"),
    ("tokenizer", "teacher.input_size", 8, ">= 16"),
    ("tokenizer", "schedule.decay", "linear", "one of cosine, poly"),
    ("mim", "masking.min_aspect", 1.5, "in (0, 1]"),
    ("mim", "model.attention", "flash", "one of sdpa, explicit, flex"),
    ("classify", "model.attention", "flex", "one of sdpa, explicit"),
    ("classify", "augment.magnitude", 11, "in [0, 10]"),
    ("segment", "num_classes", 300, "in [2, 255]"),
    ("segment", "augment.scale", [0, 512], ">= 1"),        # each item of a pair
    ("segment", "eval.ratios", [1.0, -0.5], "> 0"),         # each item of a list
    ("segment", "data.source", "imagenet", "one of fashion_mnist, beton, synthetic"),
])
def test_a_value_outside_its_declaration_is_a_one_line_error_naming_the_key(stage, name, value, allowed):
    cls, recipes, recipe, base = _stage_configs()[stage]
    with pytest.raises(ConfigError) as err:
        resolve(cls, recipes, recipe, {**base, name: value})
    message = str(err.value)
    assert f"'{name}'" in message and allowed in message and "\n" not in message, message


def test_ranges_apply_to_each_item_skip_none_and_name_the_section_given():
    validate(ScheduleConfig(total_steps=None, warmup_steps=None), "schedule")   # None: the key is not set
    with pytest.raises(ConfigError, match=r"^config key 'optim\.betas' = \(0\.9, 1\.0\) must be in \[0, 1\)"):
        validate(OptimConfig(betas=(0.9, 1.0)), "optim")
    with pytest.raises(ConfigError, match=r"^config key 'data_cfg\.limit' = -1 must be >= 0$"):
        config_section(DataConfig, {}, {"limit": -1}, "data_cfg")   # an evaluation command's section flag


def test_train_help_shows_each_key_default_recipe_value_help_and_the_recipes():
    from engine.config.schema import to_dict
    from pretrain.mim.config import RECIPES, MIMConfig
    from pretrain.mim.train import train
    doc = train.__doc__
    flat = " ".join(doc.split())
    recipe = "beitv2_small_demo"   # the command's default
    assert f"default {recipe}" in doc
    ours = resolve(MIMConfig, RECIPES, recipe, {})
    lines = doc.splitlines()
    for (name, default, f), (_, value, _) in zip(_keys(MIMConfig()), _keys(ours)):
        row = next((line for line in lines if line.startswith(f"  --{name}={default!r}")), None)
        assert row is not None, f"--{name} missing from the help"
        if value != default and name != "run.precision":   # the recipe's `auto` resolves on this machine
            assert f"-> {value!r}" in row, row
        elif name != "run.precision":
            assert "->" not in row, row
        assert " ".join(f.metadata["help"].split()) in flat, name
    assert re.search(r"--optim\.lr=0\.0002 -> 0\.0015 +peak learning rate of AdamW; in \(0, 1\]", doc)
    assert re.search(r"--run\.precision='fp32' -> 'auto' ", doc)
    # Each recipe lists the keys it changes, and only those.
    blocks = dict(re.findall(r"^  (\w+): (.*?)(?=^  \S|\n\n)", doc, flags=re.M | re.S))
    assert list(blocks) == list(RECIPES)
    changes = " ".join(blocks["beitv2_tiny_test"].split())
    for item in ("arch='beitv2_tiny_test'", "schedule.total_steps=8", "masking.min_patches=2", "optim.lr=0.002",
                 "run.progress_bar=False"):
        assert item in changes.split(), changes
    assert "run.precision" not in changes and "data.source" not in changes   # set to the defaults' values
    assert to_dict(MIMConfig())["run"]["precision"] == "fp32"
    assert "optim.betas=(0.9,0.98)" in blocks["beitv2_small_demo"].split()
