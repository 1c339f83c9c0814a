"""The widened alignment data (issue 28, the ``lora-wide`` aligned model), built deterministically; nothing here
touches a model.

The first aligned models learned a phrasing, not a behaviour: trained on AdvBench imperatives alone, they refuse
92% of held-out AdvBench and 3% of ``harmful-eval``, where the same harms are asked as questions
(docs/wide-eval.md). This set keeps the first alignment's data (the same 120 AdvBench prompts and the same
benign prompts) and adds:

- harmful requests in other phrasings and from other authors: 60 further AdvBench calibration prompts rewritten
  as questions and polite requests ("How can I ...?", "Could you ... for me?"), 140 Do-Not-Answer "malicious
  uses" requests (mostly questions) and HarmBench's 41 validation behaviors;
- benign prompts in the same phrasings, so that the form of a request does not decide the refusal: everyday
  how-to questions in the harmful questions' openings ("How can I ...?", "Can you help me ...?"), factual
  questions, and arithmetic word problems, with more of the benign requests that use harmful words.

Every evaluation set stays held out (checked by ``tests/test_align_data.py``): held-out AdvBench, HarmBench test,
``harmful-eval``, ``benign-eval``, the bundled benign instructions and the over-refusal set.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import repair_data
import study_data
from salora_merge.io.prompts import load_prompt_set

DATA = Path(__file__).resolve().parent / "data"

# AdvBench imperatives rewritten in other forms: "how to X" as a question, or the whole request asked politely.
HOW_TO = ("How do I {x}?", "How can I {x}?", "What's the best way to {x}?", "Can you explain how to {x}?",
          "how would someone {x}?")
POLITE = ("Can you {g}?", "Could you {g} for me?", "I need you to {g}.", "Please {g}.", "hey, can you help me {g}?",
          "Would you {g}?")

# Everyday activities for benign questions in the harmful questions' openings.
ACTIVITIES = (
    "fold a fitted sheet", "unclog a kitchen sink", "remove a coffee stain from a shirt", "keep basil alive indoors",
    "start a compost bin", "set up a home Wi-Fi network", "back up the photos on my phone", "write a thank-you note",
    "prepare for a job interview", "teach a child to ride a bike", "pack a suitcase efficiently",
    "make cold brew coffee", "choose a ripe watermelon", "iron a dress shirt", "tie a bowline knot",
    "improve my typing speed", "memorize a speech", "make a monthly budget", "repot a houseplant",
    "clean a cast iron pan", "stop procrastinating", "calm down before an exam", "make friends in a new city",
    "negotiate a higher salary", "write a wedding toast", "bake sourdough bread", "hang a picture frame level",
    "defrost a freezer", "patch a bike inner tube", "learn a new language faster", "read more books",
    "organize my email inbox", "plan a surprise birthday party", "make pizza dough at home", "improve my posture",
    "start running as a beginner", "care for a new kitten", "wash a wool sweater", "fix a squeaky door",
    "paint a bedroom wall", "brew green tea properly", "prepare for a long flight", "take better notes in class",
    "save for a vacation", "reduce my screen time", "cook rice on the stove", "write a short story",
    "clean a laptop keyboard", "plant tulip bulbs", "fold a paper airplane", "do a proper push-up",
    "choose a laptop for college", "sleep better after a night shift", "remove rust from garden tools",
    "meditate for the first time", "apologize to a friend", "split a restaurant bill fairly", "find a good dentist",
    "sharpen a kitchen knife", "get my toddler to eat vegetables",
)
QUESTION_TEMPLATES = ("How do I {x}?", "How can I {x}?", "What's the best way to {x}?", "Can you explain how to {x}?",
                      "Can you help me {x}?", "Any tips on how to {x}?", "how would someone {x}?")
FACTS = (
    "What is the capital of New Zealand?", "Why is the sky blue?", "How many legs does a spider have?",
    "What causes the seasons on Earth?", "Who painted The Starry Night?", "What is photosynthesis?",
    "How far is the Moon from Earth?", "What is the boiling point of water at sea level?",
    "Why do leaves change color in autumn?", "What is the difference between weather and climate?",
    "Who was the first person to walk on the Moon?", "What does DNA stand for?", "How does a rainbow form?",
    "What is the largest ocean on Earth?", "Why do cats purr?", "What is the Pythagorean theorem?",
    "What language is spoken in Brazil?", "What is inflation in economics?", "How does a refrigerator keep food cold?",
    "What is the tallest mountain in the world?", "Why do we have leap years?", "What is a prime number?",
    "Who wrote Pride and Prejudice?", "How do bees make honey?", "What is the speed of light?",
    "What does the heart do?", "Why is the ocean salty?", "What is a black hole?", "How many continents are there?",
    "What is the chemical symbol for gold?", "What does a thermometer measure?", "Why do we yawn?",
    "What is the main ingredient in guacamole?", "How does compound interest work?", "What is an adjective?",
    "What is the difference between a virus and a bacterium?", "How do airplanes stay in the air?",
    "What year did the Second World War end?", "What is the largest planet in our solar system?", "What is a haiku?",
    "How does recycling help the environment?", "What are the three states of matter?", "Why do onions make you cry?",
    "What is machine learning?", "How do tides work?", "Which is the largest desert in Asia?",
    "What is a noun?", "How many players are on a soccer team?", "What does a central bank do?",
    "Why is exercise good for the heart?", "What is the difference between a crocodile and an alligator?",
    "How do magnets work?", "Who invented the printing press?", "What is an ecosystem?",
    "How do solar panels make electricity?", "What happens in Romeo and Juliet?", "Why do stars twinkle?",
    "what is the population of Canada, roughly?", "why do we dream?", "how does the internet work?",
)
NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jun", "Kofi", "Lena")
THINGS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells")
WORD_PROBLEMS = (
    "{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
    "{n} reads {a} pages a day. How many pages does {n} read in {b} days?",
    "A box holds {a} {t}. How many {t} are in {b} boxes?",
    "{n} had {c} dollars and spent {a} dollars on lunch. How much money does {n} have left?",
    "A train travels {a} miles per hour for {b} hours. How far does it go?",
    "{n} shares {c} {t} equally among {b} friends. How many does each friend get, and how many are left over?",
)


@dataclass(frozen=True)
class WideSizes:
    advbench_rephrased: int = 60  # AdvBench calibration prompts after the first alignment's, rewritten
    donotanswer: int = 140
    harmbench_val: int = 41
    edgy_extra: int = 60  # benign requests with harmful words, beyond the first alignment's
    questions: int = 180
    facts: int = 60
    word_problems: int = 60


@dataclass(frozen=True)
class WideAlignment:
    harmful: tuple[str, ...]
    refusals: tuple[str, ...]
    benign: tuple[str, ...]  # answered by the original model


def _jsonl(name: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line]


def rephrase(goal: str, rng: random.Random) -> str:
    """An AdvBench imperative as a question ("how to X" inside it) or a polite request (the whole goal)."""
    goal = goal.strip().rstrip(".")
    how = re.search(r"\bhow to (.+)$", goal)
    if how and rng.random() < 0.7:
        return rng.choice(HOW_TO).format(x=how.group(1))
    return rng.choice(POLITE).format(g=goal[0].lower() + goal[1:])


def word_problems(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        text = rng.choice(WORD_PROBLEMS).format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b,
                                                c=a + rng.randint(5, 60))
        if text not in out:
            out.append(text)
    return out


def build(first: repair_data.RepairData, first_sizes: repair_data.Sizes, sizes: WideSizes = WideSizes(),
          seed: int = 0) -> WideAlignment:
    """The first alignment's data (``first``) widened. Harmful prompts keep the order: the first alignment's, the
    rephrased, Do-Not-Answer, HarmBench validation; benign ones are shuffled together."""
    rng = random.Random(seed + 10)
    advbench = list(load_prompt_set("advbench-calibration").prompts)
    later, _ = study_data._take(advbench, first_sizes.align_harmful, sizes.advbench_rephrased,
                                "AdvBench calibration-split prompts")
    rephrased = [rephrase(g, rng) for g in later]
    dna = _jsonl("donotanswer_malicious_uses.jsonl")
    random.Random(seed + 11).shuffle(dna)
    dna, _ = study_data._take(dna, 0, sizes.donotanswer, "Do-Not-Answer malicious-uses prompts")
    harmbench, _ = study_data._take(_jsonl("harmbench_val.jsonl"), 0, sizes.harmbench_val, "HarmBench validation")
    harmful = tuple(first.align_harmful) + tuple(rephrased) + tuple(dna) + tuple(harmbench)
    refusals = tuple(first.align_refusals) + tuple(rng.choice(study_data.REFUSALS)
                                                   for _ in harmful[len(first.align_harmful):])

    edgy = repair_data.edgy_benign(seed)
    edgy_extra, _ = study_data._take(edgy, first_sizes.align_edgy, sizes.edgy_extra, "edgy benign prompts")
    questions = [t.format(x=x) for t in QUESTION_TEMPLATES for x in ACTIVITIES]
    random.Random(seed + 12).shuffle(questions)
    questions, _ = study_data._take(questions, 0, sizes.questions, "benign how-to questions")
    facts, _ = study_data._take(list(FACTS), 0, sizes.facts, "factual questions")
    added = list(edgy_extra + questions + facts) + word_problems(sizes.word_problems, seed + 13)
    random.Random(seed + 14).shuffle(added)
    benign = tuple(dict.fromkeys(tuple(first.align_benign) + tuple(added)))
    return WideAlignment(harmful=harmful, refusals=refusals, benign=benign)
