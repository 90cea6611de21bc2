"""Synthetic everyday-English sentences: unlabelled distillation inputs for sentence encoders.

A distillation teacher labels any text, so a student only needs inputs that
look like what it will embed. The one English text shipped with hwgen is the
tiny-gpt corpus (the Python docs); MiniLM's evaluation sentences are everyday
prose (people, places, weather, food, science facts, organisations). This
module writes such sentences from fixed templates and word lists, seeded and
deterministic, so distillation sees the vocabulary and sentence shapes of that
domain without ever reading the evaluation (or calibration) sentences.

:func:`sentences` gives ``n`` distinct sentences; ``tests/test_synth_sentences.py``
checks that none of them is an evaluation or calibration sentence.
"""
from __future__ import annotations

import numpy as np

#: word lists (slot name -> fillers); a template names a slot as ``{slot}`` or,
#: for a second independent filler of the same list, ``{slot2}``
WORDS: dict[str, tuple[str, ...]] = {
    "person": ("my neighbour", "the teacher", "our manager", "a young doctor", "the old farmer",
               "his sister", "the pilot", "a tourist", "the children", "my grandfather", "the nurse",
               "a local artist", "the students", "her brother", "the mayor", "a journalist", "the baker",
               "our guide", "the engineer", "my cousin", "the coach", "a stranger", "the police officer",
               "the waiter", "the scientist", "my friend", "the librarian", "the driver", "a small boy",
               "the twins", "the dentist", "our landlord", "the accountant", "a volunteer", "the chef"),
    "name": ("Anna", "David", "Maria", "Tom", "Priya", "Lucas", "Emma", "Omar", "Sofia", "James", "Chen",
             "Laura", "Mateo", "Grace", "Hassan", "Olivia", "Kenji", "Nora", "Samuel", "Elena"),
    "animal": ("cat", "dog", "horse", "rabbit", "parrot", "fox", "owl", "cow", "goat", "puppy", "kitten",
               "duck", "squirrel", "deer", "bear", "sheep"),
    "place": ("the park", "the station", "the market", "the library", "the beach", "the office",
              "the hospital", "the museum", "the airport", "the kitchen", "the garden", "the village",
              "the city centre", "the school", "the river", "the mountains", "the harbour", "the bakery",
              "the stadium", "the supermarket", "the hotel", "the farm", "the castle", "the bridge",
              "the forest", "the clinic", "the pharmacy", "the bank", "the factory", "the laboratory"),
    "time": ("yesterday", "this morning", "last week", "on Sunday", "every evening", "after lunch",
             "before dawn", "in the summer", "at midnight", "next month", "last night", "on weekends",
             "during the storm", "in winter", "at noon", "two days ago", "early on Friday",
             "every spring", "in 2019", "since March"),
    "object": ("a red umbrella", "the old piano", "two cups of coffee", "a new bicycle", "the front door",
               "a letter", "the keys", "a basket of apples", "the newspaper", "a warm coat", "the map",
               "a birthday cake", "the window", "a heavy suitcase", "the television", "a bunch of flowers",
               "the tickets", "a glass of water", "the lamp", "a wooden chair", "her phone", "the car",
               "a pair of shoes", "the report", "a loaf of bread", "the bill", "his camera",
               "the garden gate", "the laptop", "the prescription", "the contract", "a spare battery"),
    "food": ("soup", "rice", "bread", "cheese", "pasta", "salad", "fish", "eggs", "chocolate", "tea",
             "orange juice", "pancakes", "vegetables", "strawberries", "noodles", "honey"),
    "adj": ("quiet", "busy", "cold", "bright", "crowded", "beautiful", "small", "noisy", "peaceful",
            "empty", "warm", "dark", "huge", "friendly", "tired", "happy", "careful", "famous", "ancient",
            "modern"),
    "weather": ("Heavy rain", "A strong wind", "Thick fog", "Bright sunshine", "Light snow",
                "A sudden storm", "Freezing temperatures", "A warm breeze", "Thunder and lightning", "Hail"),
    "verb_past": ("opened", "found", "bought", "painted", "cleaned", "carried", "dropped", "fixed", "sold",
                  "borrowed", "lost", "washed", "moved", "checked", "wrapped", "delivered", "forgot",
                  "repaired", "replaced", "signed"),
    "activity": ("reading a book", "playing football", "cooking dinner", "walking the dog",
                 "learning Spanish", "watching a film", "writing a letter", "planting tomatoes",
                 "fixing the roof", "practising the violin", "painting the fence", "studying for an exam",
                 "waiting for the bus", "swimming in the lake", "shopping for groceries", "baking bread",
                 "riding a bicycle", "cleaning the house", "updating the software", "jogging by the river"),
    "subject": ("Photosynthesis", "Gravity", "The human heart", "Water", "The moon", "Electricity",
                "Sound", "The brain", "Volcanoes", "Bees", "Salt", "The ocean", "Earthquakes", "Light",
                "Vaccines", "The sun", "Plants", "Iron", "Glaciers", "The immune system"),
    "fact": ("pumps blood through the body", "boils at one hundred degrees Celsius at sea level",
             "travels faster than sound", "pulls objects toward the ground", "helps plants grow",
             "reflects light from the sun", "is made of billions of cells", "carries energy in waves",
             "forms when molten rock cools", "pollinate many flowering plants", "dissolves easily in water",
             "covers most of the planet", "protects the body from infection", "slowly shapes the valleys",
             "rusts when exposed to moist air", "controls the rhythm of the tides"),
    "org": ("The company", "The city council", "The government", "The bank", "The school board",
            "The museum", "The hospital", "The team", "The airline", "The university", "The library",
            "The committee", "The startup", "The central bank"),
    "org_action": ("announced a new plan", "will be closed on Monday", "raised its prices",
                   "opened a second branch", "hired twenty new staff", "cancelled the meeting",
                   "published its annual report", "approved the budget", "changed its opening hours",
                   "won the championship", "delayed the project", "received a large donation",
                   "reported higher profits", "cut interest rates", "launched a new app"),
    "feeling": ("excited", "nervous", "disappointed", "relieved", "surprised", "proud", "worried",
                "bored", "grateful", "confused"),
    "number": ("three", "five", "ten", "twelve", "twenty", "forty", "a hundred", "two", "seven", "fifty",
               "1.5", "8", "250"),
    "unit": ("minutes", "hours", "days", "kilometres", "people", "books", "euros", "years", "pages",
             "steps", "percent", "dollars"),
    "device": ("the phone", "the printer", "the laptop", "the router", "the camera", "the dishwasher",
               "the heater", "the car engine", "the website", "the app"),
    "problem": ("stopped working", "kept restarting", "made a strange noise", "ran out of battery",
                "needed an update", "crashed twice", "was too slow", "overheated"),
    "body": ("back", "knee", "head", "shoulder", "ankle", "wrist", "throat", "stomach"),
}

