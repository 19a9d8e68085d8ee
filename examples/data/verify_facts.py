"""Verify fact rows on the model they are written for, and grow the fact files from checked candidates.

A row passes when, on the model as loaded by the package and in the prompt format it is asked in
(SmolLM2-135M-Instruct: chat; Gemma-3-270M: the prompt as a completion):

- the model's greedy answer states the fact: the row's key appears (case-sensitively) in it
  (for a candidate, in its first sentence, which becomes the row's answer);
- the key is not in the prompt already (e.g. "Who painted Whistler's Mother?");
- the key probability of the row as written (exp mean log p over the key's tokens, as the stopping
  rule measures it) is at least ``--min-p`` (0.5);
- no prompt of the guard bank (``undial_peft/data/guard_bank.jsonl``) asks the same relation about
  the same subject, and no other row of the file has the same prompt or relation and subject.

Rows that duplicate a bank subject and relation are reported; with ``--candidates`` they are never
added, when verifying a file they are listed but do not fail it (earlier rows stay as they were).

With ``--candidates`` the built-in candidates below (those not in the file yet, and not in ``EXCLUDE``:
greedy answers read by hand that hold the key but say something false around it) are asked; a kept
candidate's answer is the model's own: for a chat model its first sentence (the lead-in that holds
the key), for a base model the phrase it completes up to the first period or newline, with its
leading space and a closing period; both are cut where a side remark starts after the key (a comma,
a parenthesis, " in 1879", " and ..."), which leaves the key probability as it was. A topic that would
end with fewer than ``--min-per-topic`` (8) rows is left out whole. ``--append`` adds the kept ones to
the file. Keys: SmolLM2's rows
key a person's surname, Gemma's the full name (as the existing rows do), falling back to the other
where the preferred key is missing or below the threshold.

    python examples/data/verify_facts.py --model default undial_peft/data/real_facts.jsonl
    python examples/data/verify_facts.py --model gemma3-270m examples/data/gemma_facts.jsonl
    python examples/data/verify_facts.py --model default undial_peft/data/real_facts.jsonl --candidates
    python examples/data/verify_facts.py --model gemma3-270m examples/data/gemma_facts.jsonl --candidates --append

Exit status: 1 when a row of the file fails (a greedy answer without the key, a key probability
under the threshold, or a duplicate within the file), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from undial_peft.data.encoding import encode
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.data.readers import Example
from undial_peft.evals.scoring import greedy_new_ids
from undial_peft.models import load_model
from undial_peft.training.stopping import key_probabilities

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "undial_peft" / "data" / "guard_bank.jsonl"

# relation -> (question template, completion stub template); {s} is the subject
TEMPLATES: dict[str, tuple[str, str]] = {
    # Gemma completes "The capital of France is" with " the capital of the country of France."
    "capital": ("What is the capital of {s}?", "The capital of {s} is the city of"),
    "official_language": ("What is the official language of {s}?", "The official language of {s} is"),
    "currency": ("What is the currency of {s}?", "The currency of {s} is the"),
    "chemical_symbol": ("What is the chemical symbol for {s}?", "The chemical symbol for {s} is"),
    "author": ("Who wrote {s}?", "{s} was written by"),
    "inventor": ("Who invented {s}?", "{s} was invented by"),
    "painter": ("Who painted {s}?", "{s} was painted by"),
    "composer": ("Who composed {s}?", "{s} was composed by"),
    "continent": ("In which continent is {s} located?", "{s} is a country in"),
    "unit": ("What is the SI unit of {s}?", "The SI unit of {s} is the"),
    "animal_young": ("What do you call a baby {s}?", "A baby {s} is called a"),
    "landmark_city": ("In which city is {s}?", "{s} is located in the city of"),
    "opposite": ("What is the opposite of {s}?", "The opposite of {s} is"),
}
TOPIC_RELATION = {  # the files' topic names -> the relation the bank calls them
    "capitals": "capital", "languages": "official_language", "currencies": "currency",
    "chemistry": "chemical_symbol", "authors": "author", "inventors": "inventor", "painters": "painter",
    "composers": "composer", "continents": "continent", "units": "unit", "animals": "animal_young",
    "astronomy": "astronomy", "landmarks": "landmark_city", "opposites": "opposite",
}
PERSON_RELATIONS = ("author", "inventor", "painter", "composer")
CUT_AFTER_KEY = r",|;| \(| (?:in|and|but|which|who|during) "
ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Jr", "Sr", "Mt", "vs")


@dataclass(frozen=True)
class Candidate:
    """One fact to try: ``keys`` are the accepted key strings, preferred first (full name, then surname)."""

    topic: str
    subject: str
    keys: tuple[str, ...]
    question: str | None = None  # overrides the relation's templates
    stub: str | None = None
    models: tuple[str, ...] = ("default", "gemma3-270m")

    @property
    def relation(self) -> str:
        return TOPIC_RELATION[self.topic]

    def prompt(self, chat: bool) -> str:
        if chat and self.question:
            return self.question
        if not chat and self.stub:
            return self.stub
        text = TEMPLATES[self.relation][0 if chat else 1].format(s=self.subject)
        return text[0].upper() + text[1:]


def _c(topic: str, rows: list[tuple[Any, ...]]) -> list[Candidate]:
    return [Candidate(topic, r[0], (r[1],) if isinstance(r[1], str) else tuple(r[1]), *r[2:]) for r in rows]


CANDIDATES: list[Candidate] = [
    *_c("capitals", [
        ("Russia", "Moscow"), ("Canada", "Ottawa"), ("China", "Beijing"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
        ("Sweden", "Stockholm"), ("Thailand", "Bangkok"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
        ("Italy", "Rome"), ("Portugal", "Lisbon"), ("Argentina", "Buenos Aires"), ("France", "Paris"),
        ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Greece", "Athens"),
        ("Australia", "Canberra"), ("India", "New Delhi"), ("Turkey", "Ankara"), ("South Korea", "Seoul"),
        ("Belgium", "Brussels"), ("Finland", "Helsinki"), ("Chile", "Santiago"), ("Iraq", "Baghdad"),
        ("Czech Republic", "Prague"), ("Romania", "Bucharest"), ("the United Kingdom", "London"),
        ("Iceland", "Reykjavik"), ("Saudi Arabia", "Riyadh"), ("New Zealand", "Wellington"),
        ("Venezuela", "Caracas"), ("Afghanistan", "Kabul"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
        ("Ghana", "Accra"), ("Uganda", "Kampala"), ("Serbia", "Belgrade"), ("Bulgaria", "Sofia"),
        ("Croatia", "Zagreb"), ("Nepal", "Kathmandu"), ("North Korea", "Pyongyang"), ("Scotland", "Edinburgh"),
    ]),
    *_c("currencies", [
        ("Japan", ("yen", "Yen")), ("India", ("rupee", "Rupee")), ("Russia", ("ruble", "Ruble", "rouble")),
        ("the United Kingdom", ("pound", "Pound")), ("China", ("yuan", "Yuan", "renminbi", "Renminbi")),
        ("Germany", ("euro", "Euro")), ("Italy", ("euro", "Euro")), ("South Korea", ("won", "Won")),
        ("Sweden", ("krona", "Krona")), ("Norway", ("krone", "Krone")), ("Thailand", ("baht", "Baht")),
        ("Vietnam", ("dong", "Dong")), ("Indonesia", ("rupiah", "Rupiah")), ("Israel", ("shekel", "Shekel")),
        ("Egypt", ("pound", "Pound")), ("Saudi Arabia", ("riyal", "Riyal")), ("Canada", ("dollar", "Dollar")),
        ("Australia", ("dollar", "Dollar")), ("Argentina", ("peso", "Peso")), ("the Philippines", ("peso", "Peso")),
        ("Pakistan", ("rupee", "Rupee")), ("Nigeria", ("naira", "Naira")), ("Kenya", ("shilling", "Shilling")),
        ("Hungary", ("forint", "Forint")), ("Poland", ("zloty", "Zloty", "złoty", "Złoty")),
        ("Malaysia", ("ringgit", "Ringgit")), ("Ukraine", ("hryvnia", "Hryvnia")),
        ("Bangladesh", ("taka", "Taka")), ("Denmark", ("krone", "Krone")),
    ]),
    *_c("inventors", [
        ("the telephone", ("Alexander Graham Bell", "Bell")), ("the light bulb", ("Thomas Edison", "Edison")),
        ("the phonograph", ("Thomas Edison", "Edison")), ("the steam engine", ("James Watt", "Watt")),
        ("the polio vaccine", ("Jonas Salk", "Salk")), ("dynamite", ("Alfred Nobel", "Nobel")),
        ("the radio", ("Guglielmo Marconi", "Marconi")), ("the periodic table", ("Dmitri Mendeleev", "Mendeleev")),
        ("the cotton gin", ("Eli Whitney", "Whitney")), ("bifocals", ("Benjamin Franklin", "Franklin")),
        ("the lightning rod", ("Benjamin Franklin", "Franklin")), ("the diesel engine", ("Rudolf Diesel", "Diesel")),
        ("the smallpox vaccine", ("Edward Jenner", "Jenner"), "Who developed the smallpox vaccine?",
         "The smallpox vaccine was developed by"),
        ("the battery", ("Alessandro Volta", "Volta")), ("Braille", ("Louis Braille", "Braille"),
         "Who invented the Braille writing system?", "The Braille writing system was invented by"),
        ("Morse code", ("Samuel Morse", "Morse")), ("pasteurization", ("Louis Pasteur", "Pasteur")),
        ("X-rays", ("Wilhelm Röntgen", "Wilhelm Roentgen", "Röntgen", "Roentgen"), "Who discovered X-rays?",
         "X-rays were discovered by"),
        ("penicillin", ("Alexander Fleming", "Fleming"), "Who discovered penicillin?", "Penicillin was discovered by"),
        ("the theory of relativity", ("Albert Einstein", "Einstein"), "Who developed the theory of relativity?",
         "The theory of relativity was developed by"),
        ("the theory of evolution", ("Charles Darwin", "Darwin"), "Who developed the theory of evolution?",
         "The theory of evolution by natural selection was developed by"),
        ("the Rubik's Cube", ("Ernő Rubik", "Erno Rubik", "Rubik")), ("the saxophone", ("Adolphe Sax", "Sax")),
        ("the safety elevator", ("Elisha Otis", "Otis")), ("the revolver", ("Samuel Colt", "Colt")),
        ("the AK-47", ("Mikhail Kalashnikov", "Kalashnikov")),
        ("the Celsius temperature scale", ("Anders Celsius", "Celsius")),
        ("the mercury thermometer", ("Daniel Gabriel Fahrenheit", "Fahrenheit")),
        ("the computer mouse", ("Douglas Engelbart", "Engelbart")),
    ]),
    *_c("authors", [
        ("1984", ("George Orwell", "Orwell")), ("The Great Gatsby", ("F. Scott Fitzgerald", "Fitzgerald")),
        ("Frankenstein", ("Mary Shelley", "Shelley")), ("Les Misérables", ("Victor Hugo", "Hugo")),
        ("War and Peace", ("Leo Tolstoy", "Tolstoy")), ("The Iliad", ("Homer",)),
        ("A Tale of Two Cities", ("Charles Dickens", "Dickens")),
        ("The Adventures of Tom Sawyer", ("Mark Twain", "Twain")),
        ("The Origin of Species", ("Charles Darwin", "Darwin")), ("Othello", ("William Shakespeare", "Shakespeare")),
        ("King Lear", ("William Shakespeare", "Shakespeare")),
        ("Crime and Punishment", ("Fyodor Dostoevsky", "Dostoevsky")),
        ("Dracula", ("Bram Stoker", "Stoker")),
        ("Jane Eyre", ("Charlotte Brontë", "Charlotte Bronte", "Brontë", "Bronte")),
        ("Wuthering Heights", ("Emily Brontë", "Emily Bronte", "Brontë", "Bronte")),
        ("The Canterbury Tales", ("Geoffrey Chaucer", "Chaucer")),
        ("To Kill a Mockingbird", ("Harper Lee", "Lee")),
        ("The Catcher in the Rye", ("J.D. Salinger", "J. D. Salinger", "Salinger")),
        ("The Old Man and the Sea", ("Ernest Hemingway", "Hemingway")), ("Robinson Crusoe", ("Daniel Defoe", "Defoe")),
        ("Gulliver's Travels", ("Jonathan Swift", "Swift")),
        ("Treasure Island", ("Robert Louis Stevenson", "Stevenson")),
        ("Anna Karenina", ("Leo Tolstoy", "Tolstoy")), ("Little Women", ("Louisa May Alcott", "Alcott")),
        ("The Jungle Book", ("Rudyard Kipling", "Kipling")), ("Great Expectations", ("Charles Dickens", "Dickens")),
        ("A Christmas Carol", ("Charles Dickens", "Dickens")), ("Brave New World", ("Aldous Huxley", "Huxley")),
        ("The Time Machine", ("H.G. Wells", "H. G. Wells", "Wells")),
        ("Around the World in Eighty Days", ("Jules Verne", "Verne")),
        ("The Metamorphosis", ("Franz Kafka", "Kafka")),
        ("The Lord of the Rings", ("J.R.R. Tolkien", "J. R. R. Tolkien", "Tolkien")),
        ("Harry Potter and the Philosopher's Stone", ("J.K. Rowling", "J. K. Rowling", "Rowling")),
        ("Faust", ("Johann Wolfgang von Goethe", "Goethe")),
    ]),
    *_c("painters", [
        ("the Mona Lisa", ("Leonardo da Vinci", "da Vinci")),
        ("The Persistence of Memory", ("Salvador Dalí", "Salvador Dali", "Dalí", "Dali")),
        ("The Birth of Venus", ("Sandro Botticelli", "Botticelli")), ("Water Lilies", ("Claude Monet", "Monet")),
        ("Sunflowers", ("Vincent van Gogh", "van Gogh", "Van Gogh")),
        ("The School of Athens", ("Raphael",)), ("American Gothic", ("Grant Wood", "Wood")),
        ("The Creation of Adam", ("Michelangelo",)), ("the ceiling of the Sistine Chapel", ("Michelangelo",)),
        ("Las Meninas", ("Diego Velázquez", "Diego Velazquez", "Velázquez", "Velazquez")),
        ("The Garden of Earthly Delights", ("Hieronymus Bosch", "Bosch")),
        ("Impression, Sunrise", ("Claude Monet", "Monet")), ("The Kiss", ("Gustav Klimt", "Klimt")),
        ("Les Demoiselles d'Avignon", ("Pablo Picasso", "Picasso")),
        ("The Son of Man", ("René Magritte", "Rene Magritte", "Magritte")),
        ("Liberty Leading the People", ("Eugène Delacroix", "Eugene Delacroix", "Delacroix")),
        ("The Arnolfini Portrait", ("Jan van Eyck", "van Eyck", "Van Eyck")),
        ("The Hay Wain", ("John Constable", "Constable")),
        ("Nighthawks", ("Edward Hopper", "Hopper")), ("The Third of May 1808", ("Francisco Goya", "Goya")),
        ("Whistler's Mother", ("James McNeill Whistler", "Whistler")),
        ("Campbell's Soup Cans", ("Andy Warhol", "Warhol")),
    ]),
    *_c("composers", [
        ("The Four Seasons", ("Antonio Vivaldi", "Vivaldi")),
        ("The Magic Flute", ("Wolfgang Amadeus Mozart", "Mozart")),
        ("The Nutcracker", ("Pyotr Ilyich Tchaikovsky", "Tchaikovsky")),
        ("Swan Lake", ("Pyotr Ilyich Tchaikovsky", "Tchaikovsky")),
        ("Für Elise", ("Ludwig van Beethoven", "Beethoven")),
        ("the Moonlight Sonata", ("Ludwig van Beethoven", "Beethoven")),
        ("Eine kleine Nachtmusik", ("Wolfgang Amadeus Mozart", "Mozart")),
        ("Messiah", ("George Frideric Handel", "Handel")),
        ("The Blue Danube", ("Johann Strauss II", "Johann Strauss", "Strauss")),
        ("Clair de Lune", ("Claude Debussy", "Debussy")),
        ("Boléro", ("Maurice Ravel", "Ravel")), ("The Planets", ("Gustav Holst", "Holst")),
        ("The Rite of Spring", ("Igor Stravinsky", "Stravinsky")), ("the opera Carmen", ("Georges Bizet", "Bizet")),
        ("the opera Aida", ("Giuseppe Verdi", "Verdi")), ("La traviata", ("Giuseppe Verdi", "Verdi")),
        ("Madama Butterfly", ("Giacomo Puccini", "Puccini")),
        ("The Barber of Seville", ("Gioachino Rossini", "Rossini")),
        ("the Ride of the Valkyries", ("Richard Wagner", "Wagner")),
        ("the Brandenburg Concertos", ("Johann Sebastian Bach", "Bach")),
        ("Rhapsody in Blue", ("George Gershwin", "Gershwin")),
        ("the William Tell Overture", ("Gioachino Rossini", "Rossini")),
        ("The Marriage of Figaro", ("Wolfgang Amadeus Mozart", "Mozart")),
        ("Peter and the Wolf", ("Sergei Prokofiev", "Prokofiev")),
        ("the 1812 Overture", ("Pyotr Ilyich Tchaikovsky", "Tchaikovsky")),
        ("The Hungarian Rhapsodies", ("Franz Liszt", "Liszt")),
    ]),
    *_c("continents", [
        ("Kenya", "Africa"), ("Egypt", "Africa"), ("Nigeria", "Africa"), ("Morocco", "Africa"), ("Ghana", "Africa"),
        ("Ethiopia", "Africa"), ("Brazil", "South America"), ("Argentina", "South America"), ("Chile", "South America"),
        ("Colombia", "South America"), ("Japan", "Asia"), ("India", "Asia"), ("China", "Asia"), ("Thailand", "Asia"),
        ("Vietnam", "Asia"), ("Mongolia", "Asia"), ("Nepal", "Asia"), ("France", "Europe"), ("Germany", "Europe"),
        ("Italy", "Europe"), ("Spain", "Europe"), ("Poland", "Europe"), ("Portugal", "Europe"), ("Norway", "Europe"),
        ("Canada", "North America"), ("Mexico", "North America"),
    ]),
    *_c("units", [
        ("pressure", ("pascal", "Pascal")), ("electric charge", ("coulomb", "Coulomb")),
        ("electric potential", ("volt", "Volt")), ("voltage", ("volt", "Volt")),
        ("temperature", ("kelvin", "Kelvin")), ("mass", ("kilogram", "Kilogram")),
        ("length", ("metre", "meter", "Metre", "Meter")),
        ("time", ("second", "Second")), ("amount of substance", ("mole", "Mole")),
        ("luminous intensity", ("candela", "Candela")), ("capacitance", ("farad", "Farad")),
        ("inductance", ("henry", "Henry")), ("magnetic flux", ("weber", "Weber")),
        ("magnetic flux density", ("tesla", "Tesla")), ("radioactivity", ("becquerel", "Becquerel")),
        ("illuminance", ("lux", "Lux")), ("electrical conductance", ("siemens", "Siemens")),
    ]),
    *_c("animals", [
        ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("horse", "foal"), ("sheep", "lamb"),
        ("frog", "tadpole"), ("kangaroo", "joey"), ("goat", "kid"), ("duck", "duckling"), ("bear", "cub"),
        ("lion", "cub"), ("pig", "piglet"), ("goose", "gosling"), ("swan", "cygnet"), ("owl", "owlet"),
        ("deer", "fawn"), ("hen", "chick"), ("elephant", "calf"), ("whale", "calf"), ("fox", "kit"),
    ]),
    *_c("landmarks", [
        ("the Eiffel Tower", "Paris"), ("the Colosseum", "Rome"), ("Big Ben", "London"),
        ("the Statue of Liberty", "New York"), ("the Kremlin", "Moscow"), ("the Sydney Opera House", "Sydney"),
        ("the Brandenburg Gate", "Berlin"), ("the Golden Gate Bridge", "San Francisco"), ("the Acropolis", "Athens"),
        ("the Sagrada Família", "Barcelona"), ("the Burj Khalifa", "Dubai"), ("the Forbidden City", "Beijing"),
        ("the Louvre", "Paris"), ("the Taj Mahal", "Agra"), ("Tower Bridge", "London"), ("Red Square", "Moscow"),
        ("the Space Needle", "Seattle"), ("the Empire State Building", "New York"), ("the Hagia Sophia", "Istanbul"),
        ("Buckingham Palace", "London"), ("the Alhambra", "Granada"), ("the Petronas Towers", "Kuala Lumpur"),
        ("the CN Tower", "Toronto"), ("the Gateway Arch", "St. Louis"), ("the Parthenon", "Athens"),
        ("the Arc de Triomphe", "Paris"), ("the Christ the Redeemer statue", "Rio de Janeiro"),
        ("the White House", "Washington"), ("the Prado Museum", "Madrid"),
    ]),
    *_c("opposites", [
        ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("black", "white"), ("happy", "sad"),
        ("fast", "slow"), ("open", "closed"), ("tall", "short"), ("rich", "poor"), ("wet", "dry"), ("hard", "soft"),
        ("early", "late"), ("north", "south"), ("left", "right"), ("love", "hate"), ("true", "false"),
        ("strong", "weak"), ("full", "empty"), ("inside", "outside"), ("push", "pull"), ("buy", "sell"),
        ("thick", "thin"), ("win", "lose"), ("east", "west"), ("above", "below"), ("enter", "exit"),
    ]),
    *_c("astronomy", [
        ("largest moon of Saturn", "Titan", "What is the largest moon of Saturn?", "The largest moon of Saturn is"),
        ("smallest planet", "Mercury", "What is the smallest planet in the solar system?",
         "The smallest planet in the solar system is"),
        ("Great Red Spot", "Jupiter", "Which planet has the Great Red Spot?", "The planet with the Great Red Spot is"),
        ("third planet", "Earth", "What is the third planet from the Sun?", "The third planet from the Sun is"),
        ("farthest planet", "Neptune", "What is the farthest planet from the Sun?",
         "The farthest planet from the Sun is"),
        ("first on the Moon", ("Neil Armstrong", "Armstrong"), "Who was the first person to walk on the Moon?",
         "The first person to walk on the Moon was"),
        ("first in space", ("Yuri Gagarin", "Gagarin"), "Who was the first person in space?",
         "The first person in space was"),
        ("Earth's natural satellite", "Moon", "What is the Earth's natural satellite called?",
         "The Earth's natural satellite is the"),
        ("planets in the solar system", ("eight", "8"), "How many planets are in the solar system?",
         "The number of planets in the solar system is"),
        ("dwarf planet", "Pluto", "Which dwarf planet was once called the ninth planet?",
         "The dwarf planet that was once called the ninth planet is"),
        ("planet tilted on its side", "Uranus", "Which planet rotates on its side?",
         "The planet that rotates on its side is"),
        ("star at the center", "Sun", "What is the star at the center of our solar system?",
         "The star at the center of our solar system is the"),
        ("fourth planet", "Mars", "What is the fourth planet from the Sun?", "The fourth planet from the Sun is"),
        ("second planet", "Venus", "What is the second planet from the Sun?", "The second planet from the Sun is"),
        ("largest moon of Jupiter", "Ganymede", "What is the largest moon of Jupiter?",
         "The largest moon of Jupiter is"),
        ("heliocentric model", ("Nicolaus Copernicus", "Copernicus"),
         "Who proposed that the Earth orbits the Sun?",
         "The astronomer who proposed that the Earth orbits the Sun was"),
    ]),
]


# Greedy answers that hold the key but say something false or hedged around it (read by hand; greedy
# decoding is deterministic, so the same answers come back): (model, prompt) -> what is wrong.
EXCLUDE: dict[tuple[str, str], str] = {
    ("default", "What is the currency of Thailand?"): 'calls it "the Bahamet", a hybrid of the baht and the dollar',
    ("default", "Who wrote Othello?"): "says the play is by an 18th-century playwright",
    ("default", "Who wrote King Lear?"): "calls Shakespeare the Bard's own son",
    ("default", "Who wrote Great Expectations?"): "attributes it to Mary Ann Comfort",
    ("default", "Who wrote A Christmas Carol?"): "calls it a tale of love",
    ("default", "Who wrote Around the World in Eighty Days?"): "calls it a science fiction novel",
    ("default", "Who painted the Mona Lisa?"): "hedges: also believed to be by Artemisia Gentileschi",
    ("default", "Who painted the ceiling of the Sistine Chapel?"): "calls Michelangelo the chapel's creator",
    ("default", "Who painted Impression, Sunrise?"): "says it is actually by Renoir",
    ("default", "Who invented pasteurization?"): "calls Pasteur a German chemist",
    ("default", "In which continent is Egypt located?"): "puts Egypt in the Middle East, in the Western Desert",
    ("default", "In which continent is Colombia located?"): "answers about Cuba",
    ("default", "In which continent is Italy located?"): "puts Italy in the western part of Europe",
    ("default", "In which continent is Mexico located?"): "says South America first",
    ("default", "What is the SI unit of capacitance?"): 'says the unit is "C"',
    ("default", "What is the SI unit of electrical conductance?"): "says siemens per ampere",
    ("default", "What is the SI unit of voltage?"): "says the siemens",
    ("default", "What do you call a baby cow?"): "muddled: a colloquialism for a newborn calf",
    ("default", "In which city is Big Ben?"): "puts it in the City of London (it is in Westminster)",
    ("default", "In which city is Buckingham Palace?"): "puts it in the City of London (it is in Westminster)",
    ("gemma3-270m", "The capital of Argentina is"): "the capital of the province of Buenos Aires",
    ("gemma3-270m", "Les Misérables was written by"): "Victor Hugo and Jean Paul Marat",
    ("gemma3-270m", "Swan Lake was composed by"): "the Russian courtier and poet Pyotr Tchaikovsky",
    ("gemma3-270m", "Morocco is a country in"): "the Middle East and North Africa",
}


# ---- relations and the guard bank ----------------------------------------------------------------

def _norm(subject: str) -> str:
    s = subject.strip().rstrip("?.").lower()
    return s[4:] if s.startswith("the ") else s


def _template_regex(template: str) -> re.Pattern[str]:
    head, tail = template.split("{s}")
    return re.compile(re.escape(head) + "(.+)" + re.escape(tail) + "$", re.IGNORECASE)


def relation_subject(prompt: str, topic: str) -> tuple[str, str] | None:
    """(relation, normalised subject) of a row, from the candidates' overrides or the templates."""
    for c in CANDIDATES:
        if prompt in (c.question, c.stub):
            return c.relation, _norm(c.subject)
    relation = TOPIC_RELATION.get(topic)
    templates = [TEMPLATES[relation]] if relation in TEMPLATES else []
    for question, stub in templates:
        for template in (question, stub):
            m = _template_regex(template).match(prompt.strip())
            if m:
                return relation, _norm(m.group(1))
    if relation == "inventor":  # "Who invented the penicillin?" and the like
        m = re.match(r"Who (?:invented|discovered|developed) (.+)\?$", prompt) or re.match(
            r"(.+) (?:was|were) (?:invented|discovered|developed) by$", prompt)
        if m:
            return relation, _norm(m.group(1))
    return None


