"""Natural-language prompts of the ``copy`` and ``open`` workloads (for speculative decoding).

  copy  the user hands over a paragraph or a code block and asks for it back,
        verbatim or lightly edited (typos fixed, a word replaced, an identifier
        renamed). Most of the answer is already in the prompt: the case where
        n-gram (prompt lookup) speculation proposes tokens that get accepted.
  open  an open-ended request of a dozen words (a story, a poem, an explanation):
        the answer cannot be looked up in the prompt, so speculation finds few
        or no proposals and can only cost time.

The passages ship inside the package (``data/passages.txt``, read through
importlib.resources). Both workloads are deterministic from the seed and do not
depend on the tokenizer: each round of requests walks the whole pool (passages,
or open prompts) in a fresh shuffled order, so a passage returns only after
every other one has been used.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

PASSAGES_RESOURCE = "data/passages.txt"
PROSE_EDITS = ("verbatim", "typos", "replace")
CODE_EDITS = ("verbatim", "rename")
NUM_TYPOS = 3
_HEADER = "@@ "
_TYPO_WORD = re.compile(r"[A-Za-z]{6,}")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Passage:
    """One paragraph or code block of the copy workload."""

    text: str
    language: str | None  # the code block's language ("python", "c", ...); None for prose
    old: str  # a word (prose) or identifier (code) in the text that an edit replaces
    new: str  # what the edit puts in its place

    @property
    def is_code(self) -> bool:
        return self.language is not None


@functools.cache
def load_passages() -> tuple[Passage, ...]:
    """The passages shipped with the package, in file order."""
    text = resources.files("tokenloom.bench").joinpath(PASSAGES_RESOURCE).read_text(encoding="utf-8")
    return parse_passages(text)


def parse_passages(text: str) -> tuple[Passage, ...]:
    """Passages from the ``@@ KIND OLD NEW`` format of ``data/passages.txt``; prose is
    wrapped in the file for reading and joined into one line here."""
    chunks = re.split(rf"^{re.escape(_HEADER)}", text, flags=re.MULTILINE)[1:]  # [0]: the comments
    passages = []
    for chunk in chunks:
        header, _, body = chunk.partition("\n")
        fields = header.split()
        if len(fields) != 3 or not (fields[0] == "prose" or fields[0].startswith("code:")):
            raise ValueError(f"bad passage header {_HEADER}{header!r}: expected '@@ prose|code:LANG OLD NEW'")
        kind, old, new = fields
        body = body.strip("\n")
        if not re.search(rf"\b{re.escape(old)}\b", body):
            raise ValueError(f"passage {_HEADER}{header!r} does not contain {old!r}")
        language = kind.removeprefix("code:") if kind != "prose" else None
        if language is None:
            # One line per paragraph: models answer prose unwrapped, and a newline where the
            # answer has a space would cut every n-gram match at each line end.
            body = " ".join(body.split())
        passages.append(Passage(text=body, language=language, old=old, new=new))
    return tuple(passages)


def copy_texts(num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` user messages of the copy workload."""
    rng = random.Random(f"{seed}-copy")
    texts = []
    for passage in _rounds(load_passages(), num_prompts, rng):
        edit = rng.choice(CODE_EDITS if passage.is_code else PROSE_EDITS)
        texts.append(copy_prompt(passage, edit, rng))
    return texts


