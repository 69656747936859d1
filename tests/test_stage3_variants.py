"""`benchmarks/stage3_variants.py`: its variants, held-out split, scoring truth, summary and refusals."""

import json

from conftest import load_benchmark, run_benchmark


def caption_row(number: int, caption: str) -> dict:
    return {
        "id": f"easy-vqa-caption-{number}",
        "image": f"images/train/{number}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in a few words."},
            {"from": "gpt", "value": caption},
        ],
    }


def test_a_variant_is_a_name_and_its_overrides():
    bench = load_benchmark("stage3_variants")
    assert bench.parse_variant("recipe=") == ("recipe", [])
    assert bench.parse_variant("w=training.warmup_ratio=0.25; evf.detach_router_input=true") == (
        "w",
        ["training.warmup_ratio=0.25", "evf.detach_router_input=true"],
    )


def test_the_held_out_images_are_the_last_by_file_number_and_the_truth_is_their_caption(tmp_path):
    bench = load_benchmark("stage3_variants")
    rows = [
        caption_row(n, f"A red {shape}.") for n, shape in ((10, "circle"), (9, "triangle"), (2, "rectangle"))
    ]
    rows.append(caption_row(100, "A circle."))
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(rows))
    train, held_out = bench.split_captions(path, 2)
    assert [r["image"] for r in train] == ["images/train/2.png", "images/train/9.png"]  # 10 sorts after 9
    assert [r["image"] for r in held_out] == ["images/train/10.png", "images/train/100.png"]
    assert [bench.truth(r) for r in held_out] == [("red", "circle"), (None, "circle")]
    assert bench.words("A gray-black Circle!", ("black", "gray")) == ["gray", "black"]


def test_the_summary_pairs_each_variant_with_the_first_from_the_same_stage2():
    bench = load_benchmark("stage3_variants")
    lines = [
        {"quickstart": q, "model": m, "colour_pct": c, "shape_pct": 100.0, "both_pct": c}
        for q, m, c in (
            ("a", "stage2", 80.0),
            ("a", "recipe", 90.0),
            ("a", "new", 93.0),
            ("b", "recipe", 70.0),
            ("b", "new", 71.0),
        )
    ]
    recipe, new = bench.summary(lines, ["recipe", "new"])
    assert recipe == {
        "variant": "recipe",
        "stage2s": 2,
        "colour_pct_mean": 80.0,
        "shape_pct_mean": 100.0,
        "both_pct_mean": 80.0,
    }
    assert new["both_minus_recipe"] == 2.0 and new["se_across_stage2s"] == 1.0  # differences 3 and 1


def test_a_missing_quickstart_a_bad_variant_or_holdout_is_refused_with_exit_2(tmp_path):
    proc = run_benchmark(
        "stage3_variants", "--quickstart", str(tmp_path / "qs"), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "qs" / "stage2") in proc.stderr and "eve quickstart" in proc.stderr
    for bad, named in (
        ("--variant=no equals", "NAME=OVERRIDE"),
        ("--variant=a b=x", "NAME=OVERRIDE"),
        ("--variant=stage2=x=1", "not stage2"),
    ):
        proc = run_benchmark("stage3_variants", bad, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and named in proc.stderr
    proc = run_benchmark("stage3_variants", "--variant", "a=", "--variant", "a=x=1")
    assert proc.returncode == 2 and "once" in proc.stderr
    for name in ("stage2", "stage3"):
        (tmp_path / "qs" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "qs" / name / "quickstart_record.json").write_text("{}")
    proc = run_benchmark(
        "stage3_variants",
        "--quickstart",
        str(tmp_path / "qs"),
        "--holdout",
        "0",
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--holdout 0" in proc.stderr
    assert not (tmp_path / "o").exists()
