"""Text sets for measuring what a VLM keeps of its base LLM's language skill, built from Debian packages.

- **Held-out English text** (perplexity): quotations from `fortunes` (`/usr/share/games/fortunes`: the
  `FORTUNE_FILES` collections), with the `fortune` overstrike formatting removed, attribution lines
  (`-- Author`) dropped, whitespace normalised, non-ASCII and ASCII-art quotes skipped and duplicates removed.
  Quotes are separated by a blank line. Nothing here is ever trained on.
- **Word-meaning multiple choice** (accuracy): from WordNet 3.0 (`wordnet-base`, `/usr/share/wordnet`), in the
  style of lm-eval's MC tasks: "What does the word 'X' mean?" with four glosses, one right. Words are
  unambiguous and common: lower-case alphabetic lemmas with exactly one sense in exactly one part of speech,
  tagged at least once in the SemCor concordance (`tagsense_cnt` >= 1 in `index.*`). Distractors are glosses
  of other synsets of the same part of speech that neither contain the word nor list it as a lemma.

Both are deterministic (sorted inputs, a fixed-seed `random.Random`): the same bytes on every run.
Formats: the text file is UTF-8 (ASCII) with `\\n` line ends; the MC file is JSONL with `id`, `word`, `pos`,
`question`, `choices` (4 strings) and `label` (index of the right choice).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes", "/usr/share/fortune")
FORTUNE_FILES = ("literature", "wisdom", "science", "humorists")
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/wordnet/dict", "/usr/local/share/wordnet")
WORDNET_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
MC_POS = ("noun", "verb", "adj")
MC_ITEMS = 400
MC_SEED = 20240901
QUESTION = "What does the word '{word}' mean?"

_OVERSTRIKE = re.compile(r".\x08")
_LEMMA = re.compile(r"^[a-z]{4,}$")


def find_dir(candidates: Iterable[str], must_have: str) -> Path | None:
    """The first candidate folder that holds `must_have`, or None."""
    for folder in candidates:
        if (Path(folder) / must_have).is_file():
            return Path(folder)
    return None


# ---- fortunes -> held-out text ------------------------------------------------------------------------------


def clean_quote(raw: str) -> str | None:
    """One fortune's text without formatting and attribution, or None when it is not plain English prose."""
    lines = []
    for line in _OVERSTRIKE.sub("", raw).splitlines():
        line = re.sub(r"[ \t]+", " ", line.strip())
        if line.startswith("-- ") or line == "--":
            break  # the attribution, and its continuation lines, end the quote
        lines.append(line)
    text = "\n".join(lines).strip()
    text = re.sub(r"\n{2,}", "\n", text)
    if not text or not text.isascii() or any(ord(c) < 32 and c != "\n" for c in text):
        return None
    visible = [c for c in text if not c.isspace()]
    if len(text.split()) < 4 or sum(c.isalpha() for c in visible) < 0.7 * len(visible):
        return None  # too short, or ASCII art / tables
    return text


def parse_fortunes(text: str) -> list[str]:
    """The clean quotes of one fortune file (quotes are separated by lines holding only `%`)."""
    quotes = []
    for raw in re.split(r"^%\n", text.replace("\r\n", "\n"), flags=re.MULTILINE):
        quote = clean_quote(raw)
        if quote:
            quotes.append(quote)
    return quotes


def build_fortunes_text(fortune_dir: str | os.PathLike, out_file: str | os.PathLike) -> dict:
    """Writes the held-out text file; returns quote and character counts."""
    seen, quotes = set(), []
    for name in FORTUNE_FILES:
        text = (Path(fortune_dir) / name).read_text(encoding="latin-1")
        for quote in parse_fortunes(text):
            if quote not in seen:
                seen.add(quote)
                quotes.append(quote)
    body = "\n\n".join(quotes) + "\n"
    Path(out_file).write_text(body, encoding="utf-8", newline="\n")
    return {"quotes": len(quotes), "characters": len(body), "files": list(FORTUNE_FILES)}


# ---- WordNet -> multiple choice -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: its byte offset in `data.<pos>`, lemmas and definition (gloss without examples)."""

    offset: int
    lemmas: tuple[str, ...]
    definition: str


def parse_data_line(line: str) -> Synset | None:
    """Parses a `data.<pos>` line (`offset lex_filenum ss_type w_cnt word lex_id ... | gloss`).

    Returns None for the license header lines (which start with spaces).
    """
    if not line or line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    lemmas = tuple(re.sub(r"\(.*\)$", "", fields[4 + 2 * k]).lower() for k in range(count))
    definition = gloss.split('"')[0].strip().rstrip(";").strip()
    return Synset(offset=int(fields[0]), lemmas=lemmas, definition=definition)


