"""Offline `extend`: real checkpoint folders, the real CLI in a subprocess, fresh-process reloads."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from models import tiny_model
from packaging.version import Version
from test_cli import run
from test_roundtrip import ARCHITECTURES, reload_in_fresh_process
from transformers import AutoConfig, AutoModelForCausalLM

from longctx_hf import extend_checkpoint, extend_context
from longctx_hf.hf_config import HEAD_DIM_KEYS, HEAD_DIM_ROTARY_MODELS, PARTIAL_ROTARY_DEFAULTS, rotary_dim_of

EXTRA_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}", "chat_template.jinja": "{{x}}",
               "original/params.json": '{"dim": 64}'}
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage: en\n---\n# the source model card\n"


def make_source(folder, kind="llama", **overrides):
    """A checkpoint folder as users have them: two weight shards, tokenizer files, a card with a license."""
    tiny_model(kind, **overrides).save_pretrained(folder, max_shard_size="100KB")
    for name, text in EXTRA_FILES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    (folder / "README.md").write_text(SOURCE_CARD)
    return folder


def snapshot(folder):
    """Every file's bytes, inode and mtime: what 'never modify SRC' means."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


CASES = [("llama", "yarn", {"beta_fast": 64}), ("llama", "ntk", {}), ("llama", "pi", {}),
         ("llama", "dynamic_ntk", {}), ("mistral", "yarn", {"attention_factor": 1.3}), ("mistral", "ntk", {}),
         ("gpt_neox", "ntk", {}), ("gpt_neox", "yarn", {}), ("phi", "dynamic_ntk", {})]


def test_offline_config_is_what_extend_context_saves_and_reloads_identically(tmp_path):
    """config.json byte-identical to extend_context + save_pretrained; fresh-process logits torch.equal."""
    sources = {kind: make_source(tmp_path / f"src-{kind}", kind) for kind in {case[0] for case in CASES}}
    folders = []
    for kind, method, options in CASES:
        offline = tmp_path / f"{kind}-{method}"
        extend_checkpoint(sources[kind], offline, method, 4, **options)
        model = extend_context(AutoModelForCausalLM.from_pretrained(sources[kind]).eval(), method, 4, **options)
        model.save_pretrained(tmp_path / f"{kind}-{method}-in-memory")
        in_memory = tmp_path / f"{kind}-{method}-in-memory" / "config.json"
        assert (offline / "config.json").read_bytes() == in_memory.read_bytes(), (kind, method)
        # > 256 pretrained: scaling active. Plain transformers runs dynamic_ntk its own (cache-inexact) way past the
        # pretrained length, so that one is compared up to it (tests/test_dynamic_cache.py covers the rest).
        ids = torch.randint(0, model.config.vocab_size, (1, 256 if method == "dynamic_ntk" else 700))
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, offline / "expected.pt")
        folders.append(str(offline))
    results = reload_in_fresh_process(folders)
    assert len(results) == len(CASES) and all(results.values()), results


def test_rotary_dim_of_matches_transformers_for_every_architecture(tmp_path):
    for kind, extra in ARCHITECTURES.items():
        model = tiny_model(kind, **extra)
        model.config.save_pretrained(tmp_path / kind)
        config = json.loads((tmp_path / kind / "config.json").read_text())
        rotary = [m for m in model.modules() if hasattr(m, "inv_freq")][0]
        assert rotary_dim_of(config) == 2 * rotary.inv_freq.numel(), kind
    from transformers import CONFIG_MAPPING

    for kind, partial in PARTIAL_ROTARY_DEFAULTS.items():  # the table equals the config classes' defaults
        if kind in CONFIG_MAPPING:  # (model types newer than the installed transformers cannot be checked here)
            assert AutoConfig.for_model(kind).rope_parameters["partial_rotary_factor"] == partial, kind


