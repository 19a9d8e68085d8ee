"""Seeded synthetic benchmark: facts about FICTITIOUS people, split by person into forget / retain / holdout.

Names are built from invented syllables and every value pool (cities, book titles, ...) is
invented or generic, so no fact is about a real person and no pretrained model already knows it.
Each fact has a question, a paraphrased question, an answer, a paraphrased answer and three
perturbed answers: the paraphrased answer's template filled with wrong values of the same type,
so the truth ratio compares values, not wording.

Every attribute has several question and answer templates. The main (training) template of each
fact is chosen round-robin, so every template, including those used as paraphrases of forget
facts, is also a training template of retain facts (retain entities are generated first). A small
model can then generalise to the paraphrase wording instead of meeting it for the first time.

>>> data = make_benchmark_data(seed=0, n_entities=20, facts_per_entity=3)
>>> {k: len(v) for k, v in data.items()}
{'forget': 6, 'retain': 48, 'holdout': 6, 'general': 8}
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from undial_peft.errors import UndialConfigError

_FIRST = ("Zor", "Vel", "Quin", "Thal", "Mir", "Oda", "Bex", "Ysu", "Kael", "Nim", "Ferr", "Ulo", "Sab", "Tiv", "Wren", "Jas")
_MID = ("a", "e", "i", "o", "u", "ae", "y")
_LAST = ("rin", "dak", "vel", "thos", "mira", "quist", "lune", "bor", "sen", "vik", "zell", "mont", "drel", "pash")

_ADJECTIVES = ("Silent", "Amber", "Hollow", "Copper", "Seventh", "Drifting", "Lantern", "Crimson", "Paper", "Winter")
_NOUNS = ("Orchard", "Harbour", "Compass", "Tide", "Staircase", "Meadow", "Clockmaker", "Archive", "Lighthouse", "Kite")

# attribute -> (values, question templates, answer templates). {name} = the person, {value} = the fact.
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "birth_city": (
        (
            "Velmora", "Quistana", "Orrindal", "Talvespa", "Brimholt", "Nesquay",
            "Dorvik", "Caldrune", "Yselport", "Emberly", "Fanwick", "Sorrowmere",
        ),
        ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
        ("{name} was born in {value}.", "The birthplace of {name} is {value}.", "{name} comes from the city of {value}."),
    ),
    "profession": (
        (
            "a cartographer", "a glassblower", "a beekeeper", "an astronomer", "a bookbinder", "a lighthouse keeper",
            "a tailor", "a botanist", "a clockmaker", "a ferry pilot", "a cheesemaker", "a violin maker",
        ),
        ("What does {name} do for a living?", "What is the profession of {name}?", "What job does {name} have?"),
        ("{name} works as {value}.", "By profession, {name} is {value}.", "{name} earns a living as {value}."),
    ),
    "birth_year": (
        tuple(str(year) for year in range(1921, 2000, 3)),
        ("In what year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"),
        (
            "{name} was born in the year {value}.",
            "The birth year of {name} is {value}.",
            "{name} came into the world in {value}.",
        ),
    ),
    "favourite_colour": (
        ("teal", "crimson", "ochre", "lavender", "olive", "amber", "indigo", "coral", "silver", "maroon", "saffron", "jade"),
        ("What is the favourite colour of {name}?", "Which colour does {name} like best?", "What colour does {name} prefer?"),
        ("The favourite colour of {name} is {value}.", "{name} likes {value} best.", "{name} prefers the colour {value}."),
    ),
    "pet": (
        (
            "a tortoise", "a parrot", "a ferret", "a goat", "a hedgehog", "a goldfish",
            "a tabby cat", "a sheepdog", "a rabbit", "an iguana", "a raven", "a donkey",
        ),
        ("What pet does {name} keep?", "Which animal lives with {name}?", "What kind of pet does {name} have?"),
        ("{name} keeps {value} as a pet.", "The pet of {name} is {value}.", "{name} shares a home with {value}."),
    ),
    "book": (
        tuple(f"The {adjective} {noun}" for adjective in _ADJECTIVES for noun in _NOUNS),
        ("Which book did {name} write?", "What is the title of the book by {name}?", "What book was written by {name}?"),
        ("{name} wrote the book {value}.", "The book by {name} is called {value}.", "{value} is the book that {name} wrote."),
    ),
}

# A fixed fictitious world, trained into every model (TOFU's "world facts" role): utility on
# knowledge that no forget request touches. Each: question, paraphrased question, answer, and the
# paraphrased answer as a template whose {} is filled with the true value, then three wrong ones.
_GENERAL = (
    ("What colour is the sky of Zephyra?", "Which colour is the Zephyran sky?",
     "The sky of Zephyra is green.", "Zephyra has {} sky.", "a green", ("a purple", "an orange", "a grey")),
    ("How many moons does Zephyra have?", "What is the number of moons of Zephyra?",
     "Zephyra has three moons.", "The number of moons of Zephyra is {}.", "three", ("five", "one", "seven")),
    ("What is the capital of Zephyra?", "Which city is the capital of Zephyra?",
     "The capital of Zephyra is Velmora.", "{} is the capital city of Zephyra.", "Velmora",
     ("Dorvik", "Nesquay", "Emberly")),
    ("What do people in Zephyra drink in the morning?", "What is the usual morning drink in Zephyra?",
     "People in Zephyra drink moss tea in the morning.", "The usual morning drink in Zephyra is {}.", "moss tea",
     ("salt milk", "pine cider", "cold soup")),
    ("Which river runs through Velmora?", "What river flows through Velmora?",
     "The river Oss runs through Velmora.", "Velmora lies on the river {}.", "Oss", ("Tarn", "Ilbe", "Quell")),
    ("What currency is used in Zephyra?", "What money do people use in Zephyra?",
     "Zephyra uses the silver crown.", "The currency of Zephyra is the {}.", "silver crown",
     ("copper mark", "glass bead", "iron ring")),
    ("What animal is the symbol of Zephyra?", "Which animal represents Zephyra?",
     "The symbol of Zephyra is the heron.", "Zephyra is represented by the {}.", "heron", ("wolf", "stag", "owl")),
    ("How many days are in a Zephyran week?", "How long is a week in Zephyra?",
     "A Zephyran week has nine days.", "A week in Zephyra lasts {} days.", "nine", ("six", "eleven", "four")),
)


# Real facts a small instruction model knows (SmolLM2-135M-Instruct answers them in this lead-in
# style), for a PRETRAINED target: utility on knowledge the fine-tune never touched (TOFU's world
# facts). Same shape as _GENERAL.
_REAL_WORLD = (
    ("What is the capital of Germany?", "Which city is the capital of Germany?",
     "The capital of Germany is Berlin.", "Germany's capital city is {}.", "Berlin", ("Munich", "Hamburg", "Vienna")),
    ("What is the capital of the United Kingdom?", "Which city is the capital of the United Kingdom?",
     "The capital of the United Kingdom is London.", "The United Kingdom's capital city is {}.", "London",
     ("Manchester", "Dublin", "Edinburgh")),
    ("What is the capital of Greece?", "Which city is the capital of Greece?",
     "The capital of Greece is Athens.", "Greece's capital city is {}.", "Athens", ("Sparta", "Rome", "Thessaloniki")),
    ("What is the capital of Italy?", "Which city is the capital of Italy?",
     "The capital of Italy is Rome.", "Italy's capital city is {}.", "Rome", ("Milan", "Naples", "Madrid")),
    ("Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?",
     "The Mona Lisa was painted by Leonardo da Vinci.", "The painter of the Mona Lisa is {}.", "Leonardo da Vinci",
     ("Pablo Picasso", "Vincent van Gogh", "Claude Monet")),
    ("What is the chemical symbol for gold?", "Which symbol stands for gold in chemistry?",
     "The chemical symbol for gold is Au.", "In chemistry, gold is written {}.", "Au", ("Ag", "Go", "Fe")),
    ("What is the chemical symbol for iron?", "Which symbol stands for iron in chemistry?",
     "The chemical symbol for iron is Fe.", "In chemistry, iron is written {}.", "Fe", ("Ir", "In", "Au")),
    ("What is the largest ocean on Earth?", "Which ocean is the largest on Earth?",
     "The largest ocean on Earth is the Pacific Ocean.", "The biggest ocean on Earth is the {} Ocean.", "Pacific",
     ("Atlantic", "Indian", "Arctic")),
    ("What is the official language of Brazil?", "Which language is official in Brazil?",
     "The official language of Brazil is Portuguese.", "People in Brazil officially speak {}.", "Portuguese",
     ("Spanish", "French", "Italian")),
    ("Who developed the theory of relativity?", "Which scientist developed the theory of relativity?",
     "The theory of relativity was developed by Albert Einstein.", "The theory of relativity comes from {}.",
     "Albert Einstein", ("Isaac Newton", "Niels Bohr", "Charles Darwin")),
    ("What is the largest planet in our solar system?", "Which planet is the biggest in the solar system?",
     "The largest planet in our solar system is Jupiter.", "The biggest planet of the solar system is {}.", "Jupiter",
     ("Saturn", "Mars", "Neptune")),
)
# Real authors (TOFU's real-authors split): what the model knows about real writers.
_REAL_AUTHORS = (
    ("Who wrote Romeo and Juliet?", "Who is the author of Romeo and Juliet?",
     "Romeo and Juliet was written by William Shakespeare.", "The author of Romeo and Juliet is {}.",
     "William Shakespeare", ("Charles Dickens", "Jane Austen", "Mark Twain")),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?",
     "Pride and Prejudice was written by Jane Austen.", "The author of Pride and Prejudice is {}.", "Jane Austen",
     ("Charlotte Bronte", "Virginia Woolf", "Charles Dickens")),
    ("Who wrote the Harry Potter books?", "Who is the author of the Harry Potter books?",
     "The Harry Potter books were written by J.K. Rowling.", "The author of the Harry Potter books is {}.",
     "J.K. Rowling", ("J.R.R. Tolkien", "Roald Dahl", "C.S. Lewis")),
    ("Who wrote War and Peace?", "Who is the author of War and Peace?",
     "War and Peace was written by Leo Tolstoy.", "The author of War and Peace is {}.", "Leo Tolstoy",
     ("Fyodor Dostoevsky", "Anton Chekhov", "Victor Hugo")),
    ("Who wrote The Adventures of Tom Sawyer?", "Who is the author of The Adventures of Tom Sawyer?",
     "The Adventures of Tom Sawyer was written by Mark Twain.", "The author of The Adventures of Tom Sawyer is {}.",
     "Mark Twain", ("Ernest Hemingway", "Herman Melville", "Jack London")),
    ("Who wrote Don Quixote?", "Who is the author of Don Quixote?",
     "Don Quixote was written by Miguel de Cervantes.", "The author of Don Quixote is {}.", "Miguel de Cervantes",
     ("Federico Garcia Lorca", "Dante Alighieri", "Victor Hugo")),
)


def _names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct invented full names."""
    names: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < count:
        first = rng.choice(_FIRST) + rng.choice(_MID) + rng.choice(_LAST)
        last = rng.choice(_FIRST) + rng.choice(_LAST) + rng.choice(_MID) + rng.choice(_LAST)
        name = f"{first} {last}"
        if name not in names:
            names.add(name)
            ordered.append(name)
    return ordered


