"""Synthetic long-context tasks (lcinfer.eval): determinism, lengths in tokens of a sentencepiece
tokenizer trained here on `training_corpus`, needle depth, answers in the context, scoring, SCBench
sessions."""

import json
import random
import re
import time

import pytest
import sentencepiece as spm

from lcinfer import eval as lce
from lcinfer.checkpoint.tokenizer import Tokenizer
from lcinfer.errors import ConfigError

TASK_NAMES = ("cwe", "fwe", "kv_uuid", "niah_multikey", "niah_multiquery", "niah_multivalue", "niah_single", "vt")
NEEDLE_TASKS = ("kv_uuid", "niah_multikey", "niah_multiquery", "niah_multivalue", "niah_single")
MULTI_ANSWER = ("cwe", "fwe", "niah_multiquery", "niah_multivalue", "vt")


@pytest.fixture(scope="module")
def sp_count(tmp_path_factory):
  """count_tokens of a 1000-piece sentencepiece BPE (byte fallback) trained on training_corpus."""
  d = tmp_path_factory.mktemp("sp")
  (d / "corpus.txt").write_text(lce.training_corpus(300_000, seed=0))
  spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=1000,
                                 model_type="bpe", byte_fallback=True, split_digits=True,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False,
                                 minloglevel=2, num_threads=2)
  return lce.token_counter(Tokenizer.from_dir(d))


def test_registry_lists_tasks_and_rejects_unknown_names():
  assert lce.available_tasks() == TASK_NAMES
  assert set(lce.TASKS) == set(TASK_NAMES)
  with pytest.raises(ConfigError, match="unknown task 'niah'; available tasks: cwe, fwe, kv_uuid") as e:
    lce.make_sample("niah", 1000)
  assert all(n in str(e.value) for n in TASK_NAMES)
  with pytest.raises(ConfigError, match="available tasks"):
    lce.score(lce.Sample("c", "q", ("a",), "nope"), "a")
  with pytest.raises(ConfigError, match="no option.*num_keys.*num_distractors=3"):
    lce.make_sample("niah_multikey", 1000, num_keys=2)
  with pytest.raises(ConfigError, match="depth must be None"):
    lce.make_sample("niah_single", 1000, depth=1.5)
  with pytest.raises(ConfigError, match="length_tokens must be a positive int"):
    lce.make_sample("niah_single", 0)
  with pytest.raises(ConfigError, match="too short for task 'niah_single'.*at least"):
    lce.make_sample("niah_single", 10)
  with pytest.raises(ConfigError, match="seed must be an int"):
    lce.make_sample("niah_single", 1000, seed="0")
  with pytest.raises(ConfigError, match="haystack must be 'prose', 'noise' or a Haystack"):
    lce.make_sample("niah_single", 1000, haystack="essays")
  with pytest.raises(ConfigError, match="unknown SCBench task 'qa'; available: kv, prefix_suffix, vt, mf"):
    lce.make_session("qa", 1000)
  with pytest.raises(ConfigError, match="unknown protocol 'batch'; available: multi_turn, multi_request"):
    lce.make_session("kv", 1000, protocol="batch")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_sample(name):
  a, b = lce.make_sample(name, 600, depth=0.3, seed=7), lce.make_sample(name, 600, depth=0.3, seed=7)
  assert a == b
  assert lce.make_sample(name, 600, depth=0.3, seed=8) != a
  assert lce.make_sample(name, 600, depth=0.3, seed=random.Random(7)) == lce.make_sample(
      name, 600, depth=0.3, seed=random.Random(7))
  assert lce.Sample.from_dict(json.loads(json.dumps(a.to_dict()))) == a  # meta is JSON-serialisable


@pytest.mark.parametrize("length", [1024, 4096, 16384])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompt_length_in_tokens(sp_count, name, length):
  s = lce.make_sample(name, length, depth=0.5, seed=3, count_tokens=sp_count)
  n = sp_count(s.prompt)
  assert length - lce.tolerance(length) <= n <= length, (n, length)
  assert s.meta["prompt_tokens"] == n and s.meta["context_tokens"] == sp_count(s.context)
  assert s.prompt == s.context + s.question and s.question.startswith("\n") and "\nAnswer:" in s.question


@pytest.mark.parametrize("name", TASK_NAMES)
def test_whitespace_count_fallback(name):
  s = lce.make_sample(name, 2000, seed=1)
  assert 2000 - lce.tolerance(2000) <= lce.whitespace_count(s.prompt) <= 2000


def test_16k_sample_is_fast(sp_count):
  lce.make_sample("niah_single", 1024, seed=0, count_tokens=sp_count)
  t = time.perf_counter()
  lce.make_sample("niah_single", 16384, depth=0.5, seed=1, count_tokens=sp_count)
  assert time.perf_counter() - t < 0.5


