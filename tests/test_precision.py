"""`run.precision=auto` (engine.config.precision): bf16 where the machine computes it natively, fp32 where it would be
emulated. Both CPU paths are exercised with given flag sets; this machine's own flags decide the demo recipes."""
import pytest

from engine.config import precision
from engine.config.schema import resolve_with_origins
from pretrain.mim.config import RECIPES as MIM_RECIPES
from pretrain.mim.config import MIMConfig
from pretrain.tokenizer.config import RECIPES as TOKENIZER_RECIPES
from pretrain.tokenizer.config import TokenizerConfig


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\nbugs\t\t: none\n")
    assert {"avx2", "avx512_bf16"} <= precision.cpu_flags(str(info)) and "none" not in precision.cpu_flags(str(info))
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("flags,expected", [({"avx2", "fma"}, "fp32"), ({"avx512f", "avx512_bf16"}, "bf16_autocast"),
                                            ({"amx_tile", "amx_bf16"}, "bf16_autocast"), (set(), "fp32")])
def test_auto_picks_bf16_only_on_a_cpu_with_native_bf16(flags, expected):
    assert precision.auto_precision("cpu", flags) == expected


def test_auto_on_a_cuda_accelerator_without_a_gpu_stays_fp32():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto is bf16 there when it supports it")
    assert precision.auto_precision("cuda") == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_the_demo_pretraining_recipes_resolve_auto_for_this_cpu(monkeypatch, native):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda flags=None: native)
    for cls, recipes, name, extra in ((MIMConfig, MIM_RECIPES, "beitv2_small_demo", {}),
                                      (TokenizerConfig, TOKENIZER_RECIPES, "vqkd_small_demo", {})):
        assert recipes[name]["run"]["precision"] == "auto"
        cfg, origins = resolve_with_origins(cls, recipes, name, extra)
        assert cfg.run.precision == ("bf16_autocast" if native else "fp32")
        assert origins["run.precision"] == f"auto on this machine (recipe {name})"
    # A precision the user names is kept as it is.
    cfg, _ = resolve_with_origins(MIMConfig, MIM_RECIPES, "beitv2_small_demo", {"run.precision": "fp32"})
    assert cfg.run.precision == "fp32"


def test_this_machine_resolves_auto_from_its_own_flags(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg, _ = resolve_with_origins(MIMConfig, MIM_RECIPES, "beitv2_small_demo", {})
    assert cfg.run.precision == ("bf16_autocast" if precision.native_bf16_cpu() else "fp32")
