"""Each method against the paper's formula, written here independently, and against transformers' own code."""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longctx_hf import methods

CASES = [(64, 1e5, 8192, 2.0), (128, 5e5, 8192, 8.0), (96, 1e4, 4096, 4.0), (64, 1e6, 32768, 32.0), (80, 1e4, 2048, 3.5)]


def paper_inv_freq(theta, d):
    return [theta ** (-2 * i / d) for i in range(d // 2)]


def paper_yarn(theta, d, L, s, beta_fast=32, beta_slow=1):
    def dim(r):
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(theta))
    lo, hi = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), d - 1)
    out = []
    for i, f in enumerate(paper_inv_freq(theta, d)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(f / s * ramp + f * (1 - ramp))
    return out, 0.1 * math.log(s) + 1


def spec(name, d, theta, L, s, **opts):
    return methods.build_spec(methods.get_method(name), factor=s, rope_theta=theta, rotary_dim=d,
                              original_max_position_embeddings=L, options=opts)


def close(got, want, rtol=1e-6):
    want = torch.tensor(want, dtype=torch.float64)
    assert got.dtype == torch.float32
    rel = ((got.double() - want).abs() / want).max().item()
    assert rel <= rtol, rel


@pytest.mark.parametrize("d,theta,L,s", CASES)
def test_formulas_match_papers(d, theta, L, s):
    inv, scale = methods.pi.frequencies(spec("pi", d, theta, L, s))
    close(inv, [f / s for f in paper_inv_freq(theta, d)])
    assert scale == 1.0
    inv, _ = methods.ntk.frequencies(spec("ntk", d, theta, L, s))
    close(inv, paper_inv_freq(theta * s ** (d / (d - 2)), d))
    for n in (L // 2, L, 3 * L):
        inv, _ = methods.dynamic_ntk.frequencies(spec("dynamic_ntk", d, theta, L, s), seq_len=n)
        base = theta if n <= L else theta * ((s * n / L) - (s - 1)) ** (d / (d - 2))
        close(inv, paper_inv_freq(base, d))
    inv, scale = methods.yarn.frequencies(spec("yarn", d, theta, L, s))
    want, want_scale = paper_yarn(theta, d, L, s)
    close(inv, want)
    assert scale == pytest.approx(want_scale, rel=1e-12)
    inv, _ = methods.yarn.frequencies(spec("yarn", d, theta, L, s, beta_fast=128, beta_slow=2))
    close(inv, paper_yarn(theta, d, L, s, 128, 2)[0])


def test_yarn_temperatures():
    s = 16.0
    assert methods.yarn.attention_scaling(spec("yarn", 64, 1e4, 4096, s, attention_factor=1.3)) == 1.3
    deepseek = spec("yarn", 64, 1e4, 4096, s, mscale=0.707, mscale_all_dim=0.707)
    assert methods.yarn.attention_scaling(deepseek) == pytest.approx(1.0)
    other = spec("yarn", 64, 1e4, 4096, s, mscale=1.0, mscale_all_dim=0.5)
    want = (0.1 * math.log(s) + 1) / (0.05 * math.log(s) + 1)
    assert methods.yarn.attention_scaling(other) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("d,theta,L,s", CASES)
def test_matches_transformers_rope_functions(d, theta, L, s):
    heads = 4
    for name in ("pi", "dynamic_ntk", "yarn"):
        module = methods.get_method(name)
        sp = spec(name, d, theta, L, s)
        config = LlamaConfig(hidden_size=d * heads, num_attention_heads=heads, max_position_embeddings=L,
                             rope_parameters=module.rope_parameters(sp))
        for n in (None, 3 * L) if name == "dynamic_ntk" else (None,):
            want, want_scale = ROPE_INIT_FUNCTIONS[module.HF_ROPE_TYPE](config, "cpu", seq_len=n)
            got, scale = module.frequencies(sp, seq_len=n)
            close(got, want.double().tolist(), rtol=1e-6)  # ours: float32, equal to transformers' own
            assert scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("options,error,words", [
    ({"factor": 1.0}, ValueError, "factor must be > 1"),
    ({"factor": 0.5}, ValueError, "factor"),
    ({"factor": float("nan")}, ValueError, "factor must be a finite"),
    ({"factor": float("inf")}, ValueError, "factor must be a finite"),
    ({"factor": "2"}, TypeError, "factor must be a number"),
    ({"factor": True}, TypeError, "factor must be a number"),
    ({"beta_fast": 1, "beta_slow": 2}, ValueError, "beta_fast must be > beta_slow"),
    ({"mscale": 1.0}, ValueError, "mscale and mscale_all_dim"),
    ({"attention_factor": -1.0}, ValueError, "attention_factor must be > 0"),
    ({"beta_fsat": 3}, ValueError, "did you mean 'beta_fast'"),
])
def test_bad_options_name_the_parameter(options, error, words):
    kwargs = {"factor": 2.0, **options}
    factor = kwargs.pop("factor")
    with pytest.raises(error, match=words):
        spec("yarn", 64, 1e4, 4096, factor, **kwargs)


def test_foreign_and_unknown_options():
    with pytest.raises(ValueError, match="unknown option.*'pi'.*beta_fast.*takes no options"):
        spec("pi", 64, 1e4, 4096, 2.0, beta_fast=32)
    with pytest.raises(ValueError, match="method must be one of.*Did you mean 'yarn'"):
        methods.get_method("yaarn")
    with pytest.raises(TypeError, match="method must be a string"):
        methods.get_method(None)
    assert methods.get_method("linear") is methods.pi and methods.get_method("dynamic") is methods.dynamic_ntk


def test_every_method_satisfies_the_registry_contract():
    import types

    for module in methods.METHODS.values():
        methods.check_method(module)
    broken = types.ModuleType("broken")
    for name, value in vars(methods.pi).items():
        if not name.startswith("__"):
            setattr(broken, name, value)
    del broken.attention_scaling
    with pytest.raises(TypeError, match="broken must define Spec and .*attention_scaling"):
        methods.check_method(broken)
    broken.attention_scaling, broken.REMOTE_CLASS = methods.pi.attention_scaling, "x.Y"  # without REMOTE_FILES
    with pytest.raises(TypeError, match="REMOTE_FILES and REMOTE_CLASS go together"):
        methods.check_method(broken)