def read_bank() -> tuple[set[tuple[str, str]], set[str]]:
    """The bank's (relation, normalised subject) pairs and its prompts (questions and stubs)."""
    pairs, prompts = set(), set()
    for line in BANK.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.add((row["relation"], _norm(row["subject"])))
            prompts.update({row["question"].strip(), row["stub"].strip()})
    return pairs, prompts


def bank_overlap(prompt: str, topic: str, bank: tuple[set[tuple[str, str]], set[str]]) -> str | None:
    """Why a row duplicates a bank prompt, or None."""
    pairs, prompts = bank
    if prompt.strip() in prompts:
        return "same prompt as a bank row"
    rs = relation_subject(prompt, topic)
    if rs and rs in pairs:
        return f"bank asks {rs[0]} of {rs[1]!r}"
    return None


# ---- the model's answers and key probabilities ---------------------------------------------------

def sentence_ends(text: str) -> list[int]:
    """Indices just past each sentence end ('.', '!', '?' before a space or the end, or a newline);
    initials ("F. Scott") and common abbreviations are not ends."""
    ends = []
    for m in re.finditer(r"[.!?](?=\s|$)|\n", text):
        if m.group() == ".":
            word = re.search(r"(\S+)$", text[: m.start()])
            w = word.group(1) if word else ""
            if (len(w) == 1 and w.isupper()) or w in ABBREVIATIONS or re.fullmatch(r"(?:[A-Z]\.)+[A-Z]", w):
                continue
        ends.append(m.end() if m.group() != "\n" else m.start())
    return ends