@pytest.mark.parametrize("name", NEEDLE_TASKS)
def test_depth_places_the_needle(sp_count, name):
  ranges = {0.0: (0.0, 0.05), 0.5: (0.45, 0.55), 1.0: (0.95, 1.0)}
  for depth, (lo, hi) in ranges.items():
    s = lce.make_sample(name, 4096, depth=depth, seed=11, count_tokens=sp_count)
    nd = s.meta["needles"][0]  # the needle placed at `depth` (the others are distractors or go at random)
    assert s.meta["depth"] == depth
    assert lo <= nd["token_offset"] / s.meta["context_tokens"] <= hi, (depth, nd)
    assert nd["token_offset"] == sp_count(s.context[:nd["char_offset"]].rstrip())
    needle_start = s.context[nd["char_offset"]:]
    assert needle_start.startswith(nd.get("text", f'"{nd["key"]}": "{nd["value"]}"'))
    assert nd["value"] in s.answers


def test_depth_between_sentences_and_drawn_when_none():
  s = lce.make_sample("niah_single", 800, depth=0.5, seed=0)
  nd = s.meta["needles"][0]
  before = s.context[:nd["char_offset"]]
  assert before.endswith(". ") and s.context[nd["char_offset"] + len(nd["text"]):].startswith(" ")
  depths = {lce.make_sample("niah_single", 400, seed=i).meta["depth"] for i in range(5)}
  assert len(depths) == 5 and all(0 <= d <= 1 for d in depths)
  assert lce.make_sample("niah_single", 400, seed=0).meta["requested_depth"] is None


def test_vt_chain_is_spread_around_depth(sp_count):
  for depth in (0.0, 1.0):
    s = lce.make_sample("vt", 4096, depth=depth, seed=5, count_tokens=sp_count)
    hops = [nd for nd in s.meta["needles"] if nd["role"] == "target"]
    assert [nd["var"] for nd in hops] == list(s.answers) and len(hops) == 5
    offsets = [nd["char_offset"] for nd in hops]
    assert offsets == sorted(offsets)  # the chain reads in order
    end = hops[0] if depth == 0 else hops[-1]
    assert abs(end["token_depth"] - depth) <= 0.05
    value = s.question.split("value ")[1].split("?")[0]
    assert f"VAR {s.answers[0]} = {value}." in s.context
    for a, b in zip(s.answers, s.answers[1:]):
      assert f"VAR {b} = VAR {a}." in s.context


@pytest.mark.parametrize("name", TASK_NAMES)
def test_answers_occur_in_context(name):
  for seed in range(4):
    s = lce.make_sample(name, 700, seed=seed)
    assert s.answers and len(set(s.answers)) == len(s.answers)
    for a in s.answers:
      assert re.search(r"(?<![0-9A-Za-z])" + re.escape(a) + r"(?![0-9A-Za-z])", s.context), (name, a)
    assert s.target == " " + ", ".join(s.answers)


def test_needle_answers_are_unique_to_the_needle():
  s = lce.make_sample("niah_multikey", 1500, depth=0.2, seed=2)
  key = s.meta["needles"][0]["key"]
  assert s.context.count(s.answers[0]) == 1
  assert f"The special magic number for {key} is {s.answers[0]}." in s.context
  assert s.question == f"\nQuestion: What is the special magic number for {key}?\nAnswer: The special magic number for {key} is"
  assert sum(nd["role"] == "distractor" for nd in s.meta["needles"]) == 3
  s = lce.make_sample("kv_uuid", 1500, depth=0.7, seed=2)
  assert s.context.count(s.answers[0]) == 1 and f'": "{s.answers[0]}"' in s.context


def test_aggregation_counts():
  s = lce.make_sample("cwe", 3000, seed=4)
  items = re.findall(r"\d+\. (\S+)", s.context)
  counts = {w: items.count(w) for w in set(items)}
  cf, uf = s.meta["common_freq"], s.meta["uncommon_freq"]
  assert cf > uf and len(s.answers) == 10
  assert all(counts[w] == cf for w in s.answers)
  assert all(c == uf for w, c in counts.items() if w not in s.answers)
  s = lce.make_sample("fwe", 3000, seed=4)
  words = s.context.splitlines()[1].split()
  counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
  assert tuple(w for _, w in counts[:3]) == s.answers and counts[2][0] > counts[3][0]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_scoring(name):
  s = lce.make_sample(name, 700, seed=1)
  assert lce.score(s, s.target) == 1.0
  assert lce.score(s, " ".join(reversed(s.answers)).upper()) == 1.0  # order and case do not matter
  assert lce.score(s, "I do not know.") == 0.0
  if name in MULTI_ANSWER:
    assert lce.score(s, f"{s.answers[0]} and nothing else") == pytest.approx(1 / len(s.answers))


