"""The LongRoPE search: on a small LLaMA trained from scratch at a short length it beats YaRN on held-out text;
a cut-off search resumes to the same result; its outputs load back; bad options fail before any work."""
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from longctx_hf import extend_context, search_rope_factors
from longctx_hf.evaluate.perplexity import nll_of_last
from longctx_hf.needle_fitness import needle_samples
from longctx_hf.search import check_search_options, seed_candidates

L = 64  # the small model's training length


def cli(*args):
    """The installed `longctx-hf` console script, in its own process."""
    script = str(Path(sys.executable).parent / "longctx-hf")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=600)


def stdlib_bytes(part):
    """Byte-level text (vocab 256): files i % 10 >= 2 train, 0 calibrates the search, 1 is held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return torch.tensor(list(b"".join(f.read_bytes() for i, f in enumerate(files) if part(i % 10))))


@pytest.fixture(scope="module")
def trained():
    """A 2-layer LLaMA trained at L tokens for 250 steps (about a minute here): it knows positions up to L only."""
    torch.manual_seed(0)
    text = stdlib_bytes(lambda k: k >= 2)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L, rope_theta=1e4)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        starts = torch.randint(0, len(text) - L, (32,))
        batch = torch.stack([text[s:s + L] for s in starts])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def held_out_ppl(model, length, windows=16):
    ids = stdlib_bytes(lambda k: k == 1)[: windows * length].reshape(windows, length)
    return math.exp(sum(nll_of_last(model, w, length - 1) for w in ids) / (windows * (length - 1)))


def search(model, output, budget, **kwargs):
    calibration = stdlib_bytes(lambda k: k == 0)[: 16 * 4 * L]
    return search_rope_factors(model, calibration, factor=4, output_dir=output, budget=budget, documents=16,
                               progress=False, calibration_text="stdlib files 0 mod 10",
                               evaluation_text="stdlib files 1 mod 10", **kwargs)


def test_the_search_beats_yarn_on_held_out_text(trained, tmp_path):
    extend_context(trained, "yarn", 4)
    yarn = held_out_ppl(trained, 4 * L)
    result = search(trained, tmp_path, budget=40)
    searched = held_out_ppl(trained, 4 * L)  # the model is left with the best factors
    assert searched < 0.99 * yarn, (searched, yarn)  # measured: 9.68 against 9.88
    assert result.results["candidates"][0]["origin"] == "yarn"
    assert result.results["candidates"][0]["ppl"] == pytest.approx(result.results["yarn_ppl"])
    factors = result.best["long_factor"]
    assert all(f >= 1 for f in factors) and factors == sorted(factors)  # LongRoPE's search space


def test_the_yarn_seed_is_yarn_exactly(trained):
    """The search starts from YaRN itself: its first candidate, as a longrope config, gives YaRN's logits."""
    ids = torch.randint(0, 256, (1, 3 * L), generator=torch.Generator().manual_seed(0))
    extend_context(trained, "yarn", 4)
    with torch.no_grad():
        want = trained(ids).logits
    from longctx_hf import context_info
    from longctx_hf.methods import longrope

    info = context_info(trained)
    spec = longrope.Spec(factor=4.0, rope_theta=1e4, rotary_dim=16, original_max_position_embeddings=L)
    first = seed_candidates(spec)[0]
    assert first.attention_factor == pytest.approx(info.attention_scaling)
    extend_context(trained, "longrope", 4, long_factor=list(first.factors), attention_factor=first.attention_factor)
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).logits, want, rtol=1e-4, atol=2e-4)  # float32 rounding of inv_freq


def test_a_cut_off_search_resumes_to_the_same_result(trained, tmp_path):
    whole = search(trained, tmp_path / "whole", budget=14)
    search(trained, tmp_path / "cut", budget=5)  # cut off after 5 evaluations (results.json written after each)
    partial = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert len(partial["candidates"]) == 5
    resumed = search(trained, tmp_path / "cut", budget=14)
    assert resumed.results["candidates"] == whole.results["candidates"]
    assert resumed.best == whole.best
    with pytest.raises(ValueError, match="another setup"):
        search(trained, tmp_path / "cut", budget=14, seed=1)


