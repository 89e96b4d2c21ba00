"""The CLI as a user runs it: a real subprocess on real checkpoint folders."""
import json
import subprocess
import sys
from pathlib import Path

from models import tiny_model

from longctx_hf import extend_context

NO_TORCH = ("import sys; from longctx_hf.cli import main; code = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; sys.exit(code)")


def run(*args):
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120)


def test_help_and_methods():
    script = str(Path(sys.executable).parent / "longctx-hf")  # the installed console script
    out = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout
    out = run("methods")
    assert out.returncode == 0, out.stderr
    assert "yarn" in out.stdout and "beta_fast" in out.stdout and "alias: linear" in out.stdout


def test_info_reads_extended_checkpoint_without_torch(tmp_path):
    model = extend_context(tiny_model(), "yarn", 8, beta_fast=64)
    model.save_pretrained(tmp_path)
    out = run("info", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["method"] == "yarn" and info["factor"] == 8.0
    assert (info["pretrained_length"], info["extended_length"]) == (256, 2048)
    assert abs(info["attention_scaling"] - (0.1 * __import__("math").log(8) + 1)) < 1e-12
    assert info["options"] == {"beta_fast": 64.0} and info["loads_with_plain_transformers"]
    assert len(info["warnings"]) == 1 and "loader never reads the converted yarn options" in info["warnings"][0]


def test_info_warns_about_v5_only_config(tmp_path):
    config = {"model_type": "llama", "max_position_embeddings": 4096,
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                  "original_max_position_embeddings": 4096, "attention_factor": 1.2}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run("info", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "transformers 4.x would use 10000" in out.stdout
    assert "no top-level rope_scaling" in out.stdout and "yarn without beta_fast" in out.stdout
    # vLLM replaces YaRN's temperature with an explicit attention_factor, as transformers does; llama.cpp ignores it
    assert "loader never reads the converted yarn options" in out.stdout and "multipl" not in out.stdout


def test_info_missing_folder(tmp_path):
    out = run("info", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no config.json" in out.stderr


def test_info_on_a_model_without_rope(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    out = run("info", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["method"] == "no-rope"
