"""Write the small bundled preference dataset used by the default run (SPEC §5).

Original to this project. Every pair has a ground truth that a small instruct model can partly
recognise: correct vs. plausibly wrong arithmetic, unit conversions and simple facts, and polite vs.
rude replies. ``chosen`` is always the correct or polite reply. Rows are in the "standard" format
(``prompt``, ``chosen``, ``rejected``) plus ``task`` and ``ground_truth``, which readers ignore.
The output is deterministic: rerunning rewrites byte-identical files.

    python examples/data/make_bundled.py [--out-dir examples/data/bundled]
"""

from __future__ import annotations

import argparse
import json
import random
from itertools import product
from pathlib import Path

SEED = 20250917
NUM_EVAL = 120
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "bundled"

# (singular, plural, smaller unit plural, factor, a plausible wrong factor)
CONVERSIONS = [
    ("kilometre", "kilometres", "metres", 1000, 100),
    ("metre", "metres", "centimetres", 100, 1000),
    ("centimetre", "centimetres", "millimetres", 10, 100),
    ("kilogram", "kilograms", "grams", 1000, 100),
    ("litre", "litres", "millilitres", 1000, 100),
    ("hour", "hours", "minutes", 60, 100),
    ("minute", "minutes", "seconds", 60, 100),
    ("day", "days", "hours", 24, 12),
    ("week", "weeks", "days", 7, 5),
    ("year", "years", "months", 12, 10),
]

