"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654), generated offline in the model's own tokens.

Definitions, templates and scoring follow NVIDIA/RULER's `synthetic.yaml`. Where this differs (docs/evaluation.md):
the "essay" haystack is the Python Language Reference that CPython ships (`pydoc_data.topics`) instead of Paul Graham
essays downloaded at run time (`haystack_file` replaces it); sentences are split by a regular expression instead of
nltk's punkt; the answer budget is twice the reference answer's tokens plus 16 (at most RULER's) instead of a fixed
128/30/120/50 tokens; the QA tasks (SQuAD, HotpotQA downloads) are left out. Word lists come from `wonderwords`, as in RULER.

Every sample is a function of (seed, task, length, index) and of the haystack size, so the binary search on the
size that fills the length never changes the keys, values or answers.
"""
from __future__ import annotations

import hashlib
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40), rounded
ANSWER_MARGIN = 16  # generated tokens beyond twice the reference answer's own (room to restate keys, punctuation)
ABSOLUTE_THRESHOLD = 85.6  # RULER's: Llama-2-7B's average score at 4k
RELATIVE_THRESHOLD = 0.85  # this tool's: 85% of the model's own score at the shortest length

NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} "
                 "mentioned in the provided text?")
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
NIAH_TEMPLATE_ONE = ("A special magic {kind} is hidden within the following text. Make sure to memorize it. I will "
                     "quiz you about the {kind} afterwards.\n{context}\nWhat is the special magic {kind} for {query} "
                     "mentioned in the provided text?")
NIAH_PREFIX_ONE = " The special magic {kind} for {query} mentioned in the provided text is"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class Task:
    """One RULER task: its generator (`kind`), options, metric ("all": the fraction of the reference answers found
    in the output, RULER's string_match_all; "part": 1 if any is found, string_match_part) and RULER's fixed
    answer budget in tokens (`tokens_to_generate`), the ceiling of this tool's smaller one."""
    name: str
    kind: str
    options: dict = field(default_factory=dict)
    metric: str = "all"
    ruler_budget: int = 128


def _niah(name, haystack, key="words", value="numbers", keys=1, values=1, queries=1):
    return Task(name, "niah", dict(haystack=haystack, key=key, value=value, keys=keys, values=values,
                                   queries=queries))


TASKS = {task.name: task for task in (
    _niah("niah_single_1", "noise"),
    _niah("niah_single_2", "essay"),
    _niah("niah_single_3", "essay", value="uuids"),
    _niah("niah_multikey_1", "essay", keys=4),
    _niah("niah_multikey_2", "needle"),
    _niah("niah_multikey_3", "needle", key="uuids", value="uuids"),
    _niah("niah_multivalue", "essay", values=4),
    _niah("niah_multiquery", "essay", queries=4),
    Task("vt", "variable_tracking", dict(chains=1, hops=4), ruler_budget=30),
    Task("cwe", "common_words", dict(common=10, common_repeats=30, uncommon_repeats=3), ruler_budget=120),
    Task("fwe", "frequent_words", dict(alpha=2.0, word_length=6), ruler_budget=50),
)}


@dataclass
class Sample:
    """One prompt: the tokens the model reads, the references its answer is scored against."""
    task: str
    length: int
    index: int
    prompt: str
    input_ids: list
    answers: list
    max_new_tokens: int
    size: int  # haystack units that filled the length (words, sentences or list entries)


class Resources:
    """Word lists and the essay haystack, read once per evaluation."""

    def __init__(self, haystack_file=None):
        from importlib.metadata import version
        from importlib.resources import files

        assets = files("wonderwords") / "assets"

        def words(name):
            return [w.strip() for w in (assets / name).read_text(encoding="utf-8").splitlines() if w.strip()]

        profane = set(words("profanitylist.txt"))
        self.nouns = sorted(set(words("nounlist.txt")) - profane)
        self.adjectives = sorted(set(words("adjectivelist.txt")) - profane)
        self.all_words = sorted(set(self.nouns) | set(self.adjectives) | set(words("verblist.txt")) - profane)
        self.words_source = f"wonderwords {version('wonderwords')} (nouns, adjectives, verbs; profanity removed)"
        if haystack_file is None:
            from pydoc_data.topics import topics

            text = "\n\n".join(topics[name] for name in sorted(topics))
            self.haystack_source = "the Python Language Reference shipped with CPython (pydoc_data.topics)"
        else:
            text = Path(haystack_file).read_text(encoding="utf-8", errors="replace")
            self.haystack_source = str(haystack_file)
        self.haystack_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.essay_words = re.sub(r"\s+", " ", text).strip().split(" ")
        if len(self.essay_words) < 100:
            raise ValueError(f"haystack (--haystack) {self.haystack_source} has only {len(self.essay_words)} words")

    def key_word(self, rng: Random) -> str:  # RULER: "adjective-noun"
        return f"{rng.choice(self.adjectives)}-{rng.choice(self.nouns)}"


def _random_value(kind: str, rng: Random, resources: Resources) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return resources.key_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def split_sentences(text: str) -> list:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _insert_at_depths(sentences: list, items: list, rng: Random) -> list:
    """RULER's essay insertion: each item at a depth drawn from 40 evenly spaced percentages, between sentences."""
    cuts = [0] + sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(items))) \
        + [len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(items):
            parts.append(items[i - 1])
    return [part for part in parts if part]


def _essay(resources: Resources, size: int) -> list:
    words = resources.essay_words
    repeated = words * -(-size // len(words))
    return split_sentences(" ".join(repeated[:size]))


def _niah_text(options: dict, rng: Random, size: int, resources: Resources):
    num_keys = max(options["keys"], options["queries"])
    keys, values, needles = [], [], []
    for _ in range(num_keys):
        key = _random_value(options["key"], rng, resources)
        while key in keys:
            key = _random_value(options["key"], rng, resources)
        keys.append(key)
        values.append([_random_value(options["value"], rng, resources) for _ in range(options["values"])])
        needles += [NEEDLE.format(kind=options["value"], key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)
    queried = rng.sample(range(num_keys), options["queries"])
    answers = [value for i in queried for value in values[i]]
    haystack_rng = Random(rng.getrandbits(64))  # what depends on the size draws from its own stream
    if options["haystack"] == "essay":
        context = " ".join(_insert_at_depths(_essay(resources, size), needles, haystack_rng))
    else:
        if options["haystack"] == "noise":
            sentences = [NOISE] * size
        else:  # "needle": the haystack is made of needles with other keys
            sentences = []
            for _ in range(size):
                key = _random_value(options["key"], haystack_rng, resources)
                while key in keys:
                    key = _random_value(options["key"], haystack_rng, resources)
                sentences.append(NEEDLE.format(kind=options["value"], key=key,
                                               value=_random_value(options["value"], haystack_rng, resources)))
        for index, needle in zip(sorted(haystack_rng.sample(range(size + 1), len(needles)), reverse=True), needles):
            sentences.insert(index, needle)
        context = "\n".join(sentences)
    queries = [keys[i] for i in queried]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if len(answers) == 1:
        kind = options["value"][:-1]  # "number", "uuid"
        return (NIAH_TEMPLATE_ONE.format(kind=kind, context=context, query=query),
                NIAH_PREFIX_ONE.format(kind=kind, query=query), answers)
    kind = options["value"]
    return NIAH_TEMPLATE.format(kind=kind, context=context, query=query), NIAH_PREFIX.format(kind=kind, query=query), \
        answers


def _variables(rng: Random, count: int, letters: int) -> list:
    names = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def _vt_example(options: dict, rng: Random, noise_sentences: int, letters: int = 5):
    """One variable-tracking prompt over `noise_sentences` noise lines: (question, prefix, variables). The question
    asks for the variables of the first chain."""
    sentences = [NOISE] * noise_sentences
    names = _variables(rng, options["chains"] * (options["hops"] + 1), letters)
    chains = []
    for c in range(options["chains"]):
        chain_names = names[c * (options["hops"] + 1):(c + 1) * (options["hops"] + 1)]
        value = str(rng.randint(10000, 99998))
        chains.append((chain_names, value))
        chain = [f"VAR {chain_names[0]} = {value}"] + [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} "
                                                        for j in range(options["hops"])]
        for offset, position in enumerate(sorted(rng.sample(range(len(sentences) + 1), len(chain)))):
            sentences.insert(position + offset, chain[offset])
    context = "\n".join(sentences).replace(". \n", ".\n")
    answers, value = chains[0]
    return (VT_TEMPLATE.format(context=context, query=value),
            VT_PREFIX.format(count=options["hops"] + 1, query=value), list(answers))


def _vt_text(options: dict, rng: Random, size: int, resources: Resources):
    shot_rng, main_rng = Random(rng.getrandbits(64)), Random(rng.getrandbits(64))
    # RULER's in-context example: ~500 tokens, 3-letter names
    shot_question, shot_prefix, shot_answers = _vt_example(options, shot_rng, 20, letters=3)
    question, prefix, answers = _vt_example(options, main_rng, size)
    return f"{shot_question}{shot_prefix}{' '.join(shot_answers)}\n{question}", prefix, answers


def _word_list(rng: Random, pool: list, distinct: int, common: int, common_repeats: int, uncommon_repeats: int):
    if distinct > len(pool):
        raise ValueError(f"common-words extraction needs {distinct} distinct words at this length, but the word list "
                         f"has {len(pool)}")
    chosen = rng.sample(pool, common)
    rest = sorted(set(pool) - set(chosen))
    uncommon = Random(rng.getrandbits(64)).sample(rest, distinct - common)
    entries = chosen * common_repeats + uncommon * uncommon_repeats
    Random(rng.getrandbits(64)).shuffle(entries)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries)), chosen