def test_a_search_is_resumed_only_on_the_same_weights_and_tokens(trained, tmp_path):
    """Replayed fitnesses were measured on one model and one text: another model of the same shape, or other
    calibration tokens, must not inherit them."""
    search(trained, tmp_path, budget=2)
    other = LlamaForCausalLM(trained.config).eval()  # same shape and config, other weights
    with pytest.raises(ValueError, match="differs in: model_fingerprint"):
        search(other, tmp_path, budget=3)
    calibration = stdlib_bytes(lambda k: k == 0)[1: 16 * 4 * L + 1]  # the same text, shifted by one token
    with pytest.raises(ValueError, match="differs in: calibration_tokens_sha256"):
        search_rope_factors(trained, calibration, factor=4, output_dir=tmp_path, budget=3, documents=16,
                            progress=False, calibration_text="stdlib files 0 mod 10",
                            evaluation_text="stdlib files 1 mod 10")
    record = json.loads((tmp_path / "results.json").read_text())
    del record["setup"]["model_fingerprint"], record["setup"]["calibration_tokens_sha256"]  # an older record
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="resuming trusts that the model and the calibration tokens"):
        resumed = search(trained, tmp_path, budget=3)
    assert resumed.results["candidates"][:2] == record["candidates"] and resumed.evaluations == 3


def test_the_outputs_reload(trained, tmp_path):
    result = search(trained, tmp_path, budget=6)
    saved = json.loads((tmp_path / "factors.json").read_text())
    assert saved == {"long_factor": result.best["long_factor"], "attention_factor": result.best["attention_factor"]}
    assert (tmp_path / "search.png").stat().st_size > 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["evaluations"] == len(record["candidates"]) == 6
    assert record["setup"]["calibration_text"] != record["setup"]["evaluation_text"]