# (country, capital, a plausible wrong answer: its best-known other city where that is a common
# mix-up, else a neighbour's capital)
CAPITALS = [
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("India", "New Delhi", "Mumbai"),
    ("Australia", "Canberra", "Sydney"),
    ("Canada", "Ottawa", "Toronto"),
    ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Norway", "Oslo", "Stockholm"),
    ("Sweden", "Stockholm", "Oslo"),
    ("Finland", "Helsinki", "Tallinn"),
    ("Denmark", "Copenhagen", "Stockholm"),
    ("Poland", "Warsaw", "Krakow"),
    ("Austria", "Vienna", "Budapest"),
    ("Hungary", "Budapest", "Vienna"),
    ("Ireland", "Dublin", "Belfast"),
    ("Netherlands", "Amsterdam", "Brussels"),
    ("Belgium", "Brussels", "Amsterdam"),
    ("Argentina", "Buenos Aires", "Santiago"),
    ("Chile", "Santiago", "Lima"),
    ("Peru", "Lima", "Santiago"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("South Korea", "Seoul", "Busan"),
    ("Thailand", "Bangkok", "Hanoi"),
    ("Vietnam", "Hanoi", "Bangkok"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Morocco", "Rabat", "Casablanca"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Cuba", "Havana", "Kingston"),
    ("Iceland", "Reykjavik", "Oslo"),
    ("Czech Republic", "Prague", "Vienna"),
    ("Ukraine", "Kyiv", "Lviv"),
]

# (question, correct answer, plausible wrong answer)
FACTS = [
    ("How many days are in a week?", "7", "5"),
    ("How many months are in a year?", "12", "10"),
    ("How many hours are in a day?", "24", "12"),
    ("How many minutes are in an hour?", "60", "100"),
    ("How many seconds are in a minute?", "60", "100"),
    ("How many legs does a spider have?", "8", "6"),
    ("How many legs does an insect have?", "6", "8"),
    ("How many sides does a triangle have?", "3", "4"),
    ("How many sides does a square have?", "4", "5"),
    ("How many sides does a hexagon have?", "6", "8"),
    ("How many sides does an octagon have?", "8", "6"),
    ("How many continents are there on Earth?", "7", "5"),
    ("How many planets are in the Solar System?", "8", "9"),
    ("How many days are in a leap year?", "366", "365"),
    ("How many players does a football (soccer) team have on the field?", "11", "10"),
    ("At what temperature in Celsius does water freeze at sea level?", "0", "10"),
    ("At what temperature in Celsius does water boil at sea level?", "100", "90"),
    ("Which planet is the largest in the Solar System?", "Jupiter", "Saturn"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus"),
    ("What is the chemical symbol for water?", "H2O", "CO2"),
    ("What is the chemical symbol for gold?", "Au", "Ag"),
    ("What gas do plants absorb from the air for photosynthesis?", "Carbon dioxide", "Oxygen"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", "The Atlantic Ocean"),
    ("What is the opposite of hot?", "Cold", "Warm"),
    ("Which day comes after Monday?", "Tuesday", "Wednesday"),
    ("Which month comes after March?", "April", "May"),
    ("Which month has the fewest days?", "February", "April"),
    ("What colour do you get by mixing blue and yellow?", "Green", "Purple"),
    ("How many cents are in a dollar?", "100", "10"),
]
FACT_STYLES = ["User: {q}\nAssistant:", "User: Quick question: {q}\nAssistant:"]

# (request, the same task addressed back to the user)
REQUESTS = [
    ("reset my password", "reset your password"),
    ("find my order number", "find your order number"),
    ("change my delivery address", "change your delivery address"),
    ("cancel my subscription", "cancel your subscription"),
    ("update my email address", "update your email address"),
    ("book a table for two", "book a table for two"),
    ("understand this error message", "understand this error message"),
    ("return a broken kettle", "return the broken kettle"),
    ("set up my new printer", "set up your new printer"),
    ("choose a birthday gift for my mother", "choose a gift for your mother"),
    ("plan a short trip to the coast", "plan your trip to the coast"),
    ("write a thank-you note", "write your thank-you note"),
    ("fix a typo in my report", "fix the typo in your report"),
    ("find the nearest pharmacy", "find the nearest pharmacy"),
    ("track my parcel", "track your parcel"),
    ("move my appointment to Friday", "move your appointment to Friday"),
    ("download my invoice", "download your invoice"),
    ("pick a name for my cat", "pick a name for your cat"),
    ("learn a few words of Spanish", "learn some Spanish words"),
    ("convert this file to PDF", "convert the file to PDF"),
    ("check the opening hours", "check the opening hours"),
    ("recover a deleted photo", "recover your photo"),
    ("organise my weekly schedule", "organise your schedule"),
    ("apply for a library card", "apply for a library card"),
    ("find a recipe for pancakes", "find a pancake recipe"),
]
ASKS = ["Can you help me {r}?", "Could you please help me {r}?", "I need to {r}. Can you help?"]
POLITE = [
    " Of course! I'd be happy to help you {t}.",
    " Certainly. Let's {t} together, step by step.",
    " Sure, happy to help. Here is how to {t}.",
    " Absolutely. I'll help you {t} right away.",
]
RUDE = [
    " Ugh, {t} yourself. I'm busy.",
    " Why should I? Figure out how to {t} on your own.",
    " That's a silly question. Just {t} yourself.",
    " Not my problem. Go {t} without bothering me.",
]


def _pair(task: str, prompt: str, chosen: str, rejected: str, truth: str) -> dict[str, str]:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "task": task,
        "ground_truth": truth,
    }


def _arithmetic(rng: random.Random) -> list[dict[str, str]]:
    pairs = []
    for a, b in rng.sample(list(product(range(11, 100), repeat=2)), 200):
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        prompt = f"User: What is {a} + {b}?\nAssistant:"
        chosen, rejected = f" {a} + {b} = {a + b}.", f" {a} + {b} = {wrong}."
        pairs.append(_pair("addition", prompt, chosen, rejected, str(a + b)))
    for a, b in rng.sample(list(product(range(2, 13), range(3, 16))), 110):
        wrong = a * b + rng.choice([-a, a, -1, 1])
        prompt = f"User: What is {a} times {b}?\nAssistant:"
        chosen, rejected = f" {a} x {b} = {a * b}.", f" {a} x {b} = {wrong}."
        pairs.append(_pair("multiplication", prompt, chosen, rejected, str(a * b)))
    return pairs


def _conversions() -> list[dict[str, str]]:
    pairs = []
    for singular, plural, small, factor, wrong_factor in CONVERSIONS:
        for amount in range(1, 10):
            unit = singular if amount == 1 else plural
            prompt = f"User: How many {small} are in {amount} {unit}?\nAssistant:"
            truth = amount * factor
            chosen = f" There are {truth} {small} in {amount} {unit}."
            rejected = f" There are {amount * wrong_factor} {small} in {amount} {unit}."
            pairs.append(_pair("unit_conversion", prompt, chosen, rejected, str(truth)))
    return pairs


def _facts() -> list[dict[str, str]]:
    pairs = []
    for style in FACT_STYLES:
        for country, capital, wrong in CAPITALS:
            prompt = style.format(q=f"What is the capital of {country}?")
            chosen = f" The capital of {country} is {capital}."
            rejected = f" The capital of {country} is {wrong}."
            pairs.append(_pair("capital", prompt, chosen, rejected, capital))
        for question, answer, wrong in FACTS:
            prompt = style.format(q=question)
            pairs.append(_pair("fact", prompt, f" {answer}.", f" {wrong}.", answer))
    return pairs


def _politeness(rng: random.Random) -> list[dict[str, str]]:
    pairs = []
    for request, task in REQUESTS:
        for ask in ASKS:
            prompt = f"User: {ask.format(r=request)}\nAssistant:"
            chosen = rng.choice(POLITE).format(t=task)
            rejected = rng.choice(RUDE).format(t=task)
            pairs.append(_pair("politeness", prompt, chosen, rejected, "polite"))
    return pairs


def build_pairs(seed: int = SEED) -> list[dict[str, str]]:
    """All bundled pairs in a seeded random order, one per distinct prompt."""
    rng = random.Random(seed)
    pairs = _arithmetic(rng) + _conversions() + _facts() + _politeness(rng)
    unique = list({pair["prompt"]: pair for pair in pairs}.values())
    rng.shuffle(unique)
    return unique


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_bundled(out_dir: Path) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (the last ``NUM_EVAL`` pairs) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = build_pairs()
    train, eval_ = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train, pairs[:-NUM_EVAL])
    _write_jsonl(eval_, pairs[-NUM_EVAL:])
    return train, eval_


def main() -> None:
    """Command line: write the bundled dataset (default: next to this script)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    train, eval_ = write_bundled(parser.parse_args().out_dir)
    print(f"wrote {train} and {eval_}")


if __name__ == "__main__":
    main()