def copy_prompt(passage: Passage, edit: str, rng: random.Random) -> str:
    """The instruction for ``edit`` followed by the passage (with typos added for ``typos``)."""
    if passage.is_code:
        block = f"```{passage.language}\n{passage.text}\n```"
        if edit == "verbatim":
            return f"Copy the following code exactly as it is. Reply with the code only, in a code block.\n\n{block}"
        if edit == "rename":
            return (f"Rewrite the code below with `{passage.old}` renamed to `{passage.new}` everywhere. "
                    f"Change nothing else, and reply with the code only, in a code block.\n\n{block}")
    else:
        if edit == "verbatim":
            return f"Repeat the following paragraph verbatim. Reply with the paragraph only.\n\n{passage.text}"
        if edit == "typos":
            return ("The paragraph below contains a few typos. Rewrite it with the typos fixed and nothing "
                    f"else changed. Reply with the corrected paragraph only.\n\n{add_typos(passage.text, rng)}")
        if edit == "replace":
            return (f'Rewrite the paragraph below with every "{passage.old}" replaced by "{passage.new}". '
                    f"Change nothing else, and reply with the paragraph only.\n\n{passage.text}")
    raise ValueError(f"no edit {edit!r} for a {'code' if passage.is_code else 'prose'} passage")


def add_typos(text: str, rng: random.Random, count: int = NUM_TYPOS) -> str:
    """``text`` with two neighbouring inner letters swapped in ``count`` words of 6+ letters."""
    words = [m for m in _TYPO_WORD.finditer(text) if _swappable(m.group())]
    chosen = sorted(rng.sample(words, min(count, len(words))), key=lambda m: m.start())
    pieces, position = [], 0
    for match in chosen:
        word = match.group()
        i = rng.choice(_swappable(word))
        pieces += [text[position:match.start()], word[:i], word[i + 1], word[i], word[i + 2:]]
        position = match.end()
    return "".join(pieces) + text[position:]


def _swappable(word: str) -> list[int]:
    """Positions i where swapping letters i and i+1 changes the word, first and last letters kept."""
    return [i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]


def open_texts(num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` user messages of the open workload."""
    return list(_rounds(open_prompts(), num_prompts, random.Random(f"{seed}-open")))


@functools.cache
def open_prompts() -> tuple[str, ...]:
    """Every open-ended prompt: each template with each of its subjects."""
    return (tuple(t.format(s) for t in _STORY_TEMPLATES for s in _STORY_SUBJECTS)
            + tuple(t.format(s) for t in _WHY_TEMPLATES for s in _WHY_SUBJECTS))


def _rounds(pool: Sequence[_T], count: int, rng: random.Random) -> Iterator[_T]:
    """``count`` items of ``pool``: whole shuffled rounds, the last one cut short."""
    while count > 0:
        for item in rng.sample(list(pool), len(pool))[:count]:
            yield item
        count -= len(pool)


_STORY_TEMPLATES = ("Write a short story about {}.", "Write a poem about {}.",
                    "Write a diary entry by {}.")
_STORY_SUBJECTS = (
    "a lighthouse keeper who finds a message in a bottle", "a robot that wants to learn to paint",
    "a cat that guards a bakery at night", "two rival chess players stuck in an elevator",
    "a girl who can hear what trees think", "an astronaut returning to an empty Earth",
    "a detective who is afraid of the dark", "a dragon that runs a small library",
    "a fisherman who catches a talking fish", "a violinist who lost her hearing",
    "an old man planting a forest alone", "a ghost who haunts a train station",
    "a child who builds a boat from newspapers", "a tailor whose clothes grant wishes",
    "a beekeeper preparing for winter", "a postman on his last day of work",
    "a mapmaker who draws an island that does not exist", "a clockmaker who can stop time",
    "a shy giant living in the mountains", "a chef cooking for a king who cannot taste",
)
_WHY_TEMPLATES = ("Explain why {}.", "Explain to a ten-year-old why {}.")
_WHY_SUBJECTS = (
    "the sky is blue", "bread rises in the oven", "the moon has phases", "ice floats on water",
    "leaves change colour in autumn", "we have leap years", "cats purr", "the sea is salty",
    "airplanes can fly", "we dream at night", "onions make people cry", "stars twinkle",
    "metal feels colder than wood", "bicycles need gears", "birds migrate south in winter",
    "thunder follows lightning", "soap removes grease", "mountains have snow on top",
    "rubber bands stretch", "the same side of the moon always faces Earth",
)