def test_rotary_dim_of_reads_transformers_4_config_forms():
    """config.json written by transformers 4.x: top-level partial_rotary_factor, GPT-NeoX rotary_pct."""
    legacy = [{"model_type": "phi", "hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.75,
               "rope_theta": 10000.0},
              {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 0.5,
               "rotary_emb_base": 10000},
              {"model_type": "stablelm", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 10000.0}]
    for config in legacy:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, "num_hidden_layers": 1,
                                                                         "intermediate_size": 64, "vocab_size": 32,
                                                                         "pad_token_id": None}))
        rotary = [m for m in model.modules() if hasattr(m, "inv_freq")][0]
        assert rotary_dim_of(config) == 2 * rotary.inv_freq.numel(), config["model_type"]


def transformers_rotary_dim(config):
    """The rotary dimension transformers' own rotary class builds for `config` (None: not one plain text rotary)."""
    import importlib
    import inspect

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(config.model_type)
    try:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None
    classes = [c for n, c in vars(module).items() if inspect.isclass(c) and n.endswith("RotaryEmbedding")
               and c.__module__ == module.__name__ and hasattr(c, "compute_default_rope_parameters")]
    if len(classes) != 1:
        return None
    return 2 * classes[0].compute_default_rope_parameters(config)[0].numel()


def as_transformers_4_dict(config):
    """A config.json as transformers 4.x or a hand-written one has it: no rope_parameters, no partial factor."""
    data = {k: v for k, v in config.to_dict().items() if k not in ("rope_parameters", "partial_rotary_factor")}
    return {**data, "rope_theta": config.rope_parameters["rope_theta"]}


# model type -> the first transformers release whose rotary class applies the config's partial_rotary_factor
IGNORED_PARTIAL_ROTARY_BEFORE = {"bamba": "5.15.0"}


def _installed_before(version):
    return Version(transformers.__version__).release < Version(version).release


def test_rotary_dim_of_is_right_or_refuses_for_every_transformers_model_type():
    """Every RoPE config class in transformers: the default config and one with twice the head size."""
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging

    logging.set_verbosity_error()
    checked = set()
    for kind in CONFIG_MAPPING.keys():
        try:
            configs = [CONFIG_MAPPING[kind]()]
        except Exception:  # classes whose defaults do not validate (sub-configs of composite models)
            continue
        rope = getattr(configs[0], "rope_parameters", None)
        if not isinstance(rope, dict) or "rope_theta" not in rope:
            continue  # no RoPE, or one per layer type (gemma3-style): never head_dim-only
        if configs[0].model_type not in HEAD_DIM_ROTARY_MODELS:  # (aliases such as code_llama build a llama)
            with pytest.raises(ValueError, match="cannot determine the rotary dimension of model_type"):
                rotary_dim_of(as_transformers_4_dict(configs[0]))
            continue
        saved = configs[0].to_dict()  # falcon's head_dim is a read-only property, not a saved key
        head_dims = {key: 2 * saved[key] for key in HEAD_DIM_KEYS if saved.get(key)}
        configs.append(CONFIG_MAPPING[kind](hidden_size=2 * configs[0].hidden_size, **head_dims))
        dims = [transformers_rotary_dim(config) for config in configs]
        assert dims[0] != dims[1], kind
        ours = [rotary_dim_of(as_transformers_4_dict(config)) for config in configs]
        if kind in IGNORED_PARTIAL_ROTARY_BEFORE and _installed_before(IGNORED_PARTIAL_ROTARY_BEFORE[kind]):
            # that release's rotary class ignores its own config's partial_rotary_factor (fixed upstream later)
            factor = configs[0].rope_parameters["partial_rotary_factor"]
            assert ours == [int(d * factor) for d in dims], kind
        else:
            assert ours == dims, kind
        checked.add(kind)
    known = HEAD_DIM_ROTARY_MODELS & set(CONFIG_MAPPING.keys())  # the table also covers newer model types
    assert known <= checked | set(ARCHITECTURES), known - checked - set(ARCHITECTURES)
    assert set(ARCHITECTURES) <= HEAD_DIM_ROTARY_MODELS
    for config in ({"model_type": "deepseek_v3", "qk_rope_head_dim": 64, "head_dim": 64},
                   {"model_type": "llama", "rotary_dim": 64, "head_dim": 128}):
        with pytest.raises(ValueError, match="load the model and use extend_context"):
            rotary_dim_of(config)