def parse_index_line(line: str) -> tuple[str, int, int] | None:
    """Parses an `index.<pos>` line into `(lemma, synset_cnt, tagsense_cnt)`; None for header lines."""
    if not line or line.startswith(" "):
        return None
    fields = line.split()
    p_cnt = int(fields[3])
    return fields[0], int(fields[2]), int(fields[5 + p_cnt])


def good_definition(definition: str) -> bool:
    return definition.isascii() and 15 <= len(definition) <= 150


def mentions(definition: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}", definition, flags=re.IGNORECASE) is not None


def mc_candidates(index: dict[str, list[tuple[str, int, int]]]) -> list[tuple[str, str]]:
    """`(pos, lemma)` of the words asked about: one sense in one part of speech, seen in SemCor."""
    pos_count: dict[str, int] = {}
    for entries in index.values():
        for lemma, _, _ in entries:
            pos_count[lemma] = pos_count.get(lemma, 0) + 1
    return sorted(
        (pos, lemma)
        for pos, entries in index.items()
        for lemma, synsets, tagged in entries
        if pos in MC_POS and _LEMMA.match(lemma) and synsets == 1 and tagged >= 1 and pos_count[lemma] == 1
    )


def build_mc_items(
    index: dict[str, list[tuple[str, int, int]]],
    synsets: dict[str, list[Synset]],
    *,
    n_items: int = MC_ITEMS,
    seed: int = MC_SEED,
) -> list[dict]:
    """Builds the multiple-choice items.

    Args:
        index: Per part of speech (`noun`, ...), the parsed `index.<pos>` lines.
        synsets: Per part of speech, the parsed `data.<pos>` synsets in file order.
        n_items: How many items (fewer when fewer words qualify).
        seed: Seed of the one `random.Random` that picks words, distractors and the right answer's slot.
    """
    rng = random.Random(seed)
    by_lemma = {pos: {lemma: s for s in entries for lemma in s.lemmas} for pos, entries in synsets.items()}
    pools = {pos: [s for s in entries if good_definition(s.definition)] for pos, entries in synsets.items()}
    usable = [
        (pos, lemma)
        for pos, lemma in mc_candidates(index)
        if lemma in by_lemma.get(pos, {})
        and good_definition(by_lemma[pos][lemma].definition)
        and not mentions(by_lemma[pos][lemma].definition, lemma)
    ]
    items = []
    for pos, lemma in rng.sample(usable, min(n_items, len(usable))):
        right = by_lemma[pos][lemma].definition
        choices: list[str] = []
        for _ in range(1000):
            if len(choices) == 3:
                break
            other = rng.choice(pools[pos])
            if (
                lemma not in other.lemmas
                and not mentions(other.definition, lemma)
                and other.definition != right
                and other.definition not in choices
            ):
                choices.append(other.definition)
        if len(choices) < 3:
            raise ValueError(f"too few {pos} glosses to draw three distractors for {lemma!r}")
        label = rng.randrange(4)
        choices.insert(label, right)
        items.append(
            {
                "id": f"wordnet-mc-{len(items):04d}",
                "word": lemma,
                "pos": pos,
                "question": QUESTION.format(word=lemma),
                "choices": choices,
                "label": label,
            }
        )
    return items


def read_wordnet(wordnet_dir: str | os.PathLike, parts: Iterable[str] = tuple(WORDNET_POS)):
    """Parses `index.<pos>` and `data.<pos>` for each part of speech: returns `(index, synsets)`."""
    index, synsets = {}, {}
    for pos in parts:
        with open(Path(wordnet_dir) / f"index.{pos}", encoding="latin-1") as f:
            index[pos] = [e for e in map(parse_index_line, f) if e]
        with open(Path(wordnet_dir) / f"data.{pos}", encoding="latin-1") as f:
            synsets[pos] = [s for s in map(parse_data_line, f) if s]
    return index, synsets


def build_wordnet_mc(wordnet_dir: str | os.PathLike, out_file: str | os.PathLike, **kwargs) -> dict:
    """Writes the multiple-choice JSONL; returns item counts (total and per part of speech)."""
    items = build_mc_items(*read_wordnet(wordnet_dir), **kwargs)
    with open(out_file, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    counts = {"items": len(items)}
    for pos in MC_POS:
        counts[pos] = sum(item["pos"] == pos for item in items)
    return counts
