"""RULER tasks: every sample fits its length in the model's own tokens and carries its answer (checked by parsing
the prompt independently of the generator), samples are reproducible, scoring is RULER's, evaluate_model and the
CLI write the results, and the real SmolLM2 finds a needle."""
import io
import json
import re
from collections import Counter

import pytest
import torch
from models import char_tokenizer, tiny_model
from test_evaluate import _valid_png, cli

from longctx_hf.evaluate import evaluate_model
from longctx_hf.evaluate.ruler import (
    effective_length,
    generate,
    string_match_all,
    string_match_part,
    summarize,
)
from longctx_hf.evaluate.ruler_tasks import TASKS, Resources, build_sample, build_samples

LENGTH = 8192  # characters = tokens with the character tokenizer


@pytest.fixture(scope="module")
def resources():
    return Resources()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _needle_values(text, key):
    return re.findall(r"One of the special magic \w+ for " + re.escape(key) + r" is: ([\w-]+)\.", text)


def _niah_reference(prompt):
    """Answers read off the prompt: the keys the question names, then every needle carrying one of them."""
    question = prompt[prompt.rindex("\n") + 1:]
    keys = re.match(r"What (?:is|are all) the special magic \w+ for (.+?) mentioned", question).group(1)
    keys = keys.replace(", and ", ", ").split(", ")
    return keys, [value for key in keys for value in _needle_values(prompt, key)]


def _vt_reference(prompt):
    """Variables holding the queried value, by following the assignments of the last (non-example) prompt."""
    own = prompt[prompt.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in the text above", own).group(1)
    holds = set()
    for line in own.splitlines():
        match = re.match(r"VAR (\w+) = (?:VAR (\w+)|(\d+))", line)
        if match and (match.group(3) == value or match.group(2) in holds):
            holds.add(match.group(1))
    return holds


def _counts_after(prompt, marker, pattern):
    own = prompt[prompt.rindex(marker):]
    return Counter(re.findall(pattern, own[:own.index("\nQuestion:")]))


# RULER's own wording (NVIDIA/RULER scripts/data/synthetic/constants.py), typed out here as the independent reference
RULER_ENDS = {
    "niah": ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
             "about the number afterwards.\n", " mentioned in the provided text is"),
    "niah_many": ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
                  "quiz you about the numbers afterwards.\n", " mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
           ", they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n", "\nQuestion: What are the 10 most common words in the above list? Answer: "
            "The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ", "\nQuestion: Do not provide any explanation. Please ignore the "
            "dots '....'. What are the three most frequently appeared words in the above coded text? Answer: "
            "According to the coded text above, the three most frequently appeared words are:"),
}


def _ends(name):
    if name in ("niah_multivalue", "niah_multiquery"):
        return RULER_ENDS["niah_many"]
    if name == "niah_single_3" or name == "niah_multikey_3":
        return tuple(part.replace("number", "uuid") for part in RULER_ENDS["niah"])
    return RULER_ENDS[name if name in RULER_ENDS else "niah"]


@pytest.mark.parametrize("name, length", [(name, LENGTH) for name in TASKS] + [("cwe", 3072)])
def test_every_sample_fits_its_length_and_holds_its_answer(name, length, tokenizer, resources):
    for index in range(2):
        sample = build_sample(tokenizer, TASKS[name], length, index, seed=7, resources=resources)
        # the model's own tokens: prompt plus answer budget within the length, and nearly filling it
        assert len(sample.input_ids) + sample.max_new_tokens <= length
        assert len(sample.input_ids) + sample.max_new_tokens > 0.9 * length
        start, end = _ends(name)
        assert sample.prompt.startswith(start) and sample.prompt.endswith(end)
        assert sample.input_ids == tokenizer(sample.prompt).input_ids
        seen = tokenizer.decode(sample.input_ids)
        assert all(answer in seen for answer in sample.answers)
        prompt = sample.prompt
        if TASKS[name].kind == "niah":
            keys, values = _niah_reference(prompt)
            assert len(keys) == TASKS[name].options["queries"]
            assert sorted(values) == sorted(sample.answers)
            assert len(sample.answers) == TASKS[name].options["values"] * TASKS[name].options["queries"]
        elif name == "vt":
            assert _vt_reference(prompt) == set(sample.answers) and len(sample.answers) == 5
        elif name == "cwe":
            counts = _counts_after(prompt, "Below is a numbered list", r"\d+\. ([\w'-]+)")
            top = [word for word, _ in counts.most_common(11)]
            assert set(top[:10]) == set(sample.answers)
            assert counts[top[9]] > counts[top[10]]  # a clear top ten
        else:
            counts = _counts_after(prompt, "Read the following coded text", r"(?<=\s)([a-z]{6}|\.\.\.)(?=\s)")
            ranked = [word for word, _ in counts.most_common() if word != "..."]
            assert ranked[:3] == sample.answers and counts[ranked[2]] > counts[ranked[3]]