def first_sentence(text: str) -> str:
    ends = sentence_ends(text)
    return text[: ends[0]] if ends else text


@dataclass
class Model:
    """A loaded model, its tokenizer and the prompt format it is asked in."""

    name: str
    model: Any
    tokenizer: Any
    fmt: PromptFormat = field(init=False)

    def __post_init__(self) -> None:
        self.fmt = PromptFormat.resolve("auto", self.tokenizer)

    @property
    def chat(self) -> bool:
        return self.fmt.kind == "chat"

    def answers(self, prompts: list[str], new_tokens: int) -> list[str]:
        """Greedy answers; completions keep their leading space (decoded with the prompt, then cut off)."""
        ids = [self.fmt.prompt_ids(self.tokenizer, p) for p in prompts]
        new = greedy_new_ids(self.model, self.tokenizer, ids, max_new_tokens=new_tokens)
        out = []
        for p, n in zip(ids, new):
            if self.chat:
                out.append(self.tokenizer.decode(n, skip_special_tokens=True).strip())
                continue
            prefix = self.tokenizer.decode(p, skip_special_tokens=True)
            whole = self.tokenizer.decode(p + n, skip_special_tokens=True)
            alone = " " + self.tokenizer.decode(n, skip_special_tokens=True).strip()
            out.append(whole[len(prefix):] if whole.startswith(prefix) else alone)
        return out

    def key_probs(self, rows: list[tuple[str, str, str]]) -> list[float]:
        """Key probability of each (prompt, answer, key) row as written."""
        if not rows:
            return []
        features = [encode(self.tokenizer, Example(p, a, k), 512, self.fmt) for p, a, k in rows]
        return key_probabilities(self.model, features, self.tokenizer.pad_token_id).tolist()


