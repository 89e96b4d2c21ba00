"""Evaluation: sliced perplexity against the model's own loss, the sliding-window baseline against a hand loop,
the passkey grid, evaluate_model's results.json / plots, and the `eval` CLI in a real subprocess."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from models import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from longctx_hf import extend_context
from longctx_hf.evaluate import (
    evaluate_model,
    nll_of_last,
    parse_length,
    passkey_grid,
    passkey_trial,
    sliding_window_nll,
)
from longctx_hf.evaluate import perplexity as perplexity_module
from longctx_hf.evaluate.run import default_factor

SCHEMA_RUN_KEYS = {"method", "factor", "options"}


def text_of(num_chars, seed=0):
    words = ["alpha", "beta", "gamma", "delta", "pass", "key", "the", "is", "1234", "\n"]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(words), (num_chars // 3,), generator=generator)
    return " ".join(words[i] for i in picks)[:num_chars]


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("gemma2", {}), ("cohere", {}),
                                                    ("granite", {"logits_scaling": 4.0})])
def test_sliced_perplexity_equals_the_models_own_loss(model_type, overrides, monkeypatch):
    monkeypatch.setattr(perplexity_module, "SLICE", 7)  # many slices, the last one partial
    model = tiny_model(model_type, **overrides)
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()  # transformers' full-logits mean NLL of tokens 1..99
        labels = ids.clone()
        labels[:70] = -100  # only the last 30 tokens
        tail_loss = model(ids[None], labels=labels[None]).loss.item()
    assert nll_of_last(model, ids, 99) / 99 == pytest.approx(loss, rel=1e-5)
    assert nll_of_last(model, ids, 30) / 30 == pytest.approx(tail_loss, rel=1e-5)


@pytest.mark.parametrize("stride, scored", [(1, 12), (8, 60), (31, 60)])
def test_sliding_window_equals_a_hand_loop(stride, scored):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(2))
    window = 32
    expected = 0.0
    with torch.no_grad():
        for chunk_start in range(100 - scored, 100, stride):  # chunks of `stride` tokens, the window ending there
            chunk_end = min(chunk_start + stride, 100)
            context_start = max(0, chunk_end - window)
            logprobs = F.log_softmax(model(ids[None, context_start:chunk_end]).logits[0].double(), dim=-1)
            for position in range(chunk_start, chunk_end):
                expected -= logprobs[position - 1 - context_start, ids[position]].item()
    got = sliding_window_nll(model, ids, scored, window, stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert sliding_window_nll(model, ids[:32], 20, window, progress=False) == pytest.approx(
        nll_of_last(model, ids[:32], 20), rel=1e-6)  # fits the window: plain full context


def test_passkey_grid_counts_match_single_trials():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    grid = passkey_grid(model, tokenizer, [300, 420], [0.0, 1.0], trials=2, seed=5, progress=False)
    assert [(cell["length"], cell["depth"]) for cell in grid] == [(300, 0.0), (300, 1.0), (420, 0.0), (420, 1.0)]
    for cell in grid:
        trials = [passkey_trial(model, tokenizer, cell["length"], cell["depth"], seed=5 + t) for t in range(2)]
        assert cell["trials"] == 2 and cell["correct"] == sum(t["found"] for t in trials)
        assert cell["accuracy"] == cell["correct"] / 2
        assert [a["passkey"] for a in cell["answers"]] == [t["passkey"] for t in trials]
        assert len({a["passkey"] for a in cell["answers"]}) == 2  # several random keys per cell
        assert cell["length"] - 100 < cell["prompt_tokens"][0] <= cell["length"]  # one filler is ~90 tokens
    with pytest.raises(ValueError, match="trials"):
        passkey_grid(model, tokenizer, [300], [0.5], trials=0)


def test_parse_length_and_default_factor():
    assert [parse_length(x) for x in ("2k", "16K", "3000")] == [2048, 16384, 3000]
    for bad in ("2q", "", "1", "k"):
        with pytest.raises(ValueError, match="length"):
            parse_length(bad)
    assert default_factor([2048, 16384], 8192) == 2.0 and default_factor([10000], 8000) == 1.25
    with pytest.raises(ValueError, match="--factor"):
        default_factor([2048, 8192], 8192)


def _valid_png(path):
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_evaluate_model_results_schema_plots_and_independent_numbers(tiny_folder, tmp_path):
    text = text_of(3000)
    out = tmp_path / "out"
    results = evaluate_model(str(tiny_folder), ["none", "yarn", "pi"], lengths=[128, 512], text=text,
                             depths=[0.5], trials=1, output=str(out), progress=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    # the contract in docs/results_schema.md
    assert on_disk["model"] == str(tiny_folder) and on_disk["pretrained_length"] == 256
    assert on_disk["baseline"].startswith("unextended model, sliding window of its pretrained length")
    assert on_disk["text"] and set(on_disk["versions"]) >= {"longctx_hf", "torch", "transformers"}
    assert on_disk["plots"] == {"ppl_vs_length": "ppl_vs_length.png", "passkey_heatmap": "passkey_heatmap.png"}
    assert [run["method"] for run in on_disk["runs"]] == ["none", "yarn", "pi"]
    for run in on_disk["runs"]:
        assert set(run) >= SCHEMA_RUN_KEYS | {"perplexity", "passkey"}
        assert run["factor"] == (None if run["method"] == "none" else 2.0)  # 512 / 256, the default rule
        for row in run["perplexity"]:
            assert set(row) >= {"length", "ppl", "baseline_ppl", "tokens_scored"} and row["tokens_scored"] == 64
        for cell in run["passkey"]:
            assert set(cell) >= {"length", "depth", "trials", "correct", "accuracy"}
    # independent numbers: a fresh model per method, the model's own loss over the same last 64 tokens
    tokenizer = char_tokenizer()
    ids = tokenizer(text, return_tensors="pt").input_ids[0][-512:]
    for run in on_disk["runs"]:
        model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
        if run["method"] != "none":
            extend_context(model, run["method"], factor=2)
        for row in run["perplexity"]:
            window = ids[-row["length"]:]
            labels = window.clone()
            labels[:-64] = -100
            with torch.no_grad():
                loss = model(window[None], labels=labels[None]).loss.item()
            assert row["ppl"] == pytest.approx(math.exp(loss), rel=1e-5), (run["method"], row["length"])
    none = on_disk["runs"][0]["perplexity"]
    assert none[0]["ppl"] == none[0]["baseline_ppl"]  # 128 fits the 256 window: the baseline is the same thing
    assert none[1]["ppl"] != none[1]["baseline_ppl"]
    assert {r["baseline_ppl"] for run in on_disk["runs"] for r in run["perplexity"] if r["length"] == 512} == {
        none[1]["baseline_ppl"]}
    assert _valid_png(out / "ppl_vs_length.png")[0] > 400 and _valid_png(out / "passkey_heatmap.png")[0] > 400
    table = (out / "results.md").read_text()
    assert "| yarn x2 |" in table and "| baseline: unextended, 256-token window |" in table
    with pytest.raises(ValueError, match="already holds results.json"):
        evaluate_model(str(tiny_folder), ["none"], lengths=[128], text=text, output=str(out), progress=False)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "longctx_hf.cli", "eval", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_eval_writes_everything(tiny_folder, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(text_of(2000, seed=3))
    out = tmp_path / "out"
    done = cli(str(tiny_folder), "--method", "none,dynamic_ntk", "--lengths", "128,384", "--passkey-lengths", "200",
               "--depths", "0.2,0.8", "--trials", "2", "--text", str(text_file), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| dynamic_ntk x1.5 |" in done.stdout and "Passkey retrieval" in done.stdout  # 384 / 256 = 1.5
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["runs"][1]["factor"] == 1.5
    assert [(c["length"], c["depth"], c["trials"]) for c in results["runs"][1]["passkey"]] == [(200, 0.2, 2),
                                                                                             (200, 0.8, 2)]
    assert (out / "results.md").read_text().strip() in done.stdout
    assert _valid_png(out / "ppl_vs_length.png") and _valid_png(out / "passkey_heatmap.png")


@pytest.mark.parametrize("args, message", [
    (["--lengths", "2k,abc"], "--lengths"),
    (["--method", "yarn,bogus"], "bogus"),
    (["--method", "none,alibi"], "not a RoPE rescaling"),
    (["--tasks", "ppl,mmlu"], "--tasks"),
    (["--depths", "0.5,1.5"], "--depths"),
    (["--depths", "half"], "--depths"),
    (["--trials", "0"], "--trials"),
    (["--factor", "0.5"], "--factor"),
    (["--dtype", "float8"], "--dtype"),
    (["--device-map", "gpu0"], "--device-map"),
    (["--text", "/no/such/file.txt"], "--text"),
    (["--score-tokens", "4096", "--lengths", "2k,4k"], "--score-tokens"),
    (["--lengths", "64,128"], "--factor"),  # nothing beyond the tiny model's 256 tokens: no default factor
])
def test_cli_eval_rejects_bad_input_before_loading(tiny_folder, tmp_path, args, message):
    out = tmp_path / "out"
    done = cli(str(tiny_folder), *args, "--output", str(out), timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()  # nothing written


def test_cli_eval_names_a_model_folder_that_is_not_one(tmp_path):
    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "empty", tmp_path / "missing"):
        done = cli(str(model), "--output", str(tmp_path / "out"), timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists()


def test_cli_eval_refuses_to_overwrite(tiny_folder, tmp_path):
    (tmp_path / "results.json").write_text("mine")
    done = cli(str(tiny_folder), "--output", str(tmp_path), timeout=120)
    assert done.returncode == 2 and "results.json" in done.stderr
    assert (tmp_path / "results.json").read_text() == "mine"


def test_default_text_is_long_and_deterministic():
    text = perplexity_module.default_text(min_chars=200_000)
    assert len(text) >= 200_000 and text == perplexity_module.default_text(min_chars=200_000)
    assert "def " in text and "import " in text


@pytest.mark.real_model
def test_cli_eval_on_real_smollm2(tmp_path):
    """The `smollm2` name end to end, cheaply: 1k/2k perplexity on the default text, a 1k passkey it can find."""
    out = tmp_path / "out"
    done = cli("smollm2", "--method", "none,yarn", "--factor", "2", "--lengths", "1k,2k", "--passkey-lengths", "1k",
               "--depths", "0.5", "--trials", "1", "--output", str(out), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["pretrained_length"] == 8192 and "standard library" in results["text"]
    none, yarn = results["runs"]
    for row in none["perplexity"]:
        assert row["ppl"] == row["baseline_ppl"] < 10  # within the 8k window the baseline is the model itself
    short, long = none["perplexity"]
    assert long["ppl"] < short["ppl"]  # the same 512 tokens, predicted from twice as much context
    for ours, theirs in zip(yarn["perplexity"], none["perplexity"]):
        assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=0.1)  # x2 barely changes short contexts
    assert none["passkey"][0]["correct"] == 1, none["passkey"][0]["answers"]


def test_reports_from_a_cut_off_run(tmp_path):
    """A run stopped mid-way (one method without numbers yet) still gives a table and both plots."""
    from longctx_hf.evaluate import write_reports

    row = {"length": 16384, "ppl": 4.6, "baseline_ppl": 4.5, "tokens_scored": 8192}
    cell = {"length": 16384, "depth": 0.5, "trials": 2, "correct": 1, "accuracy": 0.5}
    results = {"model": "m", "pretrained_length": 8192, "lengths": [16384], "depths": [0.5], "tokens_scored": 8192,
               "baseline_perplexity": [{"length": 16384, "ppl": 4.5}], "plots": {}, "complete": False,
               "runs": [{"method": "yarn", "factor": 2.0, "options": {}, "perplexity": [row], "passkey": [cell]},
                        {"method": "pi", "factor": 2.0, "options": {}, "perplexity": []}]}
    table = write_reports(results, tmp_path)
    assert "| yarn x2 | 4.60 |" in table and "| baseline: unextended, 8192-token window | 4.50 |" in table
    assert "| yarn x2 | 1/2 (50%) |" in table and "pi" not in table
    assert _valid_png(tmp_path / "ppl_vs_length.png") and _valid_png(tmp_path / "passkey_heatmap.png")
    assert json.loads((tmp_path / "results.json").read_text())["plots"] == {
        "ppl_vs_length": "ppl_vs_length.png", "passkey_heatmap": "passkey_heatmap.png"}


def test_reports_from_combined_runs_with_different_passkey_cells(tmp_path):
    """Results combined from several runs (different lengths and depths per method) mark the gaps "not run"."""
    from longctx_hf.evaluate import write_reports

    def cell(length, depth, correct):
        return {"length": length, "depth": depth, "trials": 1, "correct": correct, "accuracy": float(correct)}

    results = {"model": "m", "pretrained_length": 8192, "lengths": [16384, 32768], "depths": [0.1, 0.5, 0.9],
               "tokens_scored": 4096, "plots": {}, "complete": True,
               "baseline_perplexity": [{"length": 16384, "ppl": 8.1}, {"length": 32768, "ppl": 8.1}],
               "runs": [{"method": "self_extend", "factor": 2.0, "options": {},
                         "passkey": [cell(16384, d, 1) for d in (0.1, 0.5, 0.9)]},
                        {"method": "self_extend", "factor": 4.0, "options": {}, "passkey": [cell(32768, 0.5, 0)]}]}
    table = write_reports(results, tmp_path)
    assert "| self_extend x2 | 3/3 (100%) | not run |" in table
    assert "| self_extend x4 | not run | 0/1 (0%) |" in table
    assert _valid_png(tmp_path / "passkey_heatmap.png")