def test_scoring_wants_whole_answers():
  s = lce.make_sample("niah_single", 500, seed=0)
  glued = "9" + s.answers[0]
  assert lce.score(s, glued) == 0.0 and lce.score(s, glued, whole_word=False) == 1.0
  assert lce.score(s, f"The number is {s.answers[0]}.") == 1.0


def test_noise_and_user_haystacks():
  s = lce.make_sample("niah_single", 600, depth=0.5, seed=0, haystack="noise")
  assert s.meta["haystack"] == "noise" and "The grass is green. The sky is blue." in s.context
  text = "Alpha beta gamma. Delta epsilon!\n\nZeta eta theta? Iota kappa lambda mu."
  hay = lce.Haystack.from_text(text)
  assert hay.sentences == ("Alpha beta gamma.", "Delta epsilon!", "Zeta eta theta?", "Iota kappa lambda mu.")
  s = lce.make_sample("niah_multivalue", 800, depth=0.0, seed=0, haystack=hay)
  body = s.context[len(s.context.split("\n")[0]) + 1:]
  for nd in s.meta["needles"]:
    body = body.replace(nd["text"] + " ", "").replace(" " + nd["text"], "")
  assert body.startswith("Alpha beta gamma. Delta epsilon! Zeta eta theta? Iota kappa lambda mu. Alpha beta")
  assert 800 - lce.tolerance(800) <= lce.whitespace_count(s.prompt) <= 800
  with pytest.raises(ConfigError, match="non-empty string"):
    lce.Haystack.from_text("  ")


@pytest.mark.parametrize("protocol", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("task", ["kv", "prefix_suffix", "vt", "mf"])
def test_scbench_sessions(sp_count, task, protocol):
  s = lce.make_session(task, 2048, num_turns=4, protocol=protocol, seed=0, count_tokens=sp_count)
  assert (s.task, s.protocol, len(s.turns)) == (task, protocol, 4)
  assert 2048 - lce.tolerance(2048) <= sp_count(s.context) <= 2048
  assert s.meta["context_tokens"] == sp_count(s.context)
  prompts = lce.session_prompts(s)
  assert len(prompts) == 4 and all(p.startswith(s.context) for p in prompts)
  answers = [t.answers for t in s.turns]
  assert len(set(answers)) == 4  # every turn asks something different
  for t in s.turns:
    assert all(a in s.context for a in t.answers)
  if protocol == "multi_turn":
    for i in range(3):
      assert prompts[i + 1] == prompts[i] + s.turns[i].target + s.turns[i + 1].question
    own = ["first reply", "second reply", "third reply"]
    mine = lce.session_prompts(s, responses=own + ["unused"])
    assert mine[0] == prompts[0] and mine[3] == s.context + "".join(
        t.question + r for t, r in zip(s.turns, own)) + s.turns[3].question
  else:
    assert prompts == tuple(s.context + t.question for t in s.turns)
  assert lce.score_session(s, [t.target for t in s.turns]) == (1.0,) * 4
  assert lce.score_session(s, ["no idea"] * 4) == (0.0,) * 4


def test_scbench_task_contents():
  s = lce.make_session("prefix_suffix", 1500, num_turns=3, seed=1)
  lines = s.context.splitlines()[1:]
  for t in s.turns:
    p, suf = re.findall(r'"(\w+)"', t.question)
    assert [x for x in lines if x.startswith(p) and x.endswith(suf)] == [t.answers[0]]
    assert sum(x.startswith(p) for x in lines) >= 2 and sum(x.endswith(suf) for x in lines) >= 2  # distractors
  s = lce.make_session("mf", 1500, num_turns=3, seed=1)
  lists = dict(re.findall(r"List (\w+): ([\d, ]+)", s.context))
  for t in s.turns:
    kind, name = re.search(r"the (largest|smallest) number in List (\w+)", t.question).groups()
    nums = [int(x) for x in lists[name].split(", ")]
    assert t.answers == (str(max(nums) if kind == "largest" else min(nums)),)
  with pytest.raises(ValueError, match="needs the 2 earlier responses"):
    lce.make_session("kv", 800, num_turns=3).prompt(2, responses=["a"])


def test_training_corpus():
  c = lce.training_corpus(50_000, seed=3)
  assert len(c) == 50_000 and c == lce.training_corpus(50_000, seed=3) and c != lce.training_corpus(50_000, seed=4)
  assert max(len(line) for line in c.splitlines()) <= 1000
  for pattern in (r"The special magic number for [a-z]+-[a-z]+ is \d{7}\.", r"VAR [A-Z]{5} = VAR [A-Z]{5}\.",
                  r'"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"', r"\d+\. [a-z]+ \d+\. [a-z]+",
                  r"Question: .*\?\nAnswer: \S"):
    assert re.search(pattern, c), pattern
