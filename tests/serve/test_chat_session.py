"""Interactive `eve chat`: streamed answers, history, /image, /reset, /exit, in-process and against a running
`eve serve` (--url); the one-shot form stays; bad options exit with status 2 and a message."""

import io

import pytest
from tiny_server import live_server, tiny_parts

from eve_vlm.cli import main
from eve_vlm.serve.session import ChatError, ChatSession, LocalBackend, RemoteBackend


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("model")
    model, processor, base = tiny_parts()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(path / "img.png")
    (path / "bad.png").write_bytes(b"not an image")
    return path, model, processor, base


def run_session(backend, lines, **options):
    out = io.StringIO()
    feed = iter(lines)

    def read(prompt):
        out.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    session = ChatSession(backend, {"max_tokens": 6, "temperature": 0, **options}, out=out, read=read)
    session.run()
    return session, out.getvalue()


def answers(transcript):
    """The answer printed after each prompt line that was a message."""
    return [chunk.split("\n")[0] for chunk in transcript.split("> ")[1:]]


def test_interactive_session_in_process(saved):
    path, model, processor, base = saved
    image = str(path / "img.png")
    lines = [
        "what is red",
        f"/image {image}",
        "what is in this image",
        "/image " + str(path / "bad.png"),
        "/reset",
    ]
    lines += ["what is red", "/nonsense", "/exit", "never read"]
    with LocalBackend.load(str(path)) as backend:
        session, transcript = run_session(backend, lines)
    said = answers(transcript)
    first = said[0]
    ids = processor.tokenizer(
        processor.chat_prompt("what is red"), return_tensors="pt", add_special_tokens=False
    ).input_ids
    out = base.generate(
        input_ids=ids, max_new_tokens=6, do_sample=False, suppress_tokens=[model.config.image_token_id]
    )
    assert first == processor.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert said[1] == f"(image {image} attached to the next message)"
    assert said[2]  # the image answer, streamed
    assert "Cannot read image" in said[3]
    assert said[4] == "(history cleared)"
    assert said[5] == first  # after /reset the same question gets the same answer
    assert "unknown command /nonsense" in said[6]
    assert "never read" not in transcript
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_history_carries_images_of_earlier_turns(saved):
    path = saved[0]
    with LocalBackend.load(str(path)) as backend:
        session, _ = run_session(
            backend, [f"/image {path / 'img.png'}", "what is in this image", "what colour"]
        )
    assert len(session.history) == 4
    assert session.history[0]["content"][0]["type"] == "image_url"
    assert isinstance(session.history[2]["content"], str)


def test_url_talks_to_a_running_server(saved):
    path, model, processor, _ = saved
    lines = ["what is blue", f"/image {path / 'img.png'}", "what is in this image"]
    with LocalBackend.load(str(path)) as backend:
        _, local = run_session(backend, lines)
    with live_server(model, processor) as (url, _engine), RemoteBackend(url) as remote:
        _, served = run_session(remote, lines + ["red " * 400])
    assert answers(served)[:3] == answers(local)[:3]
    assert "context" in answers(served)[3]  # the server's 400 is shown, the session goes on


def test_cli_forms_and_errors(saved, capsys, monkeypatch):
    path = saved[0]
    assert main(["chat", str(path), "what", "is", "red", "--max-new-tokens", "3"]) == 0
    one_shot = capsys.readouterr().out.strip()
    assert main(["chat", "--model", str(path), "--max-new-tokens", "3", "what is red"]) == 0
    assert capsys.readouterr().out.strip() == one_shot
    monkeypatch.setattr("sys.stdin", io.StringIO("what is red\n/exit\n"))
    assert main(["chat", str(path), "--max-new-tokens", "3"]) == 0
    assert "> " in capsys.readouterr().out
    assert main(["chat"]) == 2
    assert "needs a model folder" in capsys.readouterr().err
    assert main(["chat", str(path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["chat", "--url", "http://127.0.0.1:9"]) == 2
    assert "no eve serve answers there" in capsys.readouterr().err
    assert main(["chat", str(path), "--image", str(path / "img.png")]) == 2
    assert "/image" in capsys.readouterr().err
    assert main(["chat", "--url", "http://127.0.0.1:9", "--dtype", "bfloat16"]) == 2
    assert "--dtype does not apply with --url" in capsys.readouterr().err
    assert main(["chat", "--url", "http://127.0.0.1:9", "--threads", "2"]) == 2
    assert "--threads does not apply with --url" in capsys.readouterr().err
    assert main(["chat", str(path), "--temperature", "5"]) == 2
    assert "--temperature must be between 0 and 2" in capsys.readouterr().err
    assert main(["chat", str(path), "what", "--temperature", "0.7"]) == 2
    assert "greedy" in capsys.readouterr().err
    assert main(["serve", str(path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(path), "--dtype", "float64"]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert main(["serve", str(path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err


class RefusingBackend:
    """A server that refuses every message (as `eve serve` refuses an image it cannot use)."""

    def __init__(self):
        self.seen = []

    def stream(self, messages, options):
        self.seen.append(messages[-1]["content"])
        raise ChatError("bad image (HTTP 400)")
        yield


class InterruptedBackend:
    def stream(self, messages, options):
        yield "partial"
        raise KeyboardInterrupt


def test_an_unaccepted_or_refused_image_is_not_kept(saved, tmp_path):
    from PIL import Image

    bmp = tmp_path / "img.bmp"
    Image.new("RGB", (8, 8)).save(bmp)
    backend = RefusingBackend()
    session, out = run_session(backend, [f"/image {bmp}", f"/image {saved[0] / 'img.png'}", "a", "b"])
    assert "Image format BMP is not accepted" in out
    assert "image was dropped" in out
    assert isinstance(backend.seen[0], list) and backend.seen[1] == "b"  # the second turn has no image
    assert session.images == []


def test_ctrl_c_ends_the_session_quietly():
    def interrupted(prompt):
        raise KeyboardInterrupt

    ChatSession(RefusingBackend(), {}, out=io.StringIO(), read=interrupted).run()
    session, out = run_session(InterruptedBackend(), ["hello", "never read"])
    assert "partial" in out and "never read" not in out