def _cwe_text(options: dict, rng: Random, size: int, resources: Resources, length: int):
    common = options["common"]
    shot_rng, main_rng = Random(rng.getrandbits(64)), Random(rng.getrandbits(64))
    if length < 4096:  # RULER's short-length variant
        shot = _word_list(shot_rng, resources.all_words, 20, common, 3, 1)
        context, answers = _word_list(main_rng, resources.all_words, common + size, common, 6, 1)
    else:
        shot = _word_list(shot_rng, resources.all_words, 40, common, 10, 3)
        context, answers = _word_list(main_rng, resources.all_words, common + size, common,
                                      options["common_repeats"], options["uncommon_repeats"])
    shot_text = CWE_TEMPLATE.format(context=shot[0]) + CWE_PREFIX + " " + _numbered(shot[1])
    return f"{shot_text}\n{CWE_TEMPLATE.format(context=context)}", CWE_PREFIX, answers


def _numbered(words: list) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (partial sum plus the Euler-Maclaurin tail)."""
    n = 1000
    return sum(k ** -alpha for k in range(1, n + 1)) + n ** (1 - alpha) / (alpha - 1) - n ** -alpha / 2


def _fwe_text(options: dict, rng: Random, size: int, resources: Resources, length: int):
    vocab_size = max((length - 50) // 50, 10)  # RULER's default: (length - its 50-token budget) // 50
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=options["word_length"])))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    alpha = options["alpha"]
    counts = [int(size * k ** -alpha / _zeta(alpha)) for k in range(1, vocab_size + 1)]
    words = [word for word, count in zip(vocab, counts) for _ in range(count)]
    Random(rng.getrandbits(64)).shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4]


def task_text(task: Task, seed_key: str, size: int, resources: Resources, length: int):
    """(question, answer prefix, answers) of one sample with `size` haystack units."""
    rng = Random(seed_key)
    if task.kind == "niah":
        return _niah_text(task.options, rng, size, resources)
    if task.kind == "variable_tracking":
        return _vt_text(task.options, rng, size, resources)
    if task.kind == "common_words":
        return _cwe_text(task.options, rng, size, resources, length)
    return _fwe_text(task.options, rng, size, resources, length)


def _max_size(task: Task, resources: Resources):
    """The largest haystack a task can make (None: unbounded)."""
    if task.kind == "common_words":
        return len(resources.all_words) - task.options["common"]
    return None


def _min_size(task: Task) -> int:
    """The smallest haystack a task is defined for."""
    if task.kind == "frequent_words":
        return 150  # the answers' counts (rank 2-4 of a Zipf law) stay distinct from rank 5's
    if task.kind == "variable_tracking":
        return task.options["chains"] * (task.options["hops"] + 1)
    return 4  # room for up to 4 needles between noise or needle lines


def render(tokenizer, question: str, prefix: str, chat_template: bool):
    """The prompt text and its token ids: the question as a user turn when `chat_template`, then the prefix."""
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True) + prefix.lstrip()
        return text, tokenizer(text, add_special_tokens=False).input_ids
    text = question + prefix
    return text, tokenizer(text).input_ids


def answer_budget(tokenizer, task: Task, answers: list) -> int:
    """Tokens generated at most: twice the reference answer's own (as the task's examples write it) plus a margin,
    room to restate each key before its value; never more than RULER's fixed budget for the task."""
    text = _numbered(answers) if task.kind == "common_words" else ", ".join(answers)
    own = len(tokenizer(" " + text, add_special_tokens=False).input_ids)
    return min(2 * own + ANSWER_MARGIN, max(task.ruler_budget, own))