def test_cli_extend_links_weights_copies_the_rest_without_torch(tmp_path):
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    out = run("extend", str(src), "--method", "yarn", "--target-length", "1024", "--beta-fast", "64",
              "--output", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "yarn x4, 256 -> 1024 tokens" in out.stdout
    dst = tmp_path / "out"
    assert snapshot(src) == before
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(weights) >= 2  # sharded, plus the index
    for name in weights:
        assert (dst / name).stat().st_ino == (src / name).stat().st_ino  # hard link: no bytes copied
    for name in [*EXTRA_FILES, "generation_config.json", "model.safetensors.index.json"]:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
        assert (dst / name).stat().st_ino != (src / name).stat().st_ino, name  # a copy: editing it spares src
    assert json.loads((dst / "config.json").read_text())["rope_parameters"]["beta_fast"] == 64
    assert (dst / "README.md").read_text() != SOURCE_CARD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging folder left


def test_save_pretrained_into_a_linked_output_leaves_src_unchanged(tmp_path):
    """The README's claim: save_pretrained replaces files, so saving into the output never writes into SRC's."""
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    dst = extend_checkpoint(src, tmp_path / "out", "yarn", 4)
    weights = sorted(p.name for p in dst.glob("*.safetensors"))
    assert all((dst / name).stat().st_ino == (src / name).stat().st_ino for name in weights)  # linked
    model = AutoModelForCausalLM.from_pretrained(dst)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # different weights, same file names
    model.save_pretrained(dst, max_shard_size="100KB")
    assert snapshot(src) == before
    assert any((dst / name).read_bytes() != (src / name).read_bytes() for name in weights)


def test_copy_instead_of_link(tmp_path):
    src = make_source(tmp_path / "src")
    extend_checkpoint(src, tmp_path / "out", "pi", 2, link=False)
    for weight in src.glob("*.safetensors"):
        copied = tmp_path / "out" / weight.name
        assert copied.stat().st_ino != weight.stat().st_ino and sha256(copied) == sha256(weight)


def test_refusals_happen_before_any_file_is_written(tmp_path):
    src = make_source(tmp_path / "src")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("user data")
    before = snapshot(src), snapshot(occupied)
    bad = [
        (dict(dst=src), ValueError, "in_place"),
        (dict(dst=occupied), ValueError, "overwrite"),
        (dict(dst=src / "inside"), ValueError, "inside src"),
        (dict(dst=tmp_path / "new", method="yarnn"), ValueError, "Did you mean 'yarn'"),
        (dict(dst=tmp_path / "new", factor=0.5), ValueError, "factor must be > 1"),
        (dict(dst=tmp_path / "new", factor=None, target_length=100), ValueError, "target_length must exceed"),
        (dict(dst=tmp_path / "new", beta_fats=3), ValueError, "did you mean 'beta_fast'"),
        (dict(dst=tmp_path / "new", eval_results=tmp_path / "missing.json"), ValueError, "eval_results"),
        (dict(dst=None), ValueError, "dst"),
    ]
    for kwargs, error, message in bad:
        arguments = {"method": "yarn", "factor": 4, **kwargs}
        with pytest.raises(error, match=message):
            extend_checkpoint(src, arguments.pop("dst"), **arguments)
    assert (snapshot(src), snapshot(occupied)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "src"]
    out = run("extend", str(src), "--method", "pi", "--factor", "2", "--output", str(src))
    assert out.returncode == 2 and "--in-place" in out.stderr


def test_in_place_changes_only_config_and_card(tmp_path):
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    out = run("extend", str(src), "--method", "ntk", "--factor", "2", "--in-place")
    assert out.returncode == 0, out.stderr
    after = snapshot(src)
    assert set(after) == set(before)
    changed = {name for name in before if before[name][0] != after[name][0]}
    assert changed == {"config.json", "README.md"}
    for name in before:
        if name not in changed:
            assert after[name][1:] == before[name][1:], name  # same inode, same mtime: untouched
    assert json.loads((src / "config.json").read_text())["longctx_hf"]["method"] == "ntk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def add_git_cache_and_symlinked_folder(src, tmp_path):
    """What real checkpoint folders hold besides the model: a git clone, huggingface_hub's .cache, a linked folder."""
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (src / ".cache" / "huggingface").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "download.lock").write_text("")
    shared = tmp_path / "shared-tokenizer"
    shared.mkdir()
    (shared / "tokenizer.model").write_text("sentencepiece bytes")
    (shared / "consolidated.pth").write_bytes(b"weights")
    (src / "tokenizer-linked").symlink_to(shared, target_is_directory=True)
    return shared