def test_samples_are_reproducible_and_differ_by_seed(tokenizer):
    first, _ = build_samples(tokenizer, ["niah_single_2", "cwe"], [3072, 3584], 2, seed=3)
    again, _ = build_samples(tokenizer, ["niah_single_2", "cwe"], [3072, 3584], 2, seed=3)
    other, _ = build_samples(tokenizer, ["niah_single_2", "cwe"], [3072, 3584], 2, seed=4)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [(s.task, s.length, s.index) for s in first] == [(t, n, i) for n in (3072, 3584)
                                                           for t in ("niah_single_2", "cwe") for i in range(2)]
    assert all(a.answers != b.answers for a, b in zip(first, other))
    assert first[0].answers != first[1].answers  # samples of one cell differ


def test_a_length_too_short_for_a_task_is_refused(tokenizer, resources):
    with pytest.raises(ValueError, match="lengths: 300 tokens is too short for task 'niah_multivalue'"):
        build_sample(tokenizer, TASKS["niah_multivalue"], 300, 0, seed=0, resources=resources)


def test_scoring_is_rulers_string_match():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("KEY abc", ["key", "ABC"]) == 1.0  # case-insensitive
    assert string_match_part("only 456 here", ["123", "456"]) == 1.0
    assert string_match_part("nothing", ["123", "456"]) == 0.0
    assert effective_length({4096: 90.0, 8192: 86.0, 16384: 50.0, 32768: 95.0}, 85.6) == 8192  # stops at the first
    assert effective_length({4096: 80.0, 8192: 90.0}, 85.6) is None


def test_summary_uses_the_unextended_models_shortest_score_as_reference():
    def run(method, scores):
        return {"method": method, "ruler": [{"task": t, "length": n, "score": s} for n, per_task in scores.items()
                                            for t, s in per_task.items()]}

    runs = [run("none", {4096: {"a": 100.0, "b": 60.0}, 8192: {"a": 0.0, "b": 0.0}}),
            run("yarn", {4096: {"a": 90.0, "b": 50.0}, 8192: {"a": 80.0, "b": 40.0}, 16384: {"a": 60.0, "b": 0.0}})]
    summary = summarize(runs, ["a", "b"], pretrained_length=8192)
    assert summary["reference"] == {"method": "none", "length": 4096, "score": 80.0}
    yarn = summary["methods"]["yarn"]
    assert yarn["average"] == {"4096": 70.0, "8192": 60.0, "16384": 30.0}
    assert yarn["effective_length_relative"] == 4096  # 70 >= 0.85 * 80 = 68 > 60
    assert yarn["effective_length_absolute"] is None  # 70 < 85.6 already at the shortest
    assert summary["methods"]["none"]["effective_length_relative"] == 4096
    alone = summarize(runs[1:], ["a", "b"], 8192)  # no unextended run: each method against its own shortest
    assert "reference" not in alone and alone["methods"]["yarn"]["reference_score"] == 70.0
    assert alone["methods"]["yarn"]["effective_length_relative"] == 8192  # 60 >= 59.5
    # a reference read past the pretrained length would make the threshold meaningless: no relative length
    past = summarize(runs, ["a", "b"], pretrained_length=2048)
    assert past["methods"]["yarn"]["effective_length_relative"] is None
    assert "past the pretrained length 2048" in past["methods"]["yarn"]["relative_note"]
    # a length with a task missing (a cut-off run) has no mean
    cut = summarize([run("yarn", {4096: {"a": 90.0, "b": 50.0}, 8192: {"a": 80.0}})], ["a", "b"], 8192)
    assert cut["methods"]["yarn"]["average"] == {"4096": 70.0}