#: sentence templates over :data:`WORDS` (``_c``: first letter capitalised, ``_l``: lower-cased)
TEMPLATES: tuple[str, ...] = (
    "{person} {verb_past} {object} {time}.",
    "{name} {verb_past} {object} at {place}.",
    "The {animal} slept near {place} {time}.",
    "{weather} is expected {time}.",
    "{weather} closed the roads to {place} {time}.",
    "{subject} {fact}.",
    "{org} {org_action}.",
    "{org} {org_action} {time}.",
    "{name} was {feeling} when {person} arrived.",
    "We spent {number} {unit} at {place} {time}.",
    "{place_c} was {adj} and {adj2} {time}.",
    "{name} enjoys {activity} {time}.",
    "Is {place} {adj} {time}?",
    "Why did {person} leave {place} so early?",
    "{person_c} is {activity} at {place}.",
    "She ordered {food} and {food2} at a {adj} cafe.",
    "The train to {place} was delayed by {number} {unit}.",
    "{name} and {name2} met at {place} {time}.",
    "Please bring {object} when you come to {place}.",
    "After {activity}, {name} felt {feeling}.",
    "The {adj} {animal} ran across {place}.",
    "{person_c} told us that {subject_l} {fact}.",
    "Do not forget {object} before you go to {place}.",
    "Because of {weather_l}, {person} stayed at home.",
    "{name} has been {activity} for {number} {unit}.",
    "Our trip to {place} took {number} {unit}.",
    "{person_c} cooked {food} for the whole family.",
    "I think {place} is more {adj} than {place2}.",
    "{name} forgot {object} at {place} {time}.",
    "{person_c} will visit {place} {time}.",
    "{device_c} {problem} {time}.",
    "{name} asked {person} why {device} {problem}.",
    "{person_c} hurt {name}'s {body} while {activity}.",
    "The doctor said my {body} will heal in {number} {unit}.",
    "{org} said prices rose {number} {unit} {time}.",
    "How many {unit} does it take to reach {place}?",
    "{name} paid {number} {unit} for {object}.",
    "Sales at {place} fell by {number} percent {time}.",
)


def _fill(template: str, rng: np.random.Generator) -> str:
    slots: dict[str, str] = {}
    for key, words in WORDS.items():
        slots[key] = words[rng.integers(len(words))]
        slots[key + "2"] = words[rng.integers(len(words))]
        slots[key + "_c"] = slots[key][:1].upper() + slots[key][1:]
        slots[key + "_l"] = slots[key][:1].lower() + slots[key][1:]
    s = template.format(**slots)
    return s[:1].upper() + s[1:]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct synthetic sentences, the same for the same ``(n, seed)``
    (and the first ``m`` of them for any ``n >= m``)."""
    if n < 0:
        raise ValueError(f"synthetic sentence count {n} must be >= 0")
    limit = len(TEMPLATES) * 1000 + n * 50    # far above the draws n distinct sentences need
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(limit):
        if len(out) == n:
            return out
        s = _fill(TEMPLATES[rng.integers(len(TEMPLATES))], rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    if len(out) < n:
        raise ValueError(f"the templates gave only {len(out)} distinct sentences of the {n} asked")
    return out