def test_in_place_keeps_git_cache_and_symlinked_folders(tmp_path):
    src = make_source(tmp_path / "src")
    shared = add_git_cache_and_symlinked_folder(src, tmp_path)
    inode = src.stat().st_ino
    out = run("extend", str(src), "--method", "yarn", "--factor", "2", "--in-place")
    assert out.returncode == 0, out.stderr
    assert (src / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (src / ".cache" / "huggingface" / "download.lock").is_file()
    assert (src / "tokenizer-linked").is_symlink() and (src / "tokenizer-linked").resolve() == shared
    assert (shared / "tokenizer.model").read_text() == "sentencepiece bytes"
    assert src.stat().st_ino == inode  # the folder itself never moved
    assert json.loads((src / "config.json").read_text())["longctx_hf"]["method"] == "yarn"
    assert sorted(p.name for p in src.iterdir() if p.name.startswith(".")) == [".cache", ".git"]  # no temp file


def test_output_keeps_symlinked_folders_as_real_folders(tmp_path):
    src = make_source(tmp_path / "src")
    shared = add_git_cache_and_symlinked_folder(src, tmp_path)
    (shared / "loop").symlink_to(shared, target_is_directory=True)  # must not recurse forever
    dst = extend_checkpoint(src, tmp_path / "out", "ntk", 2)
    folder = dst / "tokenizer-linked"
    assert folder.is_dir() and not folder.is_symlink()
    assert (folder / "tokenizer.model").read_text() == "sentencepiece bytes"
    assert (folder / "tokenizer.model").stat().st_ino != (shared / "tokenizer.model").stat().st_ino  # copied
    assert (folder / "consolidated.pth").stat().st_ino == (shared / "consolidated.pth").stat().st_ino  # linked
    assert not (dst / ".git").exists() and not (dst / ".cache").exists()  # the source folder's, not the model's


def test_overwrite_replaces_only_a_complete_checkpoint(tmp_path):
    src = make_source(tmp_path / "src")
    dst = tmp_path / "out"
    extend_checkpoint(src, dst, "pi", 2)
    previous = snapshot(dst)
    # A dangling symlink (e.g. an interrupted download) makes the run fail after files were staged:
    (src / "broken.bin").symlink_to(tmp_path / "nowhere.bin")
    with pytest.raises(OSError):
        extend_checkpoint(src, dst, "yarn", 4, overwrite=True)
    assert snapshot(dst) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # staging folder removed
    (src / "broken.bin").unlink()
    extend_checkpoint(src, dst, "yarn", 4, overwrite=True)
    assert json.loads((dst / "config.json").read_text())["longctx_hf"]["method"] == "yarn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    """`--output models/ --overwrite` must not delete the other models in models/."""
    src = make_source(tmp_path / "src")
    models = tmp_path / "models"
    extend_checkpoint(src, models / "first", "pi", 2)
    (models / "notes.txt").write_text("mine")
    before = snapshot(models)
    out = run("extend", str(src), "--method", "yarn", "--factor", "4", "--output", str(models), "--overwrite")
    assert out.returncode == 2 and "only replaces a checkpoint folder" in out.stderr
    assert "first, notes.txt" in out.stderr
    assert snapshot(models) == before
    with pytest.raises(ValueError, match="must not contain src"):  # refused even with overwrite
        extend_checkpoint(src, tmp_path, "yarn", 4, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "src"]
    assert snapshot(models) == before


def test_in_place_with_copy_is_refused(tmp_path):
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    out = run("extend", str(src), "--method", "yarn", "--factor", "4", "--in-place", "--copy")
    assert out.returncode == 2 and "--copy" in out.stderr and "in_place" in out.stderr
    assert snapshot(src) == before


def test_model_card_parses_and_carries_license_base_model_and_evaluation(tmp_path):
    src = make_source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    (tmp_path / "eval").mkdir()
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    (tmp_path / "eval" / "ppl_vs_length.png").write_bytes(png)
    results = {"model": str(src), "pretrained_length": 256, "baseline": "unextended model, sliding window",
               "text": "Python stdlib sources", "plots": {"ppl_vs_length": "ppl_vs_length.png"},
               "runs": [{"method": "yarn", "factor": 4.0, "options": {},
                         "perplexity": [{"length": 1024, "ppl": 4.63, "baseline_ppl": 4.53, "tokens_scored": 768}],
                         "passkey": [{"length": 1024, "depth": 0.5, "trials": 3, "correct": 2, "accuracy": 0.667}]}]}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    dst = extend_checkpoint(src, tmp_path / "out", "yarn", 4, eval_results=tmp_path / "eval" / "results.json")
    card = ModelCard.load(dst / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {"longctx-hf", "yarn"} <= set(data["tags"])
    assert "256 (pretrained) → 1024 (extended)" in card.text and "factor: 4" in card.text
    assert '"rope_type": "yarn"' in card.text and "trust_remote_code" not in card.text
    assert "400 fine-tuning steps" in card.text
    assert "| yarn | 4.0 | 1024 | 4.63 | 4.53 | 768 |" in card.text and "| 2 / 3 |" in card.text
    assert "![ppl_vs_length](ppl_vs_length.png)" in card.text
    assert (dst / "ppl_vs_length.png").read_bytes() == png


def test_model_card_keeps_the_source_card_and_its_lineage(tmp_path):
    src = make_source(tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n"
                                   "base_model: meta-llama/Llama-3.1-8B\n---\n# Source\n\nIntended use: chat.\n")
    extend_checkpoint(src, None, "yarn", 2, in_place=True)
    extend_checkpoint(src, None, "ntk", 2, in_place=True)  # re-extension: the base card is carried, not nested
    card = ModelCard.load(src / "README.md")
    data = card.data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "llama3", "LICENSE")
    assert data["base_model"] == "meta-llama/Llama-3.1-8B" and "ntk" in data["tags"]
    assert card.text.count("## Base model card") == 1 and card.text.count("Intended use: chat.") == 1
    assert card.text.index("## Base model card") < card.text.index("Intended use: chat.")


def test_info_on_a_config_file_and_json(tmp_path):
    src = make_source(tmp_path / "src")
    extend_checkpoint(src, tmp_path / "out", "dynamic_ntk", 3)
    out = run("info", str(tmp_path / "out" / "config.json"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["method"], info["factor"], info["pretrained_length"]) == ("dynamic_ntk", 3.0, 256)


def test_extend_import_cost_stays_small():
    """The offline path must not pull torch/transformers (run() asserts that) nor huggingface_hub's card stack."""
    code = ("import sys; import longctx_hf.checkpoint, longctx_hf.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def as_transformers_4_config(folder, kind):
    """Rewrite a saved config.json the way transformers 4.x wrote it (top-level rope keys, torch_dtype)."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["torch_dtype"] = config.pop("dtype")
    if kind == "gpt_neox":
        config.update(rotary_emb_base=rope["rope_theta"], rotary_pct=rope["partial_rotary_factor"])
    else:
        config.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    (folder / "config.json").write_text(json.dumps(config))


def test_transformers_4_source_config_gives_the_same_model(tmp_path):
    """A 4.x-era config.json keeps its other keys offline, but the rope keys and the reloaded model are the same."""
    folders = []
    for kind, method in (("llama", "yarn"), ("gpt_neox", "ntk")):
        src = make_source(tmp_path / f"src-{kind}", kind)
        as_transformers_4_config(src, kind)
        offline = extend_checkpoint(src, tmp_path / f"{kind}-offline", method, 4)
        model = extend_context(AutoModelForCausalLM.from_pretrained(src).eval(), method, 4)
        model.save_pretrained(tmp_path / f"{kind}-in-memory")
        ours = json.loads((offline / "config.json").read_text())
        theirs = json.loads((tmp_path / f"{kind}-in-memory" / "config.json").read_text())
        for key in ("rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings", "longctx_hf"):
            assert ours.get(key) == theirs.get(key), (kind, key)
        if kind == "gpt_neox":  # what transformers 4.x's GPT-NeoX reads as the base
            assert ours["rotary_emb_base"] == ours["rope_theta"] != 10000.0
        ids = torch.randint(0, model.config.vocab_size, (1, 700))
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, offline / "expected.pt")
        folders.append(str(offline))
    results = reload_in_fresh_process(folders)
    assert all(results.values()), results


def test_eval_plots_must_be_uniquely_named_images_that_do_not_hide_src_files(tmp_path):
    src = make_source(tmp_path / "src")
    (src / "logo.png").write_bytes(b"the source's logo")
    evaluation = tmp_path / "eval"
    (evaluation / "a").mkdir(parents=True)
    for name in ("tokenizer.json", "ppl.png", "a/ppl.png", "logo.png"):
        (evaluation / name).write_bytes(b"plot")
    before = snapshot(src)
    for plots, message in (({"x": "tokenizer.json"}, "must be images"), ({"x": "ppl.png", "y": "a/ppl.png"}, "two plots"),
                           ({"x": "logo.png"}, "clash with files of src: logo.png")):
        (evaluation / "results.json").write_text(json.dumps({"runs": [], "plots": plots}))
        with pytest.raises(ValueError, match=message):
            extend_checkpoint(src, tmp_path / "out", "yarn", 2, eval_results=evaluation / "results.json")
    assert snapshot(src) == before and not (tmp_path / "out").exists()


def test_in_place_never_writes_into_a_linked_file(tmp_path):
    """Re-running in place with new plots replaces the plot file; it never writes into the old inode."""
    src = make_source(tmp_path / "src")
    results = {"runs": [], "plots": {"ppl_vs_length": "ppl_vs_length.png"}}
    for round_ in (1, 2):
        folder = tmp_path / f"eval{round_}"
        folder.mkdir()
        (folder / "ppl_vs_length.png").write_bytes(b"plot %d" % round_)
        (folder / "results.json").write_text(json.dumps(results))
        extend_checkpoint(src, None, "yarn", 2 * round_, in_place=True, eval_results=folder / "results.json")
        if round_ == 1:
            os.link(src / "ppl_vs_length.png", tmp_path / "kept.png")  # someone else's link to the first plot
    assert (src / "ppl_vs_length.png").read_bytes() == b"plot 2"
    assert (tmp_path / "kept.png").read_bytes() == b"plot 1"


@pytest.mark.real_model
def test_real_smollm2_offline_equals_in_memory(tmp_path):
    from longctx_hf.real_model import smollm2_path

    src = smollm2_path()
    out = run("extend", str(src), "--method", "yarn", "--factor", "2", "--output", str(tmp_path / "offline"))
    assert out.returncode == 0, out.stderr
    model = extend_context(AutoModelForCausalLM.from_pretrained(src).eval(), "yarn", 2)
    model.save_pretrained(tmp_path / "in-memory")
    # the rewriter (which never imports transformers) keeps the source's transformers_version, save_pretrained
    # stamps the running one: they differ when the cached conversion was made by another release
    source_version = json.loads((Path(src) / "config.json").read_text())["transformers_version"]
    in_memory = (tmp_path / "in-memory/config.json").read_text().replace(
        f'"transformers_version": "{transformers.__version__}"', f'"transformers_version": "{source_version}"')
    assert (tmp_path / "offline/config.json").read_text() == in_memory
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "offline" / name).read_bytes() == (Path(src) / name).read_bytes(), name
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "offline" / "expected.pt")
    assert reload_in_fresh_process([str(tmp_path / "offline")]) == {str(tmp_path / "offline"): True}


def test_model_card_for_a_method_that_ships_code():
    from longctx_hf import model_card

    config = {"model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 10000.0,
              "auto_map": {"AutoModelForCausalLM": "modeling_longctx.Model"}}
    card = ModelCard(model_card.render(config, remote_code=True, name="me/model"))
    assert 'from_pretrained("me/model", trust_remote_code=True)' in card.text
    assert '"auto_map"' in card.text and card.data.library_name == "transformers"


@pytest.mark.parametrize("method, options", [("dynamic_yarn", {"beta_fast": 64}),
                                             ("dynamic_longrope", {"attention_factor": 1.1})])
def test_offline_dynamic_yarn_writes_the_in_memory_files(tmp_path, method, options):
    """Methods that ship modeling code: the offline output has the in-memory path's config, auto_map and code file
    (their reload through trust_remote_code is tested on the in-memory save in test_dynamic_cache.py)."""
    source = make_source(tmp_path / "src")
    extend_checkpoint(source, tmp_path / "offline", method, 4, **options)
    model = extend_context(AutoModelForCausalLM.from_pretrained(source), method, 4, **options)
    model.save_pretrained(tmp_path / "memory")
    for name in ("config.json", "longctx_dynamic_rope.py"):
        assert (tmp_path / "offline" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
    config = json.loads((tmp_path / "offline" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("longctx_dynamic_rope.")
    assert "trust_remote_code=True" in (tmp_path / "offline" / "README.md").read_text()


def test_cli_alibi_then_yarn_leaves_no_orphan_modeling_file(tmp_path):
    """`extend --method alibi` needs neither --factor nor --target-length; re-extending that output with a RoPE
    method is refused (ALiBi has no rotary), and a dynamic_yarn output re-extended with yarn drops its code file."""
    source = make_source(tmp_path / "src")
    out = run("extend", str(source), "--method", "alibi", "--max-length", "1024", "--output", str(tmp_path / "alibi"))
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "alibi" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and (tmp_path / "alibi" / "alibi_modeling.py").is_file()
    out = run("extend", str(tmp_path / "alibi"), "--method", "yarn", "--factor", "2", "--output", str(tmp_path / "x"))
    assert out.returncode == 2 and "ALiBi" in out.stderr and not (tmp_path / "x").exists()

    extend_checkpoint(source, tmp_path / "dyn", "dynamic_yarn", 4)
    extend_checkpoint(tmp_path / "dyn", tmp_path / "yarn", "yarn", 2)
    assert (tmp_path / "dyn" / "longctx_dynamic_rope.py").is_file()
    assert not (tmp_path / "yarn" / "longctx_dynamic_rope.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "yarn" / "config.json").read_text())


def test_the_offline_model_card_names_what_to_load(tmp_path):
    src = make_source(tmp_path / "src")
    dst = extend_checkpoint(src, tmp_path / "out", "yarn", 4)
    card = (dst / "README.md").read_text()
    assert f'from_pretrained("{dst}")' in card and "path/or/repo-id" not in card
    pushed = extend_checkpoint(src, tmp_path / "out2", "yarn", 4, card_name="me/tiny-yarn")
    assert 'from_pretrained("me/tiny-yarn")' in (pushed / "README.md").read_text()


def test_info_shows_the_effective_rope_theta(tmp_path):
    src = make_source(tmp_path / "src")
    ntk = extend_checkpoint(src, tmp_path / "ntk", "ntk", 2)
    theta = json.loads((ntk / "config.json").read_text())["rope_theta"]
    out = run("info", str(ntk))
    assert out.returncode == 0, out.stderr
    assert f"rope_theta:          {theta}" in out.stdout and theta != 10000.0
    assert "pretrained rope_theta: 10000.0" in out.stdout