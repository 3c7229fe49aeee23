"""Built-in vocabulary and the random items the tasks hide: keys, numbers, UUIDs, variable names,
pseudo-words. Everything is drawn from a `random.Random`, so a seed fixes it on every platform.

The prose word lists hold no digits and none of the words the needles use ("magic", "number",
"VAR", "value"), so a needle's key and value occur in a context only where the task put them.
"""

from __future__ import annotations

import random
import uuid as uuid_lib

NAMES = (
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Henry", "Iris", "Jonas", "Karen", "Leo",
    "Maya", "Nora", "Oscar", "Paula", "Quinn", "Rosa", "Samuel", "Tara", "Ulrich", "Vera", "Walter", "Yara",
    "Zoe", "Martin", "Lucy", "Peter", "Sofia", "Thomas", "Alice", "Hugo", "Emma", "Victor", "Julia", "Mark",
)
PLACES = (
    "the market", "the harbor", "the old mill", "the library", "the village square", "the river bank",
    "the train station", "the garden", "the kitchen", "the workshop", "the school", "the bakery",
    "the hill", "the forest", "the bridge", "the museum", "the farm", "the office", "the beach",
    "the valley", "the castle", "the park", "the church", "the factory", "the port", "the island",
    "the meadow", "the tower", "the cellar", "the lake",
)
ADJECTIVES = (
    "old", "young", "quiet", "bright", "small", "large", "gentle", "busy", "careful", "curious", "happy",
    "tired", "clever", "brave", "calm", "cold", "warm", "dark", "early", "late", "strange", "simple",
    "heavy", "light", "narrow", "wide", "green", "blue", "red", "yellow", "silver", "golden", "wooden",
    "patient", "honest", "proud", "shy", "loud", "soft", "rough", "smooth", "sharp", "fresh", "ancient",
    "modern", "distant", "nearby", "hidden", "famous", "humble", "lucky", "rare", "plain", "sudden",
)
NOUNS = (
    "teacher", "farmer", "doctor", "baker", "sailor", "painter", "student", "child", "neighbor", "traveler",
    "merchant", "writer", "driver", "gardener", "fisherman", "engineer", "musician", "carpenter", "nurse",
    "dog", "cat", "horse", "bird", "fox", "rabbit", "goat", "river", "mountain", "road", "house", "door",
    "window", "table", "chair", "lamp", "book", "letter", "map", "basket", "boat", "wagon", "bell", "clock",
    "garden", "field", "tree", "flower", "stone", "cloud", "storm", "song", "story", "picture", "candle",
    "bread", "apple", "coat", "hat", "key", "box", "rope", "ladder", "bottle", "blanket", "mirror", "kettle",
)
VERBS = (
    "found", "carried", "painted", "watched", "repaired", "opened", "closed", "visited", "cleaned",
    "followed", "described", "remembered", "noticed", "moved", "built", "sold", "bought", "borrowed",
    "returned", "shared", "checked", "measured", "collected", "covered", "lifted", "pulled", "pushed",
    "washed", "studied", "admired", "ignored", "counted", "sorted", "packed", "wrapped", "chose",
)
ADVERBS = (
    "slowly", "quickly", "quietly", "carefully", "happily", "gladly", "eagerly", "calmly", "gently",
    "proudly", "suddenly", "patiently", "silently", "bravely", "politely", "warmly", "softly", "firmly",
)
TIMES = (
    "in the morning", "at noon", "in the evening", "at night", "on Monday", "on Friday", "last week",
    "every spring", "before dinner", "after the rain", "during the winter", "at dawn", "later that day",
    "on a cold afternoon", "in early summer", "the next day",
)
CONNECTIVES = ("Then", "Later", "Meanwhile", "Afterwards", "Soon", "Still", "Once again", "At last")

