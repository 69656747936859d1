"""Language-eval sets: fortune cleaning, WordNet parsing and MC items (fake snippets), real Debian data."""

import json

import pytest

from eve_vlm.data.builtin.language_sets import (
    FORTUNE_DIRS,
    FORTUNE_FILES,
    WORDNET_DIRS,
    build_fortunes_text,
    build_mc_items,
    build_wordnet_mc,
    clean_quote,
    find_dir,
    parse_data_line,
    parse_fortunes,
    parse_index_line,
)

FORTUNE_FILE = (
    "A banker is a fellow who lends you his umbrella when the sun is shining\n"
    "and wants it back the minute it begins to rain.\n"
    "\t\t-- Mark Twain\n"
    "%\n"
    "\tThe _\bb_\bo_\bl_\bd  word  is underlined here.\n"
    "%\n"
    "  /\\_/\\\n ( o.o )\n  > ^ <\n"
    "%\n"
    "Caf\u00e9 society is not ASCII at all.\n"
    "%\n"
    "Too short.\n"
)


def test_parse_fortunes_cleans_and_filters():
    assert parse_fortunes(FORTUNE_FILE) == [
        "A banker is a fellow who lends you his umbrella when the sun is shining\n"
        "and wants it back the minute it begins to rain.",
        "The bold word is underlined here.",
    ]


def test_attribution_continuation_lines_are_dropped():
    raw = "Wit is educated insolence, said the wise man once.\n\t-- Aristotle,\n\tin some book\n"
    assert clean_quote(raw) == "Wit is educated insolence, said the wise man once."


DATA_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by\n"
    "00001740 03 n 01 entity 0 000 | that which is perceived or known or inferred to have its own distinct"
    ' existence (living or nonliving); "an entity of its own"\n'
    "00002000 03 n 02 voter 0 elector 0 000 | a citizen who has a legal right to vote\n"
    "00002100 03 n 01 resistor 0 000 | an electrical device that resists the flow of electrical current\n"
    "00002200 03 n 01 bucket 0 000 | a roughly cylindrical vessel that is open at the top\n"
    "00002300 03 n 01 courtier 0 000 | an attendant at the court of a sovereign\n"
    "00002400 03 n 01 dog 0 000 | a member of the genus Canis that has been domesticated by man\n"
)
INDEX_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by\n"
    "entity n 1 1 ~ 1 1 00001740\n"
    "voter n 1 0 1 3 00002000\n"
    "elector n 1 0 1 0 00002000\n"
    "resistor n 1 0 1 2 00002100\n"
    "bucket n 1 0 1 1 00002200\n"
    "courtier n 1 0 1 1 00002300\n"
    "dog n 2 0 2 1 00002400 00009999\n"
)


def fake_wordnet():
    index = {"noun": [e for e in map(parse_index_line, INDEX_NOUN.splitlines()) if e]}
    synsets = {"noun": [s for s in map(parse_data_line, DATA_NOUN.splitlines()) if s]}
    return index, synsets


def test_parse_wordnet_lines():
    index, synsets = fake_wordnet()
    assert index["noun"][0] == ("entity", 1, 1)
    assert index["noun"][-1] == ("dog", 2, 1)
    voter = synsets["noun"][1]
    assert (voter.offset, voter.lemmas) == (2000, ("voter", "elector"))
    assert synsets["noun"][0].definition.startswith("that which is perceived")
    assert "an entity of its own" not in synsets["noun"][0].definition  # examples are cut


def test_mc_items_are_deterministic_and_well_formed():
    index, synsets = fake_wordnet()
    items = build_mc_items(index, synsets, n_items=10, seed=1)
    assert items == build_mc_items(index, synsets, n_items=10, seed=1)
    # dog has two senses, elector was never tagged in SemCor: neither is asked about
    assert {i["word"] for i in items} == {"voter", "resistor", "bucket", "courtier", "entity"}
    for item in items:
        assert item["question"] == f"What does the word '{item['word']}' mean?"
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        right = next(s for s in synsets["noun"] if item["word"] in s.lemmas).definition
        assert item["choices"][item["label"]] == right
        assert all(item["word"] not in c for k, c in enumerate(item["choices"]) if k != item["label"])


def test_mc_needs_enough_distractors():
    index, synsets = fake_wordnet()
    synsets["noun"] = synsets["noun"][:3]
    with pytest.raises(ValueError, match="too few"):
        build_mc_items(index, synsets, n_items=1)


FORTUNES = find_dir(FORTUNE_DIRS, FORTUNE_FILES[0])
WORDNET = find_dir(WORDNET_DIRS, "data.noun")


@pytest.mark.skipif(FORTUNES is None, reason="Debian fortunes is not installed (apt-get install fortunes)")
def test_real_fortunes_text_is_deterministic(tmp_path):
    counts = build_fortunes_text(FORTUNES, tmp_path / "a.txt")
    build_fortunes_text(FORTUNES, tmp_path / "b.txt")
    text = (tmp_path / "a.txt").read_text()
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert counts["quotes"] > 1000 and 100_000 < len(text) < 400_000
    assert text.isascii() and "\x08" not in text and "\n-- " not in text


@pytest.mark.skipif(
    WORDNET is None, reason="Debian wordnet-base is not installed (apt-get install wordnet-base)"
)
def test_real_wordnet_mc_is_deterministic(tmp_path):
    counts = build_wordnet_mc(WORDNET, tmp_path / "a.jsonl")
    build_wordnet_mc(WORDNET, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    items = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert counts["items"] == len(items) == 400
    assert len({i["word"] for i in items}) == 400
    labels = [i["label"] for i in items]
    assert all(labels.count(k) > 60 for k in range(4))  # the right answer's slot is spread