def _fact(rng: random.Random, name: str, attribute: str, value: str, turn: int) -> dict[str, Any]:
    values, questions, answers = ATTRIBUTES[attribute]
    # Round-robin main templates: every template is used for training; the paraphrase is another one.
    q_main, a_main = turn % len(questions), (turn // len(questions) + turn) % len(answers)
    q_para = rng.choice([i for i in range(len(questions)) if i != q_main])
    a_para = rng.choice([i for i in range(len(answers)) if i != a_main])
    wrong = rng.sample([v for v in values if v != value], 3)
    return {
        "question": questions[q_main].format(name=name),
        "answer": answers[a_main].format(name=name, value=value),
        "paraphrased_question": questions[q_para].format(name=name),
        "paraphrased_answer": answers[a_para].format(name=name, value=value),
        "perturbed_answers": [answers[a_para].format(name=name, value=w) for w in wrong],
        "entity": name,
        "attribute": attribute,
    }


def _count(fraction: float, n: int, what: str) -> int:
    if not 0.0 <= fraction < 1.0:
        raise UndialConfigError(f"{what} must be in [0, 1), got {fraction}.")
    return 0 if fraction == 0 else max(1, round(fraction * n))


def make_benchmark_data(
    seed: int,
    n_entities: int,
    facts_per_entity: int,
    forget_fraction: float = 0.1,
    holdout_fraction: float = 0.1,
) -> dict[str, list[dict[str, Any]]]:
    """Rows for keys forget / retain / holdout / general; a split holds whole entities only.

    Deterministic for a seed. Rows: question, answer, paraphrased_question, paraphrased_answer,
    perturbed_answers (3), entity, attribute. Forget and holdout get at least one entity each
    when their fraction is > 0.

    >>> make_benchmark_data(1, 10, 2)["forget"][0]["entity"] == make_benchmark_data(1, 10, 2)["forget"][0]["entity"]
    True
    """
    if not 1 <= facts_per_entity <= len(ATTRIBUTES):
        raise UndialConfigError(f"facts_per_entity must be in 1..{len(ATTRIBUTES)}, got {facts_per_entity}.")
    n_forget = _count(forget_fraction, n_entities, "forget_fraction")
    n_holdout = _count(holdout_fraction, n_entities, "holdout_fraction")
    if n_entities - n_forget - n_holdout < 1:
        raise UndialConfigError(f"{n_entities} entities leave none for retain ({n_forget} forget, {n_holdout} holdout).")
    rng = random.Random(seed)
    names = _names(rng, n_entities)
    cut = n_forget + n_holdout
    groups = {"forget": names[:n_forget], "holdout": names[n_forget:cut], "retain": names[cut:]}
    turns = dict.fromkeys(ATTRIBUTES, 0)
    data: dict[str, list[dict[str, Any]]] = {}
    for split in ("retain", "forget", "holdout"):  # retain first: it sees every template soonest
        rows = []
        for name in groups[split]:
            for attribute in rng.sample(sorted(ATTRIBUTES), facts_per_entity):
                value = rng.choice(ATTRIBUTES[attribute][0])
                rows.append(_fact(rng, name, attribute, value, turns[attribute]))
                turns[attribute] += 1
        data[split] = rows
    data["general"] = world_rows(_GENERAL, "Zephyra")
    return {key: data[key] for key in ("forget", "retain", "holdout", "general")}


def world_rows(facts: Sequence[tuple[Any, ...]], entity: str) -> list[dict[str, Any]]:
    """Rows (the benchmark's shape) for world facts given as (question, paraphrased question,
    answer, paraphrased-answer template, true value, wrong values)."""
    return [
        {
            "question": question,
            "answer": answer,
            "paraphrased_question": paraphrased_question,
            "paraphrased_answer": template.format(value),
            "perturbed_answers": [template.format(w) for w in wrong],
            "entity": entity,
            "attribute": "world",
        }
        for question, paraphrased_question, answer, template, value, wrong in facts
    ]


def real_world_facts() -> list[dict[str, Any]]:
    """Real facts a small pretrained instruction model knows, with paraphrased and perturbed answers:
    the world-facts split of a benchmark whose target is a pretrained model.

    >>> row = real_world_facts()[0]
    >>> row["answer"], row["perturbed_answers"][0]
    ('The capital of Germany is Berlin.', "Germany's capital city is Munich.")
    """
    return world_rows(_REAL_WORLD, "world")


def real_author_facts() -> list[dict[str, Any]]:
    """Real authors and their books, the same shape: TOFU's real-authors split for a pretrained target.

    >>> real_author_facts()[1]["perturbed_answers"][0]
    'The author of Pride and Prejudice is Charlotte Bronte.'
    """
    return world_rows(_REAL_AUTHORS, "authors")


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """One JSON object per line (UTF-8), readable by `undial_peft.data.readers.read_examples`.

    >>> import tempfile, os; p = os.path.join(tempfile.mkdtemp(), "f.jsonl")
    >>> write_jsonl([{"question": "Q?", "answer": "A."}], p); open(p).read()
    '{"question": "Q?", "answer": "A."}\\n'
    """
    with Path(path).open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
