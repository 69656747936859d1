"""`eve chat` in-process on a tiny saved model: text-only answers are the base LLM's; image questions run."""

import numpy as np
import pytest
from conftest import tiny_model, tiny_tokenizer
from PIL import Image

from eve_vlm.cli import main
from eve_vlm.model import EveProcessor
from eve_vlm.serve.chat import answer, build_prompt, load_image


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(projector="ldp")
    processor = EveProcessor.from_parts(
        tokenizer=tiny_tokenizer(),
        vision_config=model.config.vision_config,
        image_size=model.config.image_size,
        num_image_tokens=model.config.num_image_tokens,
    )
    model.config.image_token_id = processor.image_token_id
    model.add_elastic_vision_ffns("alternate")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(tmp_path / "img.png")
    return tmp_path, model, processor


def test_text_only_answer_is_the_base_llms(saved, capsys):
    path, model, processor = saved
    assert main(["chat", "--model", str(path), "--max-new-tokens", "5", "what is the colour"]) == 0
    said = capsys.readouterr().out.strip()
    ids = processor.tokenizer(
        build_prompt(processor, "what is the colour", False), return_tensors="pt"
    ).input_ids
    base = model.language_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert said == processor.decode(base[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_image_question_and_bad_image(saved, capsys):
    path, model, processor = saved
    image = path / "img.png"
    assert main(["chat", "--model", str(path), "--image", str(image), "--max-new-tokens", "3", "what"]) == 0
    said = capsys.readouterr().out.strip()
    assert said == answer(model.eval(), processor, "what", load_image(str(image)), max_new_tokens=3)
    (path / "bad.png").write_bytes(b"not an image")
    assert main(["chat", "--model", str(path), "--image", str(path / "bad.png"), "what"]) == 2
    assert "Cannot read image" in capsys.readouterr().err
