"""The installed `beitv2` command (engine.main) and `--config=FILE` on train commands (engine.config.schema.resolve).

The console script runs in subprocesses (help at each level, one tiny tokenizer run, and that run's config.json
rerun in a new folder); bad config files and commands are checked in-process through `engine.main.main`, which is
what the console script calls.
"""
import json
import os
import subprocess
import sys

import pytest

from engine.config.schema import ConfigError, resolve, save_json, to_dict
from tests.conftest import ROOT

BEITV2 = os.path.join(os.path.dirname(sys.executable), "beitv2")
TINY = ["tokenizer", "train", "vqkd_tiny_test", "--schedule.total_steps=3"]
COMPARED = ("loss", "rec_loss", "commit_loss", "grad_norm", "lr", "codebook_usage")


def _beitv2(*args) -> subprocess.Popen:
    assert os.path.exists(BEITV2), f"{BEITV2} is missing: `make setup` (pip install -e .) installs the console script"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([BEITV2, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-3000:]
    return out + err   # fire writes help to stderr when there is no terminal


@pytest.fixture(scope="module")
def helps():
    """`beitv2 --help`, `beitv2 tokenizer --help` and `beitv2 mim train --help`, run side by side."""
    procs = {key: _beitv2(*key.split(), "--help") for key in ("", "tokenizer", "mim train")}
    return {key: _finish(proc) for key, proc in procs.items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 3-step tiny tokenizer run, trained through the console script."""
    out = tmp_path_factory.mktemp("cli") / "first"
    _finish(_beitv2(*TINY, f"--run.output_dir={out}"))
    return out


def _train_rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: r[k] for k in ("step", *COMPARED)} for r in rows if r["split"] == "train"]


def _error(capsys, *argv) -> str:
    """`beitv2 argv...` in-process: exit status 2 and one line `error: ...` last on stderr; returns that line."""
    from engine.main import main
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err[-5:]
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_top_level_help_lists_every_stage_command(helps):
    """Built from each stage's COMMANDS, so a command registered there (e.g. `mim visualize`) is listed too, each
    with the first sentence of its docstring as the imported function has it (the help reads the sources)."""
    import importlib
    import inspect

    from engine.main import _summary, registered_stages
    text = helps[""]
    assert text.startswith("usage: beitv2 GROUP COMMAND")
    for group, module in registered_stages().items():
        commands = importlib.import_module(module).COMMANDS
        for name, fn in (commands.items() if isinstance(commands, dict) else [("", commands)]):
            line = f"  {f'{group} {name}'.strip():<22} {_summary(inspect.getdoc(fn))}"
            assert _summary(inspect.getdoc(fn)) and line in text.splitlines(), f"{line!r} missing from:\n{text}"
    assert "--config=FILE" in text and "deepspeed --module engine.main" in text


def test_top_level_help_imports_no_stage_and_no_torch():
    """`beitv2 --help` answers in a fraction of a second: it reads the commands' help from the sources."""
    code = ("import runpy, sys; sys.argv = ['beitv2', '--help']\n"
            "try:\n    runpy.run_module('engine.main', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'numpy', 'pretrain',"
            " 'finetune', 'data_tools'))\n"
            "print('IMPORTED', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: beitv2 GROUP COMMAND" in proc.stdout and "mim train" in proc.stdout, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "IMPORTED []", proc.stdout[-2000:]


def test_a_stage_another_package_registers_is_a_command_group(tmp_path, monkeypatch, capsys):
    """Groups are `beitv2.stages` entry points: one added by another installed package is listed (after the
    project's, which keep the pipeline's order) and runs; with no installed metadata the source tree's setup.cfg
    gives the project's groups."""
    import importlib.metadata

    from engine import main as cli_main
    (tmp_path / "plugin_stage_for_test.py").write_text(
        'def hello(name: str = "world") -> dict:\n    """Say hello to NAME."""\n    return {"hello": name}\n\n\n'
        'COMMANDS = {"hello": hello}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points
    plugin = importlib.metadata.EntryPoint("plugin", "plugin_stage_for_test", cli_main.ENTRY_POINTS)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [*real(**kw), plugin] if kw.get("group") == cli_main.ENTRY_POINTS else real(**kw))
    monkeypatch.setattr(cli_main, "registered_stages", cli_main.registered_stages.__wrapped__)   # uncached
    project = ["convert", "mosaics", "tokenizer", "mim", "classify", "segment"]
    assert list(cli_main.registered_stages()) == [*project, "plugin"]
    assert cli_main.usage().splitlines().count(f"  {'plugin hello':<22} Say hello to NAME.") == 1
    assert cli_main.main(["plugin", "hello", "--name=tests"]) == 0
    assert "tests" in capsys.readouterr().out
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])   # not installed: setup.cfg's list
    assert list(cli_main.registered_stages()) == project


def test_group_help_lists_its_commands(helps):
    text = helps["tokenizer"]
    assert "beitv2 tokenizer COMMAND" in text
    for name in ("train", "evaluate", "encode"):
        assert f"\n     {name}\n" in text, text


def test_train_help_lists_recipes_keys_and_config(helps):
    text = helps["mim train"]
    assert "beitv2 mim train" in text and "Recipes:" in text and "beitv2_tiny_test" in text
    assert "--run.micro_batch_size=8" in text and "--optim.lr=" in text
    assert "--config=FILE" in text and "defaults < recipe < FILE < flags" in text


@pytest.mark.slow
def test_config_rerun_in_a_new_dir_reproduces_the_losses_and_flags_win(tiny_run, tmp_path):
    """No recipe named: the command's default recipe (vqkd_small_demo) sits below the file, which sets every key."""
    rerun = tmp_path / "rerun"
    _finish(_beitv2("tokenizer", "train", "--config", tiny_run / "config.json", f"--run.output_dir={rerun}",
                    "--run.keep_last=1"))
    first = _train_rows(tiny_run)
    assert [r["step"] for r in first] == [1, 2, 3]
    assert _train_rows(rerun) == first
    old, new = (json.loads((d / "config.json").read_text()) for d in (tiny_run, rerun))
    assert new["run"].pop("output_dir") == str(rerun) and new["run"].pop("keep_last") == 1   # the flags won
    assert old["run"].pop("output_dir") == str(tiny_run) and old["run"].pop("keep_last") == 2
    assert new == old


def test_a_config_naming_a_used_output_dir_asks_for_a_new_one(tmp_path, capsys):
    from pretrain.tokenizer.config import RECIPES, TokenizerConfig
    old = tmp_path / "old"
    save_json(resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", {"run.output_dir": str(old)}),
              str(old / "config.json"))
    err = _error(capsys, "tokenizer", "train", f"--config={old / 'config.json'}")
    assert err == (f"error: config file {old / 'config.json'} sets run.output_dir={old}, which already holds a run; "
                   f"pass --run.output_dir=NEW_DIR for a new run (or --run.output_dir={old} to continue that one)")
    cfg = resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", {"config": str(old / "config.json"),
                                                               "run.output_dir": str(old)})
    assert cfg.run.output_dir == str(old)   # naming it again continues that run (engine.storage.run_dir's resume check)


