"""`longctx-hf finetune`: packing, the accelerate loop, resume, LoRA merge, two CPU processes, plain reload."""
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fresh_process import run_json
from models import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from longctx_hf import _compat
from longctx_hf.data import IGNORE_INDEX, pack
from longctx_hf.train import check_options, finetune

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(json.__file__).parents[1]  # Python's own sources: fixed text that is always there
TEXT = STDLIB / "json" / "decoder.py"

# In a fresh process that never imports longctx_hf: the checkpoint loads plainly and gives the expected logits.
RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = torch.load(folder + "/../expected.pt")
    with torch.no_grad():
        same = torch.equal(model(expected["ids"]).logits, expected["logits"])
    print(json.dumps({"same": same, "rope": model.config.rope_parameters}))
""")


def reload_in_fresh_process(folder, model):
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(ids).logits
    torch.save({"ids": ids, "logits": logits}, Path(folder).parent / "expected.pt")
    return run_json(RELOAD, folder, cwd=Path(folder).parent)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaMA with a small byte-level BPE tokenizer trained on a stdlib file, saved like a Hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_model("llama", vocab_size=len(fast), eos_token_id=fast.eos_token_id)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def options(tiny_checkpoint, output, **overrides):
    return {"model": str(tiny_checkpoint), "method": "yarn", "factor": 2, "data": str(TEXT), "max_length": 64,
            "steps": 6, "learning_rate": 2e-3, "output_dir": str(output), "progress_bar": False, **overrides}


def test_pack_positions_and_labels():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_token_id=0, max_length=6)
    # stream: 1 2 3 0 | 4 5 0 | 6 7 8 9 0  -> two blocks of 6, the 0 tail token dropped
    assert blocks["input_ids"].tolist() == [[1, 2, 3, 0, 4, 5], [0, 6, 7, 8, 9, 0]]
    assert blocks["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]
    # a document's first token is not predicted from the previous document (a block's first label is never a
    # target anyway: the causal-LM loss predicts labels[1:] from logits[:-1])
    assert blocks["labels"].tolist() == [[IGNORE_INDEX, 2, 3, 0, IGNORE_INDEX, 5], [0, IGNORE_INDEX, 7, 8, 9, 0]]
    plain = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_token_id=0, max_length=6, separate_documents=False)
    assert plain["position_ids"].tolist() == [list(range(6))] * 2
    assert torch.equal(plain["labels"], plain["input_ids"])
    with pytest.raises(ValueError, match="fewer than max_length=64"):
        pack([[1, 2, 3]], eos_token_id=0, max_length=64)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(attn):
    """Restarting position ids is what keeps documents apart in transformers: packed logits = each one alone."""
    model = tiny_model("llama", attn_implementation=attn)
    first, second = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 12))
    blocks = pack([first[0].tolist(), second[0].tolist()], eos_token_id=5, max_length=34)
    with torch.no_grad():
        # use_cache=False as in training: transformers reads packing from position ids only without a cache
        packed = model(blocks["input_ids"], position_ids=blocks["position_ids"], use_cache=False).logits[0]
        alone = [model(torch.cat([doc, torch.tensor([[5]])], 1)).logits[0] for doc in (first, second)]
        concatenated = model(blocks["input_ids"]).logits[0]
    torch.testing.assert_close(packed[:21], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[21:], alone[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(concatenated[21:], alone[1], atol=1e-3)  # without restarts they do mix


@pytest.mark.parametrize("bad, message", [
    ({"max_length": 0}, "max_length must be >= 2"),
    ({"steps": 2.5}, "steps must be an int"),
    ({"factor": None}, "exactly one of factor"),
    ({"method": "alibi", "factor": None}, "'alibi' is not supported by finetune"),
    ({"method": "self_extend"}, "'self_extend' is training-free"),
    ({"target_length": 1024}, "exactly one of factor"),
    ({"learning_rate": 0}, "learning_rate must be a finite number > 0"),
    ({"warmup_steps": 7}, "warmup_steps must be <= steps"),
    ({"attn_implementation": "flash"}, "attn_implementation must be one of"),
    ({"attn_implementation": "flash_attention_2"}, "needs the package `flash-attn`"),
    ({"lora_train_embeddings_and_norms": True}, "needs lora=True"),
    ({"lora": "yes"}, "lora must be True or False"),
    ({"data": "no/such/file.txt"}, "data: no such file or folder"),
    ({"data": "owner/some-dataset"}, "optional package `datasets`"),
    ({"mixed_precision": "fp32"}, "mixed_precision must be one of"),
    ({"lr_scheduler": "poly"}, "lr_scheduler must be one of"),
    ({"resume_from": "."}, "not a checkpoint folder"),
    ({"max_lenght": 64}, "finetune takes .*max_length"),
])
def test_bad_options_are_refused_before_loading(tmp_path, bad, message):
    # The model path does not exist: these errors come before anything is read from it.
    if "datasets" in message and importlib.util.find_spec("datasets"):
        pytest.skip("datasets is installed here")
    with pytest.raises((ValueError, TypeError), match=message):
        check_options(**options("/nonexistent/model", tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()


def test_bad_extension_and_output_are_refused_before_loading(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="factor must be > 1"):
        check_options(**options(tiny_checkpoint, tmp_path / "out", factor=0.5))
    with pytest.raises(ValueError, match="max_length 1024 exceeds the extended context 512"):
        check_options(**options(tiny_checkpoint, tmp_path / "out", max_length=1024))
    with pytest.raises(ValueError, match="unknown option.*beta_fats"):
        check_options(**options(tiny_checkpoint, tmp_path / "out", method_options={"beta_fats": 64}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty"):
        check_options(**options(tiny_checkpoint, tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_finetune_resume_and_plain_reload(tiny_checkpoint, tmp_path):
    full = finetune(**options(tiny_checkpoint, tmp_path / "full", save_steps=3))
    state = json.loads((tmp_path / "full" / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and state["global_step"] == state["max_steps"] == 6
    assert set(steps[0]) >= {"loss", "learning_rate", "step", "epoch", "grad_norm"}
    assert "train_runtime" in state["log_history"][-1]
    # warmup min(20, 6 // 10) = 0, then linear decay: the lr of step k is 2e-3 * (6 - (k - 1)) / 6
    assert [e["learning_rate"] for e in steps] == pytest.approx([2e-3 * (7 - k) / 6 for k in range(1, 7)])
    assert sorted(os.listdir(tmp_path / "full" / "checkpoint-3")) == [
        "custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "processes.json", "random_states_0.pkl",
        "trainer_state.json"]

    # Resuming from step 3 continues the count and reproduces the uninterrupted run exactly.
    resumed = finetune(**options(tiny_checkpoint, tmp_path / "resumed",
                                 resume_from=str(tmp_path / "full" / "checkpoint-3")))
    assert [(e["step"], e["loss"]) for e in resumed.log_history if "loss" in e] == [
        (e["step"], e["loss"]) for e in steps]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(tiny_checkpoint / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])

    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 512
    assert config["use_cache"] is True  # training switched it off; the saved model is for inference
    reloaded = reload_in_fresh_process(tmp_path / "full", full.model)
    assert reloaded["same"] and reloaded["rope"]["factor"] == 2.0


def test_gradient_checkpointing_trains_the_same(tiny_checkpoint, tmp_path):
    plain = finetune(**options(tiny_checkpoint, tmp_path / "plain", steps=3))
    checkpointed = finetune(**options(tiny_checkpoint, tmp_path / "ckpt", steps=3, gradient_checkpointing=True))
    losses = [[e["loss"] for e in r.log_history if "loss" in e] for r in (plain, checkpointed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not _compat.activation_checkpointing_enabled(checkpointed.model)  # switched off in the returned model


def test_lora_with_embeddings_and_norms_merges_into_plain_weights(tiny_checkpoint, tmp_path):
    result = finetune(**options(tiny_checkpoint, tmp_path / "lora", lora=True, lora_rank=4,
                                lora_train_embeddings_and_norms=True, learning_rate=1e-2, steps=3,
                                gradient_checkpointing=True))
    assert sorted(os.listdir(tmp_path / "lora")) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "trainer_state.json"]  # no adapter files: LoRA is merged
    merged, base = load_file(tmp_path / "lora" / "model.safetensors"), load_file(tiny_checkpoint / "model.safetensors")
    assert merged.keys() == base.keys()  # plain names, no base_layer / lora_A
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert not torch.equal(merged[name], base[name]), name
    assert reload_in_fresh_process(tmp_path / "lora", result.model)["same"]


def test_lora_alone_keeps_embeddings_and_norms(tiny_checkpoint, tmp_path):
    finetune(**options(tiny_checkpoint, tmp_path / "lora", lora=True, lora_rank=4, learning_rate=1e-2, steps=2))
    merged, base = load_file(tmp_path / "lora" / "model.safetensors"), load_file(tiny_checkpoint / "model.safetensors")
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.v_proj.weight"],
                           base["model.layers.0.self_attn.v_proj.weight"])


def free_port():
    """A free port for the process group: other jobs on this machine may hold a fixed one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_cpu_processes(config, tiny_checkpoint, output, *finetune_args, use_cpu=True):
    """A real `accelerate launch` of two gloo processes through the CLI module entry point (`use_cpu=False` for
    DeepSpeed, which ACCELERATE_USE_CPU would turn off)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **({"ACCELERATE_USE_CPU": "true"} if use_cpu else {}))
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "configs" / config), "--num_processes", "2", "--main_process_port", str(port),
               "-m", "longctx_hf.cli", "finetune", str(tiny_checkpoint), "--method", "yarn", "--factor", "2",
               "--data", str(STDLIB / "json"), "--max-length", "64", "--learning-rate", "1e-3",
               "--output", str(output), *finetune_args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def logged(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


def test_two_cpu_processes_write_one_checkpoint(tiny_checkpoint, tmp_path):
    output = tmp_path / "ddp"
    out = launch_two_cpu_processes("cpu_2proc.yaml", tiny_checkpoint, output, "--steps", "4", "--save-steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("saved ") == 1, out.stdout  # printed by the main process only
    assert "(processes: MULTI_CPU)" in out.stdout
    # both ranks took part in the checkpoint (one RNG state each); the result is one checkpoint
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(output / "checkpoint-2"))
    assert sorted(p for p in os.listdir(output) if not p.startswith("checkpoint-")) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "trainer_state.json"]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in logged(output)] == [1, 2, 3, 4]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.fixture(scope="module")
def tied_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with its input embeddings tied to the LM head, as SmolLM2's are."""
    folder = tmp_path_factory.mktemp("tied") / "model"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    model = tiny_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fsdp2_on_two_cpu_processes_trains_as_one_process(tied_checkpoint, tmp_path):
    """configs/fsdp_cpu.yaml: FSDP2 over gloo gives one process's losses and weights (the same four blocks per step:
    two accumulated micro-batches on each of two ranks there, four here), checkpoints, resumes exactly, and saves a
    plain model that keeps its tied weights tied."""
    single = finetune(**options(tied_checkpoint, tmp_path / "single", data=str(STDLIB / "json"), steps=4,
                                grad_accum=4, learning_rate=1e-3))
    sharded = tmp_path / "fsdp"
    out = launch_two_cpu_processes("fsdp_cpu.yaml", tied_checkpoint, sharded, "--steps", "4", "--grad-accum", "2",
                                   "--save-steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("saved ") == 1 and "(processes: FSDP2_CPU)" in out.stdout, out.stdout

    expected = [e for e in single.log_history if "loss" in e]
    assert [e["step"] for e in logged(sharded)] == [1, 2, 3, 4]
    assert [e["loss"] for e in logged(sharded)] == pytest.approx([e["loss"] for e in expected], rel=1e-6)
    assert [e["grad_norm"] for e in logged(sharded)] == pytest.approx([e["grad_norm"] for e in expected], rel=1e-5)
    trained, base = load_file(sharded / "model.safetensors"), load_file(tied_checkpoint / "model.safetensors")
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    assert "lm_head.weight" not in trained  # written once, as the tie
    assert trained.keys() == single_weights.keys() == base.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], single_weights[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(trained["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])

    # The training checkpoint holds the gathered (full-shape) model and optimizer state, taken by every rank.
    checkpoint = sharded / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= set(os.listdir(checkpoint))
    assert json.loads((checkpoint / "processes.json").read_text()) == {
        "distributed": "FSDP2_CPU", "sequence_parallel": 1, "data_parallel": 2}
    gathered = [torch.load(path, weights_only=False) for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl"))]
    state = next(s for s in gathered if set(s) == {"model", "optimizer"})
    assert {k: tuple(v.shape) for k, v in state["model"].items() if k != "lm_head.weight"} == {
        k: tuple(v.shape) for k, v in base.items()}
    moments = state["optimizer"]["state"]["model.layers.0.self_attn.q_proj.weight"]["exp_avg"]
    assert tuple(moments.shape) == tuple(base["model.layers.0.self_attn.q_proj.weight"].shape)

    resumed = tmp_path / "resumed"
    out = launch_two_cpu_processes("fsdp_cpu.yaml", tied_checkpoint, resumed, "--steps", "4", "--grad-accum", "2",
                                   "--resume-from", str(checkpoint))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [(e["step"], e["loss"]) for e in logged(resumed)] == [(e["step"], e["loss"]) for e in logged(sharded)]
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(again[name], trained[name]) for name in trained)
    # Its gathered state is not what a one-process run reads back: refused before anything is loaded.
    with pytest.raises(ValueError, match="written by a run with processes FSDP2_CPU; this run's are NO"):
        finetune(**options(tied_checkpoint, tmp_path / "other", data=str(STDLIB / "json"), steps=4, grad_accum=4,
                           resume_from=str(checkpoint)))

    reloaded = run_json(RELOAD_LOGITS, sharded, cwd=tmp_path)
    ids = torch.tensor(reloaded["ids"])
    with torch.no_grad():
        expected_logits = single.model.eval()(ids).logits
    assert reloaded["rope"]["rope_type"] == "yarn" and reloaded["tied"]
    torch.testing.assert_close(torch.tensor(reloaded["logits"]), expected_logits, rtol=1e-4, atol=1e-5)


# In a fresh process without longctx_hf: the folder's logits on fixed ids (compared with a tolerance by the caller).
RELOAD_LOGITS = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    print(json.dumps({"ids": ids.tolist(), "logits": logits.tolist(), "rope": model.config.rope_parameters,
                      "tied": tied}))
""")


def test_processes_never_train_alone(tiny_checkpoint, tmp_path):
    """Two processes started by plain torchrun, without ACCELERATE_USE_CPU. accelerate 1.7 makes them one DDP job
    over gloo; accelerate 1.15 runs each alone, and each would train on all the data and write the same folder. That
    is refused before anything is written. Either way there are never two independent runs."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    output = tmp_path / "out"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "longctx_hf.cli", "finetune", str(tiny_checkpoint), "--method", "yarn",
                          "--factor", "2", "--data", str(STDLIB / "json"), "--max-length", "64", "--steps", "2",
                          "--output", str(output)], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode == 0:
        assert out.stdout.count("saved ") == 1 and "(processes: MULTI_CPU)" in out.stdout, out.stdout
    else:
        assert "launched as 2 processes, but accelerate runs them as 1 (NO)" in out.stderr, out.stderr[-3000:]
        assert not output.exists()


@pytest.mark.parametrize("environ, message", [
    ({"FSDP_VERSION": "1"}, "runs torch's FSDP2 .* only; .* fsdp_version 1"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true has nothing to offload"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "pass --gradient-checkpointing"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy 'SIZE_BASED_WRAP' is not supported"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"}, "fsdp_reshard_after_forward must be true or false"),
    ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, "fsdp_state_dict_type 'SHARDED_STATE_DICT'"),
    ({"FSDP_IGNORED_MODULES": "lm_head"}, "fsdp_ignored_modules is not supported"),
])
def test_fsdp_settings_cpu_processes_cannot_honour_are_refused(environ, message):
    from longctx_hf.sharding import cpu_sharding_settings

    launcher = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", **environ}
    with pytest.raises(ValueError, match=message):
        cpu_sharding_settings("MULTI_CPU", "no", launcher)
    assert cpu_sharding_settings("FSDP", "no", launcher) is None  # on GPUs accelerate shards by itself


def test_fsdp_settings_on_cpu_processes():
    from longctx_hf.sharding import cpu_sharding_settings

    launcher = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    with pytest.raises(ValueError, match="trains in float32 only; mixed precision is 'bf16'"):
        cpu_sharding_settings("MULTI_CPU", "bf16", launcher)
    assert cpu_sharding_settings("MULTI_CPU", "no", {**launcher, "ACCELERATE_USE_FSDP": "false"}) is None
    assert cpu_sharding_settings("MULTI_CPU", "no", launcher).wrap_policy == "NO_WRAP"  # accelerate's default
    settings = cpu_sharding_settings("MULTI_CPU", "no", {**launcher, "FSDP_RESHARD_AFTER_FORWARD": "false",
                                                         "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                                                         "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"})
    assert settings.reshard_after_forward is False and settings.wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert settings.layer_classes == ("LlamaDecoderLayer",)


@pytest.mark.real_model
def test_smollm2_loss_decreases_and_reloads_plainly(tmp_path):
    from longctx_hf.real_model import smollm2_path

    # ~4 blocks of 512 tokens of a fixed stdlib file: 12 steps see each block three times.
    text = tmp_path / "text.txt"
    text.write_text((STDLIB / "textwrap.py").read_text()[:7000])
    result = finetune(smollm2_path(), method="yarn", factor=2, data=str(text), max_length=512, steps=12,
                      learning_rate=1e-4, warmup_steps=2, output_dir=str(tmp_path / "out"), progress_bar=False)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"SmolLM2 losses over 12 steps: {losses}; first 3 mean {first:.4f}, last 3 mean {last:.4f}")
    assert last < first - 0.3, losses
    reloaded = reload_in_fresh_process(tmp_path / "out", result.model)
    assert reloaded["same"]
    assert reloaded["rope"]["rope_type"] == "yarn" and reloaded["rope"]["original_max_position_embeddings"] == 8192


def test_resume_into_the_checkpoints_own_folder(tiny_checkpoint, tmp_path):
    from transformers import TrainerState

    for step in (3, 6):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
        TrainerState(global_step=step).save_to_json(str(tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json"))
    resume = str(tmp_path / "out" / "checkpoint-3")
    with pytest.raises(ValueError, match=r"holds checkpoints after step 3: \['checkpoint-6'\]"):
        check_options(**options(tiny_checkpoint, tmp_path / "out", steps=8, resume_from=resume))
    with pytest.raises(ValueError, match="resume_from is at step 6; steps must exceed it"):
        check_options(**options(tiny_checkpoint, tmp_path / "out", steps=6, resume_from=str(tmp_path / "out" / "checkpoint-6")))
    shutil.rmtree(tmp_path / "out" / "checkpoint-6")
    assert check_options(**options(tiny_checkpoint, tmp_path / "out", steps=8, resume_from=resume)).steps == 8


def test_dynamic_yarn_trains_past_the_pretrained_length_and_ships_its_code(tiny_checkpoint, tmp_path):
    """The cache-exact runtime trains (blocks longer than the tiny model's 256 pretrained tokens) and the saved
    checkpoint carries its modeling code, reloading to the trained model's logits."""
    from longctx_hf import from_pretrained

    result = finetune(**options(tiny_checkpoint, tmp_path / "out", method="dynamic_yarn", max_length=320, steps=2))
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # ran, no NaN
    out = tmp_path / "out"
    assert (out / "longctx_dynamic_rope.py").is_file()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
        "longctx_dynamic_rope.")
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        reloaded = from_pretrained(str(out)).eval()(ids).logits
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)


def test_deepspeed_ulysses_on_two_cpu_processes_trains_as_one_process(tied_checkpoint, tmp_path):
    """configs/deepspeed_ulysses_cpu.yaml: ZeRO-3 with every sequence split over two processes (DeepSpeed Ulysses)
    gives one process's losses, gradient norms and weights on the same sequences (with gradient checkpointing too),
    resumes exactly from a checkpoint taken half-way through a group of shards, and saves a plain model that keeps
    its tied weights tied."""
    pytest.importorskip("deepspeed")
    single = finetune(**options(tied_checkpoint, tmp_path / "single", data=str(STDLIB / "json"), steps=4,
                                learning_rate=1e-3, separate_documents=False))
    split = tmp_path / "ulysses"
    arguments = ("--steps", "4", "--no-separate-documents")
    out = launch_two_cpu_processes("deepspeed_ulysses_cpu.yaml", tied_checkpoint, split, *arguments,
                                   "--save-steps", "3", use_cpu=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("saved ") == 1 and "(processes: DEEPSPEED)" in out.stdout, out.stdout

    expected = [e for e in single.log_history if "loss" in e]
    assert [e["step"] for e in logged(split)] == [1, 2, 3, 4]
    assert [e["loss"] for e in logged(split)] == pytest.approx([e["loss"] for e in expected], rel=1e-6)
    assert [e["grad_norm"] for e in logged(split)] == pytest.approx([e["grad_norm"] for e in expected], rel=1e-5)
    state = json.loads((split / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == 4 * 64  # one sequence per step, not one per process
    trained, base = load_file(split / "model.safetensors"), load_file(tied_checkpoint / "model.safetensors")
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    assert trained.keys() == single_weights.keys() == base.keys() and "lm_head.weight" not in trained
    for name in trained:
        torch.testing.assert_close(trained[name], single_weights[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(trained["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])

    # checkpoint-3 is three sequences in: one whole group of two shards and one shard of the next are skipped
    checkpoint = split / "checkpoint-3"
    assert json.loads((checkpoint / "processes.json").read_text()) == {
        "distributed": "DEEPSPEED", "sequence_parallel": 2, "data_parallel": 1}
    resumed = tmp_path / "resumed"
    out = launch_two_cpu_processes("deepspeed_ulysses_cpu.yaml", tied_checkpoint, resumed, *arguments,
                                   "--resume-from", str(checkpoint), use_cpu=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [(e["step"], e["loss"]) for e in logged(resumed)] == [(e["step"], e["loss"]) for e in logged(split)]
    again = load_file(resumed / "model.safetensors")
    for name in trained:
        torch.testing.assert_close(again[name], trained[name], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="written by a run with processes DEEPSPEED; this run's are NO"):
        finetune(**options(tied_checkpoint, tmp_path / "other", data=str(STDLIB / "json"), steps=4,
                           separate_documents=False, resume_from=str(checkpoint)))

    # transformers' gradient checkpointing re-runs the forward, all-to-all included: the same training
    recomputed = tmp_path / "checkpointed"
    out = launch_two_cpu_processes("deepspeed_ulysses_cpu.yaml", tied_checkpoint, recomputed, *arguments,
                                   "--gradient-checkpointing", use_cpu=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [e["loss"] for e in logged(recomputed)] == pytest.approx([e["loss"] for e in expected], rel=1e-6)
    checkpointed = load_file(recomputed / "model.safetensors")
    for name in trained:
        torch.testing.assert_close(checkpointed[name], single_weights[name], rtol=1e-5, atol=1e-6)

    reloaded = run_json(RELOAD_LOGITS, split, cwd=tmp_path)
    with torch.no_grad():
        expected_logits = single.model.eval()(torch.tensor(reloaded["ids"])).logits
    assert reloaded["rope"]["rope_type"] == "yarn" and reloaded["tied"]
    torch.testing.assert_close(torch.tensor(reloaded["logits"]), expected_logits, rtol=1e-4, atol=1e-5)


def test_deepspeed_zero3_on_two_cpu_processes_trains_as_one_process(tied_checkpoint, tmp_path):
    """The ZeRO-3 settings of configs/deepspeed_zero3.yaml (GPU) on two CPU processes, data parallel: DeepSpeed
    accumulates, clips and gathers the weights for the final save; one step is four blocks, two accumulated on each
    process, as one process accumulating the same four blocks."""
    pytest.importorskip("deepspeed")
    import yaml

    launch = yaml.safe_load((REPO / "configs" / "deepspeed_ulysses_cpu.yaml").read_text())
    del launch["parallelism_config"]
    launch["deepspeed_config"]["gradient_accumulation_steps"] = 2
    config = tmp_path / "zero3_cpu.yaml"
    config.write_text(yaml.safe_dump(launch))
    single = finetune(**options(tied_checkpoint, tmp_path / "single", data=str(STDLIB / "json"), steps=3,
                                grad_accum=4, learning_rate=1e-3))
    out = launch_two_cpu_processes(config, tied_checkpoint, tmp_path / "zero3", "--steps", "3", "--grad-accum", "2",
                                   use_cpu=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("saved ") == 1 and "(processes: DEEPSPEED)" in out.stdout, out.stdout
    expected = [e for e in single.log_history if "loss" in e]
    assert [e["loss"] for e in logged(tmp_path / "zero3")] == pytest.approx([e["loss"] for e in expected], rel=1e-6)
    assert [e["grad_norm"] for e in logged(tmp_path / "zero3")] == pytest.approx(
        [e["grad_norm"] for e in expected], rel=1e-5)
    trained, single_weights = load_file(tmp_path / "zero3" / "model.safetensors"), load_file(
        tmp_path / "single" / "model.safetensors")
    assert trained.keys() == single_weights.keys() and "lm_head.weight" not in trained
    for name in trained:
        torch.testing.assert_close(trained[name], single_weights[name], rtol=1e-5, atol=1e-6)


ULYSSES = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2",
           "PARALLELISM_CONFIG_SP_SIZE": "2", "PARALLELISM_CONFIG_CP_SIZE": "1", "PARALLELISM_CONFIG_DP_SHARD_SIZE": "1",
           "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION": "sdpa"}


@pytest.mark.parametrize("environ, message", [
    ({**ULYSSES, "PARALLELISM_CONFIG_SP_SIZE": "1", "PARALLELISM_CONFIG_CP_SIZE": "4"},
     r"parallelism_config_cp_size 4: context parallelism \(torch\) is not supported"),
    ({**ULYSSES, "ACCELERATE_USE_DEEPSPEED": "false"}, "sequence parallelism runs on DeepSpeed"),
    ({**ULYSSES, "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION": "eager"}, "'eager': finetune supports sdpa"),
    ({k: v for k, v in ULYSSES.items() if k != "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION"}, "'unset': finetune"),
    ({**ULYSSES, "WORLD_SIZE": "4"}, "must equal the 4 processes launched: set parallelism_config_dp_shard_size to 2"),
    ({**ULYSSES, "PARALLELISM_CONFIG_TP_SIZE": "2"}, "parallelism_config_tp_size 2: tensor parallelism"),
])
def test_launches_sequence_parallelism_cannot_run_exactly_are_refused(environ, message):
    from longctx_hf.sequence_parallel import sequence_parallel_settings

    with pytest.raises(ValueError, match=message):
        sequence_parallel_settings(environ)


def test_sequence_parallel_options_are_checked(tmp_path):
    """Before anything is loaded: packed documents or a sliding window under sdpa (which gets no mask there),
    sequences or heads that do not split evenly, another attention than the launch's, attention runtimes."""
    from dataclasses import replace

    from transformers import AutoConfig

    from longctx_hf.sequence_parallel import SequenceParallelSettings, check_options, sequence_parallel_settings
    from longctx_hf.train import FinetuneOptions

    assert sequence_parallel_settings({**ULYSSES, "PARALLELISM_CONFIG_SP_SIZE": "1"}) is None  # data parallel only
    assert sequence_parallel_settings({}) is None
    sdpa = SequenceParallelSettings(size=2, attention="sdpa")
    opts = FinetuneOptions(model="unused", method="yarn", output_dir=str(tmp_path), data=str(TEXT), max_length=64,
                           steps=1, factor=2, separate_documents=False)
    llama = AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2)
    check_options(sdpa, opts, llama)
    check_options(sdpa, replace(opts, attn_implementation="sdpa"), llama)
    for bad, config, message in [
        (replace(opts, separate_documents=True), llama, "separate_documents=True needs an attention that reads"),
        (replace(opts, max_length=63), llama, "max_length 63 must be a multiple of parallelism_config_sp_size 2"),
        (replace(opts, attn_implementation="eager"), llama, "'eager': under sequence parallelism the attention is"),
        (replace(opts, method="dynamic_yarn"), llama, "method 'dynamic_yarn' runs its own attention runtime"),
        (opts, AutoConfig.for_model("mistral", sliding_window=32), r"mistral attends within a sliding window \(32\)"),
        (opts, AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=3), "divide the 4 attention"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_options(sdpa, bad, config)
    check_options(sdpa, opts, AutoConfig.for_model("mistral", sliding_window=64))  # the window covers max_length
    check_options(sdpa, opts, AutoConfig.for_model("qwen2", sliding_window=32, use_sliding_window=False))
    flash = SequenceParallelSettings(size=2, attention="flash_attention_2")
    check_options(flash, replace(opts, separate_documents=True), AutoConfig.for_model("mistral", sliding_window=32))


def test_deepspeed_gradient_reduction_over_the_sequence_group():
    """ZeRO-3 before deepspeed 0.20.2 averages gradients over the group (each share is scaled by its size), other
    stages sum them; the one mixed case is refused."""
    pytest.importorskip("deepspeed")
    from packaging.version import Version

    from longctx_hf.sequence_parallel import SequenceParallelSettings, gradient_scale

    settings = SequenceParallelSettings(size=2, attention="sdpa")
    averaging = Version(importlib.metadata.version("deepspeed")) < Version("0.20.2")
    assert gradient_scale(settings, {"stage": 3}) == (2.0 if averaging else 1.0)
    assert gradient_scale(settings, {"stage": 2, "reduce_scatter": False}) == 1.0
    if averaging:
        with pytest.raises(ValueError, match="reduce_scatter: false and contiguous_gradients: true"):
            gradient_scale(settings, {"stage": 3, "reduce_scatter": False})


def test_deepspeed_config_agrees_with_the_options():
    """DeepSpeed accumulates, clips, and with config sections of its own builds the optimizer, the schedule and the
    mixed precision: a config that disagrees with finetune's options is refused, 'auto' (or unset) takes the
    option's value."""
    from longctx_hf.deepspeed_launch import settle_deepspeed_config

    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, **zero3}
    settle_deepspeed_config(config, 1, 2, 0.5, None, "no")
    assert config == {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
                      **zero3}
    for config, options, message in [
        ({"gradient_accumulation_steps": 1}, (1, 4, 1.0, None, "no"), "gradient_accumulation_steps is 1, but .* 4"),
        ({"gradient_clipping": 1.0}, (1, 1, 0, None, "no"), "gradient_clipping is 1.0, but finetune's option is 0"),
        ({"scheduler": {"type": "WarmupLR"}}, (1, 1, 1.0, None, "no"), "config's 'scheduler' section"),
        ({"optimizer": {"type": "AdamW"}}, (1, 1, 1.0, None, "no"), "config's 'optimizer' section"),
        ({}, (1, 1, 1.0, "no", "bf16"), "mixed_precision 'no', but the DeepSpeed config trains in 'bf16'"),
        ({"zero_optimization": {"stage": 3}}, (1, 1, 1.0, None, "no"), "ZeRO-3 without zero3_save_16bit_model"),
    ]:
        with pytest.raises(ValueError, match=message):
            settle_deepspeed_config(config, *options)
    # DeepSpeed's other names for the gathering save are accepted
    settle_deepspeed_config({"zero_optimization": {"stage": 3, "gather_16bit_weights_on_model_save": True}},
                            1, 1, 1.0, None, "no")


def test_cli_passes_clipping_and_weight_decay(tiny_checkpoint, tmp_path, capsys):
    """--max-grad-norm and --weight-decay reach finetune's options (checked there before anything loads); with
    --max-grad-norm 0 nothing is clipped and no gradient norm is logged."""
    from longctx_hf.cli import main

    common = ["finetune", str(tiny_checkpoint), "--method", "yarn", "--factor", "2", "--data", str(TEXT),
              "--max-length", "64", "--steps", "2", "--output", str(tmp_path / "out")]
    assert main([*common, "--max-grad-norm", "-1"]) == 2
    assert "max_grad_norm must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert main([*common, "--weight-decay", "-0.5"]) == 2
    assert "weight_decay must be a finite number >= 0, got -0.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*common, "--max-grad-norm", "0", "--weight-decay", "0.1"]) == 0
    assert [e["step"] for e in logged(tmp_path / "out")] == [1, 2]
    assert all("grad_norm" not in e for e in logged(tmp_path / "out"))


def test_resume_needs_the_same_split_of_the_work(tmp_path):
    """A step's batches depend on how many processes share them and how sequences are split: a checkpoint resumes
    only under the same layout (a checkpoint that did not record the process count is still read)."""
    from longctx_hf.train import _check_resume_layout

    def written(**layout):
        folder = tmp_path / "-".join(f"{k}{v}" for k, v in layout.items())
        folder.mkdir()
        (folder / "processes.json").write_text(json.dumps(layout))
        return folder

    ddp = {"distributed": "MULTI_CPU", "sequence_parallel": 1, "data_parallel": 2}
    _check_resume_layout(written(**ddp), ddp)
    _check_resume_layout(written(distributed="MULTI_CPU"), {**ddp, "data_parallel": 4})
    with pytest.raises(ValueError, match="took sequences from 2 processes .* this run's take them from 4"):
        _check_resume_layout(written(**{**ddp, "distributed": "NO"}), {**ddp, "data_parallel": 4})
    ulysses = {"distributed": "DEEPSPEED", "sequence_parallel": 2, "data_parallel": 1}
    with pytest.raises(ValueError, match="split every sequence over 2 processes; this run splits them over 1"):
        _check_resume_layout(written(**ulysses), {**ulysses, "sequence_parallel": 1, "data_parallel": 2})