def test_scored_tokens_make_the_fitness_the_perplexity_of_each_window_tail(trained, tmp_path):
    tail = 3 * L  # the tokens past the pretrained length L
    result = search(trained, tmp_path, budget=1, scored_tokens=tail)  # budget 1: only the YaRN seed
    assert result.results["setup"]["scored_tokens"] == tail
    extend_context(trained, "yarn", 4)
    windows = stdlib_bytes(lambda k: k == 0)[: 16 * 4 * L].reshape(16, 4 * L)
    with torch.no_grad():
        logits = trained(windows).logits[:, -tail - 1:-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, -tail:].reshape(-1))
    assert result.best["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    whole = search(trained, tmp_path / "whole", budget=1)
    assert abs(whole.best["ppl"] - result.best["ppl"]) > 1e-3 * result.best["ppl"]
    with pytest.raises(ValueError, match="scored_tokens must be below the target length 256"):
        search(trained, tmp_path / "too-many", budget=1, scored_tokens=4 * L)


def test_a_search_written_before_the_fitness_options_resumes(trained, tmp_path):
    first = search(trained, tmp_path, budget=3)
    record = json.loads((tmp_path / "results.json").read_text())
    del record["setup"]["fitness"], record["setup"]["scored_tokens"]  # as releases before these options wrote it
    (tmp_path / "results.json").write_text(json.dumps(record))
    resumed = search(trained, tmp_path, budget=4)
    assert resumed.results["candidates"][:3] == first.results["candidates"]
    assert resumed.evaluations == 4


def byte_encode(text):
    return list(text.encode())


def test_needle_samples_hide_every_answer_far_before_its_question():
    calibration = stdlib_bytes(lambda k: k == 0)[: 3 * 1024]
    samples = needle_samples(byte_encode, calibration, 1024, 3, seed=0)
    assert samples == needle_samples(byte_encode, calibration, 1024, 3, seed=0)
    assert samples != needle_samples(byte_encode, calibration, 1024, 3, seed=1)
    for sample in samples:
        text = bytes(sample.input_ids).decode()
        assert len(sample.input_ids) == 1024
        questions = text.index("mentioned above is:")
        answers = "".join(text[p] for p in sample.scored)  # one byte per digit: the answers, in the order asked
        hidden = [text.index(f"The special magic number for {key} is: {value}.") for key, value, _ in sample.needles]
        assert hidden == sorted(hidden) and hidden[-1] < questions  # at increasing depths, before every question
        assert [d for *_, d in sample.needles] == sorted(d for *_, d in sample.needles)
        asked = [answers[i:i + 7] for i in range(0, len(answers), 7)]
        assert sorted(asked) == sorted(value for _, value, _ in sample.needles)
        assert asked != [value for _, value, _ in sample.needles]  # asked in another order than hidden
        for key, value, _ in sample.needles:
            assert f"for {key} mentioned above is: {value}." in text[questions - 60:]
        assert len(answers) == 7 * len(sample.needles) and answers.isdigit()
    with pytest.raises(ValueError, match="too short for 4 needles"):
        needle_samples(byte_encode, calibration, 256, 1, seed=0)


def test_needle_fitness_is_the_perplexity_of_the_hidden_answers(trained, tmp_path):
    calibration = stdlib_bytes(lambda k: k == 0)[: 2 * 16 * L]
    result = search_rope_factors(trained, calibration, factor=16, output_dir=tmp_path, budget=1, documents=2,
                                 fitness="needle", encode=byte_encode, progress=False)
    setup = result.results["setup"]
    assert setup["fitness"] == "needle" and len(setup["needles"]) == 2 and setup["scored_tokens"] is None
    extend_context(trained, "yarn", 16)  # the first candidate is YaRN exactly
    nll, count = 0.0, 0
    for sample in needle_samples(byte_encode, calibration, 16 * L, 2, seed=0):
        ids = torch.tensor(sample.input_ids)
        with torch.no_grad():
            logprobs = trained(ids[None]).logits[0].log_softmax(-1)
        scored = torch.tensor(sample.scored)
        nll -= logprobs[scored - 1, ids[scored]].sum().item()
        count += len(scored)
    assert result.best["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="needs encode="):
        search_rope_factors(trained, calibration, factor=16, output_dir=tmp_path / "x", budget=1, fitness="needle")


@pytest.mark.parametrize("options, match", [
    (dict(budget=None, minutes=None), "budget"), (dict(budget=0), "budget must be an int >= 1"),
    (dict(minutes=-1.0), "minutes must be a positive number"), (dict(population=1), "population"),
    (dict(documents=0), "documents"), (dict(factor=1.0), "factor must be a number > 1"),
    (dict(scored_tokens=0), "scored_tokens must be an int >= 1"), (dict(fitness="bleu"), "fitness must be one of"),
    (dict(fitness="needle", scored_tokens=10), "scored_tokens applies to fitness 'perplexity'")])
def test_bad_search_options_are_refused(options, match):
    arguments = dict(factor=2.0, budget=4, minutes=None, population=8, parents=4, documents=1) | options
    with pytest.raises(ValueError, match=match):
        check_search_options(**arguments)


def test_the_calibration_text_must_not_be_the_evaluation_text(trained, tmp_path):
    with pytest.raises(ValueError, match="must differ from the evaluation text"):
        search_rope_factors(trained, torch.zeros(1000, dtype=torch.long), factor=2, output_dir=tmp_path, budget=2,
                            calibration_text="same", evaluation_text="same")
    with pytest.raises(ValueError, match="give a longer text"):
        search_rope_factors(trained, torch.zeros(10, dtype=torch.long), factor=2, output_dir=tmp_path, budget=2)


def test_cli_search_writes_factors_and_a_checkpoint_that_says_how_they_were_found(tiny_folder, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{i % 97} value {i}" for i in range(4000)))
    out = cli("search", str(tiny_folder), "--factor", "2", "--budget", "3", "--text", str(text),
              "--output", str(tmp_path / "search"), "--checkpoint")
    assert out.returncode == 0, out.stderr
    assert "best of 3 candidates" in out.stdout
    factors = json.loads((tmp_path / "search" / "factors.json").read_text())
    config = AutoConfig.from_pretrained(tmp_path / "search" / "checkpoint").to_dict()
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["long_factor"] == pytest.approx(factors["long_factor"])
    card = (tmp_path / "search" / "checkpoint" / "README.md").read_text()
    assert "## How the factors were found" in card and "evaluated 3 candidates" in card
    bad = cli("search", str(tiny_folder), "--factor", "2", "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--budget" in bad.stderr
    from longctx_hf.evaluate.perplexity import default_text
    held_out = tmp_path / "held_out.txt"  # the text `longctx-hf eval` scores, half of it after other text
    held_out.write_text(text.read_text()[:60_000] + default_text(min_chars=60_000))
    bad = cli("search", str(tiny_folder), "--factor", "2", "--budget", "3", "--text", str(held_out),
              "--output", str(tmp_path / "y"))
    assert bad.returncode == 2 and "--text overlaps the evaluation text" in bad.stderr
    assert not (tmp_path / "y").exists()
    held_out.write_text(text.read_text() * 4 + default_text(min_chars=20_000))  # only the scored tail is evaluation
    bad = cli("search", str(tiny_folder), "--factor", "2", "--budget", "3", "--text", str(held_out),
              "--output", str(tmp_path / "y"))
    assert bad.returncode == 2 and "--text overlaps the evaluation text" in bad.stderr