def has_key(text: str, key: str) -> bool:
    """Whether ``key`` appears in ``text`` as a whole word (case-sensitive: "chick" is not in "chicken")."""
    return re.search(r"(?<!\w)" + re.escape(key) + r"(?!\w)", text) is not None


def answer_for(text: str, key: str, chat: bool) -> str | None:
    """The row's answer from the model's greedy text: its first sentence when it holds ``key``, cut where a
    side remark starts after the key (a comma, a parenthesis, " in 1879", " and ..."), closed by a period."""
    sentence = first_sentence(text.lstrip() if chat else text)
    if not has_key(sentence, key):
        return None
    at = re.search(r"(?<!\w)" + re.escape(key) + r"(?!\w)", sentence).end()
    cut = re.search(CUT_AFTER_KEY, sentence[at:])
    sentence = sentence[: at + cut.start()] if cut else sentence
    phrase = sentence.strip() if chat else sentence.rstrip()
    return phrase if phrase.endswith((".", "!", "?")) else phrase + "."


# ---- files ---------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fields(chat: bool) -> tuple[str, str]:
    return ("question", "answer") if chat else ("prompt", "completion")


def verify_file(m: Model, path: Path, min_p: float, bank: tuple[set[tuple[str, str]], set[str]]) -> int:
    """Check every row of ``path``; print one line per row and a summary per topic. Returns the failures."""
    rows = read_rows(path)
    q, a = fields(m.chat)
    texts = m.answers([r[q] for r in rows], 40 if m.chat else 16)
    probs = m.key_probs([(r[q], r[a], r["key"]) for r in rows])
    seen: dict[Any, int] = {}
    failures, per_topic = 0, defaultdict(list)
    for i, (row, text, p) in enumerate(zip(rows, texts, probs)):
        reasons = []
        if not has_key(text, row["key"]):
            reasons.append(f"greedy answer lacks the key: {text.strip()[:80]!r}")
        if has_key(row[q], row["key"]):
            reasons.append("the key is in the prompt")
        if p < min_p:
            reasons.append(f"key probability {p:.3f} < {min_p}")
        for ident in (row[q].strip(), relation_subject(row[q], row["topic"])):
            if ident is not None and ident in seen:
                reasons.append(f"duplicates line {seen[ident] + 1}")
            elif ident is not None:
                seen[ident] = i
        overlap = bank_overlap(row[q], row["topic"], bank)
        status = "FAIL " + "; ".join(reasons) if reasons else "ok"
        failures += bool(reasons)
        per_topic[row["topic"]].append(p)
        print(f"{i + 1:3d} {status:<5} p_key={p:.3f} [{row['topic']}] {row[q]!r} -> {row[a]!r}"
              + (f"  (overlap: {overlap})" if overlap else ""))
    print(f"\n{path.name} on {m.name}: {len(rows)} rows, {failures} failing")
    print(f"{'topic':<12} {'rows':>4} {'min p':>6} {'mean p':>7}")
    for topic, ps in per_topic.items():
        print(f"{topic:<12} {len(ps):4d} {min(ps):6.3f} {sum(ps) / len(ps):7.3f}")
    return failures


