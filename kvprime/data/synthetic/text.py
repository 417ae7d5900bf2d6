"""The words of the synthetic tasks: keys, values, the facts' and questions' wording, and the filler grammar.

The filler is generated from a fixed grammar (below), not taken from a corpus, so the tasks need no asset and
no hub. Its vocabulary shares no word with the keys (colours, objects) or the word values and holds no digit:
the only sentences that name a key or a value are the facts, so a model that answers right found the fact.
"""

from __future__ import annotations

from .draws import Draws

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white", "brown",
           "pink", "grey", "violet", "crimson", "amber", "teal", "ivory", "scarlet", "copper")
OBJECTS = ("lamp", "door", "chest", "locker", "gate", "safe", "cabinet", "vault", "drawer", "box", "tower", "garage",
           "shed", "cellar", "trunk", "crate", "window", "barn", "workshop", "kiosk", "cupboard", "wagon", "boat",
           "tent", "mailbox", "attic", "studio", "bunker", "hangar", "pantry")
# Code words for value_format=words: short, common, and outside every other list here.
WORDS = ("falcon", "maple", "anchor", "pebble", "thunder", "velvet", "lantern", "cactus", "walnut", "glacier",
         "sparrow", "harp", "saddle", "comet", "otter", "quartz", "juniper", "compass", "tulip", "badger",
         "marble", "canyon", "feather", "pepper", "rocket", "willow", "zebra", "banjo", "coral", "dragon",
         "ember", "fossil", "ginger", "hazel", "igloo", "jasmine", "kettle", "lemon", "magnet", "nutmeg")

FACT = "The access code for the {key} is {value}."
POINTER = "The {key} uses the same access code as the {target}."
QUESTION = "What is the access code for the {key}?"
# Appended to the question: the value alone is the answer (as LongBench's "Only give me the answer" prompts).
INSTRUCTIONS = {"digits": "Answer with the number only.", "words": "Answer with the code word only."}
VALUE_FORMATS = tuple(INSTRUCTIONS)

_SUBJECTS = ("the farmer", "the old sailor", "a young teacher", "the baker", "the mayor", "a quiet student",
             "the gardener", "the painter", "the musician", "a traveller", "the doctor", "the fisherman",
             "a neighbour", "the librarian", "the captain", "my aunt", "the shepherd", "a tourist")
_VERBS = ("visited", "admired", "described", "cleaned", "repaired", "watched", "remembered", "photographed",
          "ignored", "measured", "followed", "painted", "crossed", "explored", "mentioned", "sketched")
_PLACES = ("the river", "the market", "the orchard", "the harbour", "the old mill", "the village square",
           "the hillside", "the library", "the station", "the meadow", "the chapel", "the bakery", "the forest path",
           "the school", "the fountain", "the vineyard", "the lighthouse", "the museum", "the valley", "the pier")
_TIMES = ("in the morning", "after lunch", "before sunset", "during the storm", "on a quiet afternoon",
          "late in the evening", "at dawn", "last spring", "every weekend", "in early autumn", "after the rain",
          "on the first day of summer")
_MANNERS = ("with great care", "without a word", "for a long time", "as usual", "once again", "in a hurry",
            "with a smile", "slowly")
_VIEWS = ("looks lovely", "seems smaller than before", "is busy", "feels calm", "is full of visitors",
          "was quiet", "smells of bread", "is worth a visit")
_TEMPLATES = (
    "{subject} {verb} {place} {time}.",
    "{subject} walked to {place} {time} and {verb} {place2}.",
    "{time_cap}, {subject} {verb} {place} {manner}.",
    "People say that {place} {view} {time}.",
    "{subject} often talks about {place}.",
    "Nobody {verb} {place} {manner} {time}.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def filler_sentence(draws: Draws) -> str:
    """One sentence of the grammar, every slot drawn from ``draws``."""
    template = draws.pick(_TEMPLATES)
    place, place2 = draws.sample(_PLACES, 2)
    time = draws.pick(_TIMES)
    text = template.format(subject=draws.pick(_SUBJECTS), verb=draws.pick(_VERBS), place=place, place2=place2,
                           time=time, time_cap=_cap(time), manner=draws.pick(_MANNERS), view=draws.pick(_VIEWS))
    return _cap(text)


def value(draws: Draws, value_format: str, digits: int) -> str:
    """A code: ``digits`` digits without a leading zero, or a code word."""
    if value_format == "words":
        return draws.pick(WORDS)
    first = str(1 + draws.index(9))
    return first + "".join(str(draws.index(10)) for _ in range(digits - 1))
