"""LLaVA JSON/JSONL loading: formats, image resolution, `<image>` markers, weights, and every kind of bad row
named by file, line and id (raised, or skipped and recorded)."""

import json

import pytest
from PIL import Image

from eve_vlm.data import DataSource, load_rows
from eve_vlm.errors import DataError


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def qa(question, answer, **extra):
    return {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        **extra,
    }


def good_rows(n, image=None):
    return [
        qa("<image>\nwhat is it" if image else "what is it", f"answer {i}", id=f"r{i}", image=image)
        for i in range(n)
    ]


def test_json_and_jsonl_give_the_same_rows(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    rows = [qa("<image>\nwhat shape", "circle", id="a", image="img/a.png"), qa("hello", "hi", id="b")]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "d.jsonl", rows)

    from_json = load_rows([DataSource(str(tmp_path / "d.json"))]).rows
    from_jsonl = load_rows([DataSource(str(tmp_path / "d.jsonl"))]).rows
    for loaded in (from_json, from_jsonl):
        assert [(r.id, r.line, r.conversations) for r in loaded] == [
            ("a", 1, rows[0]["conversations"]),
            ("b", 2, rows[1]["conversations"]),
        ]
        assert loaded[0].image == str(tmp_path / "img" / "a.png") and loaded[1].image is None
    assert from_json[0].source == str(tmp_path / "d.json")


def test_image_folder_marker_insertion_and_role_content_keys(tmp_path):
    write_image(tmp_path / "images" / "x.png")
    rows = [
        qa("what colour", "red", id="no-marker", image="x.png"),
        {
            "id": 5,
            "image": "x.png",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        },
        {"conversations": [{"from": "system", "value": "be brief"}, *qa("a", "b")["conversations"]]},
    ]
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "d.jsonl", rows)
    loaded = load_rows([DataSource(str(path), image_folder=str(tmp_path / "images"))]).rows

    assert loaded[0].conversations[0]["value"] == "<image>\nwhat colour"
    assert loaded[1].id == "5" and loaded[1].conversations == [
        {"from": "human", "value": "<image>\nhi"},
        {"from": "gpt", "value": "yo"},
    ]
    assert loaded[2].id == "d-3" and loaded[2].conversations[0] == {"from": "system", "value": "be brief"}


def test_weights_repeat_and_subsample_deterministically(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", good_rows(10)))
    ids = [r.id for r in load_rows([DataSource(path)]).rows]
    assert ids == [f"r{i}" for i in range(10)]
    assert [r.id for r in load_rows([DataSource(path, weight=2.0)]).rows] == ids + ids

    halves = [[r.id for r in load_rows([DataSource(path, weight=0.5)], seed=s).rows] for s in range(5)]
    assert all(len(h) == 5 and h == sorted(h, key=ids.index) for h in halves)  # a half, in source order
    assert halves[0] == [r.id for r in load_rows([DataSource(path, weight=0.5)], seed=0).rows]
    assert len({tuple(h) for h in halves}) > 1

    one_and_a_half = [r.id for r in load_rows([DataSource(path, weight=1.5)]).rows]
    assert one_and_a_half[:10] == ids and len(one_and_a_half) == 15


BAD_ROWS = {  # name: (line written to the file, fragment of the reason)
    "missing_image": (qa("<image>\nwhat", "x", id="bad", image="nope.png"), "not found"),
    "corrupt_image": (qa("<image>\nwhat", "x", id="bad", image="corrupt.png"), "corrupt or not an image"),
    "no_gpt_turn": ({"id": "bad", "conversations": [{"from": "human", "value": "hi"}]}, "no gpt turn"),
    "empty_conversations": ({"id": "bad", "conversations": []}, "non-empty list"),
    "malformed_line": ('{"id": "bad", "conversations": [', "malformed JSON"),
    "marker_without_image": (qa("<image>\nwhat", "x", id="bad"), "has no 'image'"),
    "marker_in_gpt_turn": (qa("what", "<image>", id="bad", image="ok.png"), "first human turn"),
    "not_alternating": (
        {"id": "bad", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        "alternate",
    ),
    "unknown_role": ({"id": "bad", "conversations": [{"from": "bot", "value": "a"}]}, "role 'bot'"),
}


def write_with_bad_row(tmp_path, bad):
    write_image(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    return str(write_jsonl(tmp_path / "train.jsonl", [good_rows(1)[0], bad, good_rows(2, image="ok.png")[1]]))


@pytest.mark.parametrize("name", BAD_ROWS)
def test_bad_row_raises_naming_file_line_and_id(tmp_path, name):
    bad, reason = BAD_ROWS[name]
    path = write_with_bad_row(tmp_path, bad)
    with pytest.raises(DataError) as info:
        load_rows([DataSource(path)])
    message = str(info.value)
    assert f"{path}, line 2, row id" in message and reason in message and "on_bad_row='skip'" in message
    assert "'bad'" in message or name == "malformed_line"


@pytest.mark.parametrize("name", BAD_ROWS)
def test_bad_row_is_skipped_and_recorded(tmp_path, name):
    bad, reason = BAD_ROWS[name]
    path = write_with_bad_row(tmp_path, bad)
    loaded = load_rows([DataSource(path, weight=2.0)], on_bad_row="skip")
    assert [r.id for r in loaded.rows] == ["r0", "r1", "r0", "r1"]
    assert len(loaded.skipped) == 1
    skipped = loaded.skipped[0]
    assert (skipped.source, skipped.line) == (path, 2) and reason in skipped.reason
    assert skipped.id == ("train-2" if name == "malformed_line" else "bad")


def test_corrupt_image_passes_without_check_images(tmp_path):
    path = write_with_bad_row(tmp_path, BAD_ROWS["corrupt_image"][0])
    assert [r.id for r in load_rows([DataSource(path)], check_images=False).rows] == ["r0", "bad", "r1"]


def test_malformed_json_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
    with pytest.raises(DataError, match=r"d\.json is not valid JSON: .* at line 3, column 14"):
        load_rows([DataSource(str(path))], on_bad_row="skip")
    path.write_text('{"id": "a"}')
    with pytest.raises(DataError, match="not a list"):
        load_rows([DataSource(str(path))])
    with pytest.raises(DataError, match="does not exist"):
        load_rows([DataSource(str(tmp_path / "missing.jsonl"))])