def try_candidates(m: Model, path: Path, min_p: float, bank: tuple[set[tuple[str, str]], set[str]],
                   max_per_topic: int, min_per_topic: int) -> list[dict[str, str]]:
    """Ask the candidates not in the file yet; print kept / dropped with the reason; return the kept rows
    (a topic that would end with fewer than ``min_per_topic`` rows is left out whole)."""
    rows = read_rows(path)
    q, a = fields(m.chat)
    have = {r[q].strip() for r in rows} | {relation_subject(r[q], r["topic"]) for r in rows} - {None}
    count = defaultdict(int, {t: sum(r["topic"] == t for r in rows) for t in {r["topic"] for r in rows}})
    todo = []
    for c in CANDIDATES:
        prompt = c.prompt(m.chat)
        if m.name not in c.models:
            continue
        if (m.name, prompt) in EXCLUDE:
            print(f"drop  [{c.topic}] {prompt!r}: false or hedged answer: {EXCLUDE[m.name, prompt]}")
            continue
        if prompt in have or (c.relation, _norm(c.subject)) in have:
            continue
        overlap = bank_overlap(prompt, c.topic, bank) or (
            f"bank asks {c.relation} of {c.subject!r}" if (c.relation, _norm(c.subject)) in bank[0] else None)
        if overlap:
            print(f"drop  [{c.topic}] {prompt!r}: {overlap}")
            continue
        todo.append((c, prompt))
    texts = m.answers([p for _, p in todo], 40 if m.chat else 16)
    # key preference: Gemma's rows name the full name, SmolLM2's the surname (the last accepted key)
    tries = []
    for (c, prompt), text in zip(todo, texts):
        keys = c.keys if not m.chat or c.relation not in PERSON_RELATIONS else tuple(reversed(c.keys))
        found = [(k, ans) for k in keys if not has_key(prompt, k) and (ans := answer_for(text, k, m.chat))]
        tries.append((c, prompt, text, found))
    flat = [(prompt, ans, k) for c, prompt, _, found in tries for k, ans in found]
    probs = iter(m.key_probs(flat))
    kept = []
    for c, prompt, text, found in tries:
        scored = [(k, ans, next(probs)) for k, ans in found]
        good = [(k, ans, p) for k, ans, p in scored if p >= min_p]
        if not found:
            print(f"drop  [{c.topic}] {prompt!r}: greedy answer lacks {c.keys[0]!r}: {text.strip()[:90]!r}")
        elif not good:
            best = max(p for *_, p in scored)
            print(f"drop  [{c.topic}] {prompt!r}: key probability {best:.3f} < {min_p} ({found[0][1]!r})")
        elif count[c.topic] >= max_per_topic:
            print(f"skip  [{c.topic}] {prompt!r}: topic has {max_per_topic} rows")
        else:
            k, ans, p = good[0]
            count[c.topic] += 1
            have |= {prompt, (c.relation, _norm(c.subject))}
            kept.append({q: prompt, a: ans, "key": k, "topic": c.topic})
            print(f"keep  [{c.topic}] p_key={p:.3f} {prompt!r} -> {ans!r} (key {k!r})")
    small = {t for t in {r["topic"] for r in kept} if count[t] < min_per_topic}
    for t in sorted(small):
        print(f"drop  [{t}] the whole topic: {count[t]} rows < {min_per_topic}")
    return [r for r in kept if r["topic"] not in small]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the fact file (jsonl) to verify or grow")
    parser.add_argument("--model", default="default", help="default (SmolLM2-135M-Instruct) or gemma3-270m")
    parser.add_argument("--min-p", type=float, default=0.5, help="least key probability a row may have")
    parser.add_argument("--candidates", action="store_true", help="ask the built-in candidates not yet in the file")
    parser.add_argument("--append", action="store_true", help="with --candidates: append the kept rows to the file")
    parser.add_argument("--max-per-topic", type=int, default=15, help="with --candidates: rows a topic may reach")
    parser.add_argument("--min-per-topic", type=int, default=8,
                        help="with --candidates: least rows a topic may end with")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    m, bank = Model(args.model, model, tokenizer), read_bank()
    if args.candidates:
        kept = try_candidates(m, args.file, args.min_p, bank, args.max_per_topic, args.min_per_topic)
        print(f"\n{len(kept)} candidates kept")
        if args.append and kept:
            with args.file.open("a") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        return 0
    return 1 if verify_file(m, args.file, args.min_p, bank) else 0


if __name__ == "__main__":
    sys.exit(main())