def build_sample(tokenizer, task: Task, length: int, index: int, seed: int, resources: Resources,
                 chat_template: bool = False) -> Sample:
    """The sample with the largest haystack whose prompt plus answer budget fits `length` tokens (RULER's
    definition of a sample's length). Raises ValueError when even the smallest haystack does not fit."""
    seed_key = f"{seed}/{task.name}/{length}/{index}"

    def make(size):
        question, prefix, answers = task_text(task, seed_key, size, resources, length)
        text, ids = render(tokenizer, question, prefix, chat_template)
        return text, ids, answers

    low = _min_size(task)
    text, ids, answers = make(low)
    budget = length - answer_budget(tokenizer, task, answers)
    if len(ids) > budget:
        raise ValueError(f"lengths: {length} tokens is too short for task {task.name!r}: its smallest prompt takes "
                         f"{len(ids)} tokens plus {length - budget} for the answer")
    per_unit = max(len(ids), 1) / low
    high, largest = low, _max_size(task, resources)
    best = (low, text, ids)
    while True:  # grow until the prompt no longer fits, then bisect
        high = max(high * 2, int(budget / per_unit * 1.2))
        if largest is not None and high >= largest:
            high = largest
            text, ids, _ = make(high)
            if len(ids) <= budget:
                raise ValueError(f"lengths: {length} tokens is too long for task {task.name!r}: its largest prompt "
                                 f"({largest} distinct words, all the word list has) takes only {len(ids)} tokens")
            break
        if high > 64 * length:
            raise ValueError(f"task {task.name!r}: the prompt stays under {length} tokens however large its haystack "
                             f"({len(ids)} tokens with {best[0]} units); the tokenizer does not encode the text")
        text, ids, _ = make(high)
        if len(ids) > budget:
            break
        best, low = (high, text, ids), high
    while high - low > 1:
        middle = (low + high) // 2
        text, ids, _ = make(middle)
        if len(ids) <= budget:
            best, low = (middle, text, ids), middle
        else:
            high = middle
    size, text, ids = best
    return Sample(task=task.name, length=length, index=index, prompt=text, input_ids=list(ids), answers=answers,
                  max_new_tokens=length - budget, size=size)


def build_samples(tokenizer, task_names, lengths, samples: int, seed: int = 0, chat_template: bool = False,
                  haystack_file=None, progress: bool = False) -> list:
    """Every (task, length, index) sample, in that order; the same for every method evaluated on them."""
    from tqdm.auto import tqdm

    resources = Resources(haystack_file)
    cells = [(name, length) for length in lengths for name in task_names]
    built = []
    for name, length in tqdm(cells, desc="RULER samples", disable=not progress):
        built += [build_sample(tokenizer, TASKS[name], length, i, seed, resources, chat_template)
                  for i in range(samples)]
    return built, resources


def check_task_names(names) -> list:
    if isinstance(names, str) or not names:
        raise TypeError(f"ruler_tasks (--ruler-tasks) must be a non-empty list of task names, got {names!r}")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"ruler_tasks (--ruler-tasks): unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))

