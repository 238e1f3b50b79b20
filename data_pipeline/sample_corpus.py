"""A procedural, C4-shaped sample corpus for smoke tests and examples.

Real web text cannot ship with the repository, and random word salad teaches a model nothing, so a
smoke run could not tell a working training loop from a broken one. This generator writes pages that
look like C4 records (``{"text", "url", "timestamp"}``, one JSON object per line, gzip) and whose text
has structure a tiny model can learn within a few hundred steps, which pushes its loss well below the
unigram entropy of the tokens:

* each page has one topic, and each topic has its own nouns, verbs, adjectives and roles;
* subjects agree with their verbs ("the gardener grows" / "the gardeners grow");
* a person is introduced with a name, a role, a city and a favourite thing, and later sentences refer
  back to them by first name or pronoun and repeat the favourite thing;
* arithmetic facts are always correct ("three plus four is seven."), counting runs in order, a list
  announced as "four things" has four items, and weekdays and months follow each other.

Every line has at least five words and ends in ``.``, ``?`` or ``!`` so C4-style cleaning keeps it.
The text is written from scratch here: word lists and templates, no third-party text.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["iter_sample_documents", "write_sample_corpus"]

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]  # fmt: skip
_FIRST_NAMES = [
    ("Maria", "she"), ("Anna", "she"), ("Laura", "she"), ("Nora", "she"), ("Greta", "she"),
    ("Olivia", "she"), ("Sofia", "she"), ("Helen", "she"), ("Ruth", "she"), ("Ines", "she"),
    ("Peter", "he"), ("Tomas", "he"), ("David", "he"), ("Oscar", "he"), ("Victor", "he"),
    ("Hugo", "he"), ("Samuel", "he"), ("Felix", "he"), ("Martin", "he"), ("Leon", "he"),
]  # fmt: skip
_LAST_NAMES = [
    "Lopez", "Novak", "Berger", "Silva", "Okafor", "Tanaka", "Jensen", "Moreau", "Costa", "Horvat", "Lindqvist",
    "Kowalski", "Rossi", "Adams", "Nakamura", "Petrov",
]  # fmt: skip
_CITIES = [
    "Lisbon", "Oslo", "Vienna", "Porto", "Dublin", "Krakow", "Lyon", "Tartu", "Ghent", "Bergen", "Turin", "Leeds",
    "Malmo", "Graz", "Split", "Bremen",
]  # fmt: skip
_TLDS = ["com", "org", "net", "co.uk", "de", "info"]


@dataclass(frozen=True)
class _Topic:
    name: str
    sites: tuple[str, ...]
    roles: tuple[str, ...]
    nouns: tuple[str, ...]
    verbs: tuple[tuple[str, str], ...]  # (base form, past tense)
    adjectives: tuple[str, ...]
    places: tuple[str, ...]


def _topic(name: str, sites: str, roles: str, nouns: str, verbs: str, adjectives: str, places: str) -> _Topic:
    pairs = tuple(tuple(v.split("/")) for v in verbs.split())
    return _Topic(
        name, tuple(sites.split()), tuple(roles.split()), tuple(nouns.split()), pairs,  # type: ignore[arg-type]
        tuple(adjectives.split()), tuple(places.split()),
    )  # fmt: skip


_TOPICS = (
    _topic(
        "cooking", "kitchenjournal dailyrecipes tastyplates homecook", "chef baker cook waiter",
        "soup bread salad onion tomato potato sauce pie cake noodle pepper lemon cookie pancake",
        "cook/cooked bake/baked slice/sliced taste/tasted serve/served boil/boiled mix/mixed roast/roasted",
        "fresh warm spicy sweet crispy golden salty creamy", "kitchen bakery market restaurant",
    ),
    _topic(
        "gardening", "greenthumb gardenpath backyardnotes seedlings", "gardener farmer florist botanist",
        "rose tulip seed tree shrub carrot bean herb fern daisy lily hedge pumpkin melon",
        "plant/planted water/watered grow/grew prune/pruned pick/picked dig/dug trim/trimmed sow/sowed",
        "green tall young leafy wild tender hardy bright", "garden greenhouse orchard meadow",
    ),
    _topic(
        "astronomy", "skywatch starcharts nightorbit cosmosdaily", "astronomer pilot scientist observer",
        "star planet comet moon galaxy telescope orbit meteor nebula rocket satellite crater lens cluster",
        "observe/observed track/tracked measure/measured photograph/photographed map/mapped spot/spotted study/studied launch/launched",
        "distant bright faint giant cold ancient red silent", "observatory desert mountain laboratory",
    ),
    _topic(
        "football", "matchday goalline pitchside fanzone", "coach player referee striker",
        "ball goal team match season league stadium kick pass trophy whistle jersey boot corner",
        "score/scored pass/passed kick/kicked defend/defended win/won train/trained tackle/tackled coach/coached",
        "fast strong young famous loud tired lucky proud", "stadium field club arena",
    ),
    _topic(
        "computers", "bytesized codecorner devnotes techbench", "programmer engineer designer tester",
        "program server laptop keyboard screen file bug network cable chip printer router script database",
        "install/installed debug/debugged compile/compiled test/tested write/wrote fix/fixed update/updated build/built",
        "new fast small quiet cheap modern broken reliable", "office lab workshop studio",
    ),
    _topic(
        "travel", "wanderlog roadmiles tripdiary farshores", "traveler guide driver sailor",
        "train ticket map suitcase hotel bridge river island castle beach harbor museum valley ferry",
        "visit/visited explore/explored book/booked pack/packed cross/crossed photograph/photographed reach/reached hike/hiked",
        "old quiet sunny crowded famous lovely narrow busy", "station harbor village airport",
    ),
    _topic(
        "music", "notesandchords bandroom songbook liveset", "singer drummer pianist composer",
        "song guitar piano drum melody chord concert album violin choir rhythm note band flute",
        "play/played sing/sang record/recorded tune/tuned compose/composed practice/practiced hear/heard perform/performed",
        "loud soft happy slow catchy gentle famous lively", "theater studio hall club",
    ),
)  # fmt: skip


def _number_words(n: int) -> str:
    """Spell out 0..999 the way a web page would ("forty-two")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    head = _ONES[hundreds] + " hundred"
    return head if rest == 0 else f"{head} and {_number_words(rest)}"


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x", "o")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _third_person(verb: str) -> str:
    """Present tense for a singular subject: the agreement the model has to learn."""
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class _Page:
    """Sentence templates sharing one page's topic and cast, so later sentences can refer back."""

    def __init__(self, rng: random.Random, topic: _Topic) -> None:
        self.rng = rng
        self.t = topic
        first, pronoun = rng.choice(_FIRST_NAMES)
        self.first, self.pronoun = first, pronoun
        self.last = rng.choice(_LAST_NAMES)
        self.role = rng.choice(topic.roles)
        self.city = rng.choice(_CITIES)
        self.favorite = rng.choice(topic.nouns)
        self.favorite_adj = rng.choice(topic.adjectives)
        self.place = rng.choice(topic.places)

    # Each template returns one sentence of at least five words.
    def intro(self) -> str:
        return (
            f"{self.first} {self.last} is {_article(self.favorite_adj)} {self.favorite_adj} {self.role} "
            f"from {self.city}, and {self.pronoun} works at the {self.place}."
        )

    def favorite_fact(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return (
                f"{self.first} says that the {self.favorite_adj} {self.favorite} is the best part of the day."
            )
        if r < 0.7:
            return f"{_cap(self.pronoun)} always talks about the {self.favorite_adj} {self.favorite} at the {self.place}."
        return f"As we said before, {self.first} from {self.city} loves the {self.favorite}."

    def agreement(self) -> str:
        rng, t = self.rng, self.t
        verb = rng.choice(t.verbs)[0]
        noun, adj = rng.choice(t.nouns), rng.choice(t.adjectives)
        role = rng.choice(t.roles)
        r = rng.random()
        if r < 0.25:
            return f"The {role} {_third_person(verb)} the {adj} {noun} every {rng.choice(_WEEKDAYS)}."
        if r < 0.5:
            return f"The {_plural(role)} {verb} the {adj} {_plural(noun)} every {rng.choice(_WEEKDAYS)}."
        if r < 0.75:
            return f"{self.first} {_third_person(verb)} {_article(adj)} {adj} {noun} at the {self.place}."
        return f"{_cap(self.pronoun)} {_third_person(verb)} the {_plural(noun)} with great care."

    def past(self) -> str:
        rng, t = self.rng, self.t
        past = rng.choice(t.verbs)[1]
        day = rng.randrange(1, 29)
        month = rng.randrange(12)
        year = rng.randrange(2009, 2022)
        weekday = _WEEKDAYS[_dt.date(year, month + 1, day).weekday()]
        return f"On {weekday}, {_MONTHS[month]} {day}, {year}, {self.first} {past} the {rng.choice(t.nouns)}."

    def arithmetic(self) -> str:
        rng = self.rng
        a, b = rng.randrange(1, 13), rng.randrange(1, 13)
        op = rng.random()
        digits = rng.random() < 0.4
        fmt = str if digits else _number_words
        if op < 0.45:
            return f"{_cap(fmt(a))} plus {fmt(b)} is {fmt(a + b)}."
        if op < 0.7:
            hi, lo = max(a, b), min(a, b)
            return f"{_cap(fmt(hi))} minus {fmt(lo)} is {fmt(hi - lo)}."
        if op < 0.9:
            return f"{_cap(fmt(a))} times {fmt(b)} equals {fmt(a * b)}."
        noun = rng.choice(self.t.nouns)
        return f"If you have {fmt(a)} {_plural(noun)} and get {fmt(b)} more, you have {fmt(a + b)}."

    def counting(self) -> str:
        rng = self.rng
        start = rng.randrange(1, 8)
        n = rng.randrange(4, 8)
        words = [_number_words(i) for i in range(start, start + n)]
        return f"{self.first} counted the {_plural(rng.choice(self.t.nouns))}: {', '.join(words)}."

    def listing(self) -> str:
        rng = self.rng
        n = rng.randrange(2, 6)
        items = rng.sample(self.t.nouns, n)
        return f"For this you will need {_number_words(n)} things: {_join_list(['the ' + i for i in items])}."

    def calendar(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            i = rng.randrange(7)
            return f"The day after {_WEEKDAYS[i]} is always {_WEEKDAYS[(i + 1) % 7]}."
        i = rng.randrange(12)
        return f"The month after {_MONTHS[i]} is {_MONTHS[(i + 1) % 12]}, as everyone knows."

    def question(self) -> str:
        rng, t = self.rng, self.t
        verb = rng.choice(t.verbs)[0]
        noun, adj = rng.choice(t.nouns), rng.choice(t.adjectives)
        r = rng.random()
        if r < 0.35:
            return f"Have you ever seen {_article(adj)} {adj} {noun} like this one?"
        if r < 0.7:
            return f"Does {self.first} still {verb} the {noun} on {rng.choice(_WEEKDAYS)}?"
        return f"Do the {_plural(rng.choice(t.roles))} {verb} the {_plural(noun)} too?"

    def exclamation(self) -> str:
        adj, noun = self.rng.choice(self.t.adjectives), self.rng.choice(self.t.nouns)
        return f"What {_article(adj)} {adj} {noun} that was at the {self.place}!"

    def title(self) -> str:
        adj = self.rng.choice(self.t.adjectives)
        return f"{_cap(adj)} {_plural(self.favorite)} and more from the {self.place} in {self.city}."

    def paragraph(self) -> str:
        makers = (
            self.agreement, self.agreement, self.past, self.arithmetic, self.counting, self.listing,
            self.calendar, self.question, self.exclamation, self.favorite_fact,
        )  # fmt: skip
        return " ".join(self.rng.choice(makers)() for _ in range(self.rng.randrange(2, 5)))


def _document_rng(seed: int, index: int) -> random.Random:
    # One generator per document, seeded from (seed, index): document i is the same whatever `docs` is.
    return random.Random(seed * 1_000_003 + index * 7_919 + 17)


def iter_sample_documents(*, docs: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """Yield ``docs`` C4-like records ``{"text", "url", "timestamp"}``; the same for the same seed."""
    if docs < 0:
        raise ValueError(f"docs={docs} must be >= 0")
    epoch = _dt.datetime(2019, 1, 1, tzinfo=_dt.timezone.utc)
    for index in range(docs):
        rng = _document_rng(seed, index)
        topic = rng.choice(_TOPICS)
        page = _Page(rng, topic)
        title = page.title()
        paragraphs = [title, page.intro() + " " + page.paragraph()]
        for _ in range(rng.randrange(2, 5)):
            paragraphs.append(page.paragraph())
        paragraphs.append(page.favorite_fact())
        slug = "-".join(w.strip(".,").lower() for w in title.split()[:5])
        url = f"https://www.{rng.choice(topic.sites)}.{rng.choice(_TLDS)}/{slug}-{index}"
        stamp = epoch + _dt.timedelta(seconds=rng.randrange(3 * 365 * 86_400))
        yield {"text": "\n".join(paragraphs), "url": url, "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_sample_corpus(
    out_dir: str | Path, *, docs: int = 2000, seed: int = 0, docs_per_file: int = 1000
) -> list[Path]:
    """Write ``out_dir/sample-00000.json.gz``, ... and return their paths.

    The files are byte-identical for the same (docs, seed, docs_per_file): gzip's header timestamp is
    pinned to 0 and the file name is left out of it, so tests and checksums can rely on them.
    """
    if docs_per_file < 1:
        raise ValueError(f"docs_per_file={docs_per_file} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    documents = iter_sample_documents(docs=docs, seed=seed)
    n_files = max(1, -(-docs // docs_per_file))
    for file_index in range(n_files):
        path = out / f"sample-{file_index:05d}.json.gz"
        tmp = path.with_name(path.name + ".tmp")
        count = min(docs_per_file, docs - file_index * docs_per_file)
        lines = [json.dumps(next(documents), ensure_ascii=False) + "\n" for _ in range(count)]
        payload = gzip.compress("".join(lines).encode("utf-8"), compresslevel=6, mtime=0)
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        paths.append(path)
    return paths