def test_precedence_defaults_recipe_file_flags_and_yaml(tmp_path):
    from pretrain.tokenizer.config import RECIPES, TokenizerConfig
    partial = tmp_path / "partial.yaml"
    partial.write_text("optim:\n  lr: 0.005\nrun.seed: 3\nschedule: {total_steps: 5}\n")
    cfg = resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", {"config": str(partial), "schedule.total_steps": 7})
    assert cfg.optim.lr == 0.005 and cfg.run.seed == 3          # the file over the recipe (lr 2e-3, seed 0)
    assert cfg.schedule.total_steps == 7                         # the flag over the file
    assert cfg.optim.min_lr == 1e-4 and cfg.arch == "vqkd_tiny_test"   # the recipe where the file is silent
    full = resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", {"run.output_dir": str(tmp_path / "a")})
    import yaml
    (tmp_path / "full.yml").write_text(yaml.safe_dump(to_dict(full)))
    assert resolve(TokenizerConfig, RECIPES, "vqkd_small_demo", {}, config_file=str(tmp_path / "full.yml")) == full


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, "config file not found: {path}"),
    ("bad.json", '{"optim": {"lr": 1e-3,}}', "config file {path} is not valid JSON (Expecting property name "
                                             "enclosed in double quotes at line 1); YAML files must end in"),
    ("bad.yaml", "optim: [1, 2\nrun: {", "config file {path} is not valid YAML ("),
    ("list.json", "[1, 2]", "config file {path} must hold a JSON object of config keys (as a run's config.json "
                            "does), got list"),
    ("text.yaml", "just words", "config file {path} must hold a YAML object of config keys"),
    ("keys.yaml", "optim:\n  1: 2\n", "config file {path}: key 1 under 'optim' is not a name"),
    ("unknown.json", '{"optim": {"lrr": 0.1}}', "config file {path}: unknown config key 'optim.lrr'; valid keys "
                                                "here: betas, eps, grad_clip, lr,"),
    ("unknown.yaml", "nope: 1\n", "config file {path}: unknown config key 'nope'; valid keys here:"),
    ("type.yaml", "run:\n  seed: many\n", "config file {path}: config key 'run.seed' must be an integer, got "
                                          "'many'"),
    ("section.json", '{"optim": 3}', "config file {path}: config key 'optim' must be a mapping"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    err = _error(capsys, "tokenizer", "train", "vqkd_tiny_test", f"--config={path}",
                 f"--run.output_dir={tmp_path / 'run'}")
    assert err.startswith("error: " + message.format(path=path)), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage,recipe", [("tokenizer", "vqkd_tiny_test"), ("classify", "beitv2_tiny_test_ft")])
def test_a_bad_zero_stage_is_one_line_before_anything_starts(tmp_path, capsys, stage, recipe):
    """Read first thing (it decides host memory, and classification's EMA check), before any process group."""
    path = tmp_path / "zero.json"
    path.write_text('{"zero_optimization": {"stage": "three"}}')
    err = _error(capsys, stage, "train", recipe, f"--run.ds_config={path}", f"--run.output_dir={tmp_path / 'run'}")
    assert err == f"error: {path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, not \"three\"", err
    assert not (tmp_path / "run").exists()


def test_config_flag_is_a_path_and_a_folder_is_named(tmp_path, capsys):
    """`--config=123` is the file `123`, not the number; a folder is an error naming it."""
    assert _error(capsys, "mim", "train", "--config=123") == "error: config file not found: 123"
    assert _error(capsys, "classify", "train", f"--config={tmp_path}") == (
        f"error: config file {tmp_path} is a folder; pass the config.json inside it")
    with pytest.raises(ConfigError, match="give the config file once"):
        from pretrain.tokenizer.config import RECIPES, TokenizerConfig
        resolve(TokenizerConfig, RECIPES, None, {"config": "a.json"}, config_file="b.json")


@pytest.mark.parametrize("argv,message", [
    (["tokenzier", "train"], "error: unknown command group 'tokenzier'; choose one of: convert, mosaics, "
                             "tokenizer, mim, classify, segment"),
    (["segment", "trian"], "error: unknown command 'trian'; `beitv2 segment` takes one of: train, evaluate "
                           "(`beitv2 segment --help` lists them)"),
    (["mim", "--run.seed=1"], "error: --run.seed=1: name a command first; `beitv2 mim` takes one of: train,"),
    (["segment", "train", "--config=x.json", "--run.seed=abc"], "error: config file not found: x.json"),
])
def test_bad_commands_are_one_line_errors(capsys, argv, message):
    assert _error(capsys, *argv).startswith(message)
