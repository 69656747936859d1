"""`eve` without the serve extra: every other command works, `eve serve` and the interactive `eve chat` exit
with status 2 and a message naming the extra (no traceback)."""

import subprocess
import sys

BLOCKED = ("pydantic", "fastapi", "uvicorn", "starlette")
CODE = (
    "import sys\n"
    f"for name in {BLOCKED!r}: sys.modules[name] = None  # as if not installed\n"
    "from eve_vlm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def eve_without_serve_extra(*args):
    return subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, timeout=300)


def test_serve_and_chat_name_the_extra_and_train_does_not_need_it(tmp_path):
    served = eve_without_serve_extra("serve", str(tmp_path))
    assert served.returncode == 2, served.stderr
    assert "pip install -e '.[serve]'" in served.stderr and "Traceback" not in served.stderr
    chat = eve_without_serve_extra("chat", str(tmp_path))
    assert chat.returncode == 2 and "'.[serve]'" in chat.stderr and "Traceback" not in chat.stderr
    train = eve_without_serve_extra("train", str(tmp_path / "missing.yaml"))
    assert train.returncode == 2, train.stderr
    assert "does not exist" in train.stderr and "Traceback" not in train.stderr
