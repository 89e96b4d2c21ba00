"""What longctx_hf says about serving engines is what benchmarks/engines/engine_matrix.py measured, and it reaches
the user: `info`, the model card, a warning when such a checkpoint is written."""
import json
import math
import warnings
from pathlib import Path

import pytest
from models import tiny_model
from test_checkpoint import make_source
from test_cli import run
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from longctx_hf import engines, extend_checkpoint, extend_context
from longctx_hf.engines import EngineWarning

MATRIX = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "engine_matrix.json").read_text())
RUN_NAMES = {"vllm": engines.VLLM, "vllm-transformers-backend": engines.VLLM_TRANSFORMERS,
             "llama.cpp": engines.LLAMA_CPP}


def measured():
    """{checkpoint kind: {engine: verdict}} from the committed matrix output."""
    table = {}
    for case in MATRIX["cases"].values():
        if case["method"] == "none":
            continue
        kind = engines.kind_of(case["method"], case["options"])
        for run_name, engine in RUN_NAMES.items():
            if run_name in case["runs"]:
                table.setdefault(kind, {})[engine] = case["runs"][run_name]["verdict"]
    return table


def test_the_engine_table_is_exactly_the_measured_matrix():
    assert engines.ENGINES == measured()
    assert set(engines.ENGINES) >= {"pi", "ntk", "yarn", "longrope", "dynamic_ntk", "dynamic_yarn", "self_extend"}


def test_every_recommended_setting_was_measured_to_work():
    dynamic = MATRIX["cases"]["dynamic_ntk-x2"]["runs"]["vllm-max-model-len-8192"]
    assert dynamic["verdict"] == "same" and dynamic["max_length"] == 8192
    case = MATRIX["cases"]["yarn-x4-options"]
    run_with_settings = case["runs"]["llama.cpp-runtime-options"]
    assert run_with_settings["verdict"] == "same"
    assert run_with_settings["runtime_options"] == engines.llama_cpp_yarn_settings(case["factor"], case["options"])
    completed = MATRIX["cases"]["longrope-x2"]["runs"]["llama.cpp-completed-gguf"]
    assert completed["verdict"] == "same" and "rope_factors_long" in completed["completed_with"]
    assert "longctx-hf gguf" in engines.REASONS["longrope", engines.LLAMA_CPP]


def test_no_engine_derives_twice_the_self_extend_length():
    vllm = MATRIX["cases"]["self_extend-x2"]["runs"]["vllm"]
    assert vllm["derived_max_length"] == 16384  # = max_position_embeddings, not x factor again


def test_info_and_model_card_name_the_engines_that_would_compute_something_else(tmp_path):
    src = make_source(tmp_path / "src")
    with pytest.warns(EngineWarning, match="vLLM silently computes a different model"):
        dynamic = extend_checkpoint(src, tmp_path / "dyn", "dynamic_ntk", 2)
    out = run("info", str(dynamic))
    assert "engines:             vLLM: different" in out.stdout
    assert "warning: vLLM silently computes a different model" in out.stdout
    assert "max_model_len=<pretrained length>" in out.stdout
    card = (dynamic / "README.md").read_text()
    assert "## Serving engines" in card and "- vLLM: **loads it and silently computes a different model**" in card

    with pytest.warns(EngineWarning, match="llama.cpp silently"):
        custom = extend_checkpoint(src, tmp_path / "custom", "yarn", 4, beta_fast=16, attention_factor=1.0)
    settings = engines.llama_cpp_yarn_settings(4, {"beta_fast": 16, "attention_factor": 1.0})
    assert settings == {"yarn_beta_fast": 16.0,  # llama.cpp multiplies 0.1 ln(s) + 1 by the key's value
                        "kv_overrides": {"llama.rope.scaling.attn_factor": pytest.approx(1 / (0.1 * math.log(4) + 1))}}
    assert "yarn_beta_fast=16.0, kv_overrides={'llama.rope.scaling.attn_factor': 0.87824" in run("info", str(custom)).stdout

    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineWarning)
        plain = extend_checkpoint(src, tmp_path / "yarn", "yarn", 4)
    out = run("info", str(plain))
    assert "engines:             vLLM: same; llama.cpp: same" in out.stdout and "warning" not in out.stdout
    assert "- llama.cpp: computes the same model" in (plain / "README.md").read_text()


def test_extend_context_warns_when_an_engine_would_compute_something_else():
    with pytest.warns(EngineWarning, match="llama.cpp silently"):
        extend_context(tiny_model(), "self_extend", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineWarning)
        extend_context(tiny_model(), "pi", 2)


def test_a_dynamic_yarn_model_built_with_a_foreign_attention_is_refused(tmp_path):
    """vLLM's transformers backend builds the model with its own attention, which the cache-exact runtime cannot
    wrap: the model would run dynamic YaRN's frequencies without it."""
    model = extend_context(tiny_model(), "dynamic_yarn", 2)
    model.save_pretrained(tmp_path / "dyn")
    AttentionInterface.register("serving_engine_attention", sdpa_attention_forward)
    with pytest.raises(ValueError, match="would silently run something else"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dyn", trust_remote_code=True,
                                             attn_implementation="serving_engine_attention")