# {n}: name, {a}: adjective, {o}/{o2}: noun, {v}: verb, {d}: adverb, {p}: place, {t}: time, {c}: connective.
TEMPLATES = (
    "{n} {v} the {a} {o} near {p}.",
    "The {a} {o} stood {t} beside {p}.",
    "{t_cap}, {n} {d} {v} a {a} {o}.",
    "Nobody {v} the {o} that {n} had left at {p}.",
    "{c}, the {a} {o} and the {o2} waited at {p}.",
    "{n} said that the {o} at {p} was {a}.",
    "The {o} was {a}, so {n} {d} {v} it.",
    "At {p}, a {a} {o} {v} the {o2} {t}.",
    "{n} walked to {p} {t} and {v} the {o}.",
    "Everyone at {p} knew the {a} {o} of {n}.",
    "{c}, {n} {v} an old {o} and a {a} {o2}.",
    "The {o2} near {p} looked {a} {t}.",
    "{n} and the {o} {d} crossed {p}.",
    "It was {a} at {p}, and the {o} {v} the {o2}.",
    "{n} often {v} the {o} while the {o2} rested.",
    "A {a} {o} belonged to {n}, who lived near {p}.",
    "{c}, the {o} {d} {v} the {a} {o2}.",
    "{n} kept the {a} {o} in a box at {p}.",
    "The {a} {o2} reminded {n} of {p}.",
    "{t_cap}, the {o} at {p} seemed {a} and {a2}.",
)

# RULER's "noise" haystack (Hsieh et al. 2024), repeated.
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# Pseudo-words that would be real words of the task headers and questions.
_FUNCTION_WORDS = {"some", "more", "are", "here", "line", "lines", "most", "same", "time", "have", "were", "note",
                   "below", "above", "words", "list", "value", "what", "which"}
_KEY_ADJECTIVES = ADJECTIVES
_KEY_NOUNS = NOUNS
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


def prose_sentence(rng: random.Random) -> str:
  """One sentence of plausible English prose from the templates."""
  t = TEMPLATES[rng.randrange(len(TEMPLATES))]
  time = TIMES[rng.randrange(len(TIMES))]
  fields = dict(n=NAMES[rng.randrange(len(NAMES))], a=ADJECTIVES[rng.randrange(len(ADJECTIVES))],
                a2=ADJECTIVES[rng.randrange(len(ADJECTIVES))], o=NOUNS[rng.randrange(len(NOUNS))],
                o2=NOUNS[rng.randrange(len(NOUNS))], v=VERBS[rng.randrange(len(VERBS))],
                d=ADVERBS[rng.randrange(len(ADVERBS))], p=PLACES[rng.randrange(len(PLACES))], t=time,
                t_cap=time[0].upper() + time[1:], c=CONNECTIVES[rng.randrange(len(CONNECTIVES))])
  s = t.format(**fields)
  return s[0].upper() + s[1:]


def distinct(rng: random.Random, draw, k: int, avoid=()) -> list:
  """k distinct items from `draw(rng)`, none of them in `avoid`."""
  seen, out = set(avoid), []
  for _ in range(100 * k + 1000):
    if len(out) == k:
      return out
    x = draw(rng)
    if x not in seen:
      seen.add(x)
      out.append(x)
  if len(out) == k:
    return out
  raise ValueError(f"could not draw {k} distinct items (the item space is too small)")


def key_word(rng: random.Random) -> str:
  """A NIAH key: "adjective-noun", e.g. "silver-lantern"."""
  return f"{_KEY_ADJECTIVES[rng.randrange(len(_KEY_ADJECTIVES))]}-{_KEY_NOUNS[rng.randrange(len(_KEY_NOUNS))]}"


def number(rng: random.Random, digits: int) -> str:
  """A `digits`-digit decimal number without a leading zero."""
  return str(rng.randrange(10 ** (digits - 1), 10**digits))


def uuid(rng: random.Random) -> str:
  """A version-4 UUID string drawn from `rng`."""
  return str(uuid_lib.UUID(int=rng.getrandbits(128), version=4))


def var_name(rng: random.Random, length: int = 5) -> str:
  """A variable-tracking name: `length` upper-case letters, as in RULER."""
  return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(length))


def pseudo_word(rng: random.Random) -> str:
  """A pronounceable made-up word of 2-3 consonant-vowel syllables, e.g. "bamolu"."""
  return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def coded_word(rng: random.Random, length: int = 6) -> str:
  """RULER's "coded" word for frequent-words extraction: `length` random lower-case letters."""
  return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


def word_stream(rng: random.Random):
  """An endless stream of distinct words: the built-in nouns, adjectives, verbs and adverbs shuffled,
  then pseudo-words. Returns a function `first(k) -> list[str]`."""
  real = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS) | set(ADVERBS))
  rng.shuffle(real)
  out, seen = list(real), set(real) | _FUNCTION_WORDS

  def first(k: int) -> list[str]:
    while len(out) < k:
      w = pseudo_word(rng)
      if w not in seen:
        seen.add(w)
        out.append(w)
    return out[:k]
  return first