def test_common_words_refuses_a_length_beyond_its_word_list(tokenizer, resources):
    with pytest.raises(ValueError, match="too long for task 'cwe'.*all the word list has"):
        build_sample(tokenizer, TASKS["cwe"], 400_000, 0, seed=0, resources=resources)


def test_chat_template_wraps_the_question_and_keeps_the_answer_prefix(tokenizer, resources):
    chat = char_tokenizer()
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    sample = build_sample(chat, TASKS["niah_single_2"], 2048, 0, seed=1, resources=resources, chat_template=True)
    plain = build_sample(tokenizer, TASKS["niah_single_2"], 2048, 0, seed=1, resources=resources)
    assert sample.prompt.startswith("<user>A special magic number is hidden")
    assert "mentioned in the provided text?</user>\n<assistant>The special magic number for " in sample.prompt
    assert sample.answers == plain.answers and len(sample.input_ids) + sample.max_new_tokens <= 2048


def test_batched_rows_generate_what_single_rows_do(tiny_folder, tokenizer, resources):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    sample = build_sample(tokenizer, TASKS["niah_single_1"], 768, 0, seed=0, resources=resources)
    twin = build_sample(tokenizer, TASKS["niah_single_1"], 768, 0, seed=0, resources=resources)
    twin.input_ids = twin.input_ids[:-40] + tokenizer(" What is it? Say it now please, the number is:").input_ids[-40:]
    assert len(twin.input_ids) == len(sample.input_ids) and twin.input_ids != sample.input_ids
    together = generate(model, tokenizer, [sample, twin], batch_size=2)
    alone = generate(model, tokenizer, [sample], batch_size=1) + generate(model, tokenizer, [twin], batch_size=1)
    assert together == alone and together[0] != together[1]
    with torch.no_grad():  # and greedy decoding is what it says: argmax continuation of the prompt
        ids = torch.tensor([sample.input_ids])
        for _ in range(sample.max_new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert tokenizer.decode(ids[0, len(sample.input_ids):]).strip() == alone[0]


def test_the_progress_bar_weighs_long_prompts_by_their_attention(tiny_folder, tokenizer, resources):
    """The bar's total is what the runs add up to (it ends at 100%), and a prompt's weight grows with the square of
    its length past the attention span (parameters / (2 · hidden · layers), counted independently here)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from longctx_hf.evaluate.ruler import attention_span, run_cells, work

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    config = model.config
    weights = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    tied = model.get_input_embeddings().weight.numel() if config.tie_word_embeddings else 0
    span = attention_span(model)
    assert span == pytest.approx((weights - tied) / (2 * config.hidden_size * config.num_hidden_layers))
    samples = [build_sample(tokenizer, TASKS["niah_single_1"], n, 0, seed=0, resources=resources) for n in (768, 1024)]
    short, long = (len(s.input_ids) for s in samples)
    assert work(samples[1], span) - 64 * samples[1].max_new_tokens == pytest.approx(long + long ** 2 / span)
    bar = tqdm(total=sum(work(s, span) for s in samples), file=io.StringIO())
    run_cells(model, tokenizer, samples, bar=bar)
    assert bar.n == pytest.approx(bar.total)


def test_evaluate_model_writes_ruler_cells_summary_and_heatmap(tiny_folder, tmp_path):
    out = tmp_path / "out"
    results = evaluate_model(str(tiny_folder), ["none", "yarn"], tasks=["ruler"], lengths=[768, 1024],
                             ruler_tasks=["niah_single_1", "niah_multikey_2", "niah_single_1"], samples=2,
                             output=str(out), progress=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results)) and on_disk["complete"]
    assert on_disk["ruler"]["tasks"] == ["niah_single_1", "niah_multikey_2"] and on_disk["ruler"]["samples"] == 2
    assert "pydoc_data" in on_disk["ruler"]["haystack"] and "wonderwords" in on_disk["versions"]
    assert on_disk["plots"] == {"ruler_heatmap": "ruler_heatmap.png"} and _valid_png(out / "ruler_heatmap.png")
    for run in on_disk["runs"]:
        assert [(c["task"], c["length"]) for c in run["ruler"]] == [
            ("niah_single_1", 768), ("niah_multikey_2", 768), ("niah_single_1", 1024), ("niah_multikey_2", 1024)]
        for cell in run["ruler"]:
            assert all(p + m <= cell["length"] for p, m in zip(cell["prompt_tokens"], cell["max_new_tokens"]))
            found = [sum(a.lower() in p["prediction"].lower() for a in p["answers"]) / len(p["answers"])
                     for p in cell["predictions"]]
            assert cell["score"] == pytest.approx(100 * sum(found) / len(found))
    yarn = on_disk["ruler_summary"]["methods"]["yarn"]
    assert set(yarn) >= {"average", "effective_length_relative", "effective_length_absolute"}
    table = (out / "results.md").read_text()
    assert "RULER, mean score over tasks" in table and "| niah_multikey_2 |" in table and "| yarn x4 |" in table
    # the same samples for every method
    prompts = [[c["prompt_tokens"] for c in run["ruler"]] for run in on_disk["runs"]]
    assert prompts[0] == prompts[1]


@pytest.mark.parametrize("args, message", [
    (["--ruler-tasks", "niah_single_1,qa_1"], "unknown task(s) ['qa_1']"),
    (["--samples", "0"], "--samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--haystack", "/no/such/file.txt"], "--haystack"),
    (["--ruler-lengths", "300"], "300 tokens is too short for task"),
    (["--chat-template"], "has no chat template"),
    (["--ruler-tasks", "cwe,cwe", "--samples", "0"], "--samples"),
])
def test_cli_ruler_rejects_bad_input_before_loading(tiny_folder, tmp_path, args, message):
    out = tmp_path / "out"
    done = cli(str(tiny_folder), "--tasks", "ruler", "--method", "none", "--lengths", "512", *args,
               "--output", str(out), timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_model_without_a_tokenizer_is_refused(tmp_path):
    folder = tmp_path / "no_tokenizer"
    tiny_model("llama").save_pretrained(folder)
    done = cli(str(folder), "--tasks", "ruler", "--method", "none", "--lengths", "512", "--output",
               str(tmp_path / "out"), timeout=120)
    refused = "no usable tokenizer" in done.stderr or "no tokenizer could be loaded" in done.stderr
    assert done.returncode == 2 and refused and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
@pytest.mark.parametrize("chat_template", [False, True])
def test_smollm2_finds_single_needles(chat_template, tmp_path):
    results = evaluate_model("smollm2", ["none"], tasks=["ruler"], lengths=[1024], ruler_tasks=["niah_single_1"],
                             samples=2, chat_template=chat_template, output=str(tmp_path / "out"), progress=False)
    cell = results["runs"][0]["ruler"][0]
    assert cell["score"] == 100.0, cell["predictions"]
    assert all(920 <= p <= 1024 - m for p, m in zip(cell["prompt_tokens"], cell["max_new_tokens"]))


def test_ruler_options_without_the_ruler_task_are_refused(tiny_folder, tmp_path):
    done = cli(str(tiny_folder), "--tasks", "passkey", "--method", "none", "--lengths", "128", "--ruler-lengths",
               "16k", "--output", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2 and "ruler_lengths only apply to RULER" in done.stderr, done.stderr[-2000:]
