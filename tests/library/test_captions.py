import pytest
from PIL import Image

from lora_pipeline.core.errors import ModelNotFoundError
from lora_pipeline.core.models import resolve_model
from lora_pipeline.prep import captions as cap


def test_normalize_prompt_puts_trigger_then_front_keywords_first():
    text = "Red Dress,  smiling , sks, portrait,red dress,, Outdoors"
    out = cap.normalize_prompt(text, trigger="sks", front_keywords=["outdoors"])
    assert out == "sks, outdoors, red dress, smiling, portrait"


def test_normalize_prompt_is_idempotent_and_keeps_case_on_request():
    once = cap.normalize_prompt("A, b, A", trigger="T", lowercase=False)
    assert once == "T, A, b"
    assert cap.normalize_prompt(once, trigger="T", lowercase=False) == once


def test_apply_template_leaves_no_stray_separators():
    assert cap.apply_template("{trigger}, {caption}", "", "a cat") == "a cat"
    assert cap.apply_template("{trigger}, {caption}", "sks", "a cat, sofa") == "sks, a cat, sofa"


def test_tag_frequency_counts_tags_across_captions():
    assert cap.tag_frequency(["a, b", "b, c", "b"]) == {"b": 3, "a": 1, "c": 1}


def test_resolve_model_explains_missing_paths_and_hub_ids(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelNotFoundError, match="allow_download: true"):
        resolve_model("Salesforce/blip-image-captioning-large")
    with pytest.raises(ModelNotFoundError, match="check the path"):
        resolve_model("./models/missing-folder/")


def test_blip_captioner_captions_a_batch(tiny_models):
    captioner = cap.BlipCaptioner(str(tiny_models["tiny-blip"]), device="cpu", max_new_tokens=5)
    out = captioner.caption([Image.new("RGB", (70, 50), (200, 0, 0)), Image.new("RGB", (50, 70))])
    assert len(out) == 2 and all(isinstance(text, str) and text for text in out)


def test_clip_tagger_keeps_top_k_tags_above_threshold(tiny_models):
    vocabulary = ["circle", "square", "stripes", "red"]
    tagger = cap.ClipTagger(str(tiny_models["tiny-clip"]), vocabulary, top_k=2, threshold=0.0, device="cpu")
    [tags] = tagger.caption([Image.new("RGB", (64, 64), (255, 0, 0))])
    assert len(cap.split_tags(tags)) == 2 and set(cap.split_tags(tags)) <= set(vocabulary)
    strict = cap.ClipTagger(str(tiny_models["tiny-clip"]), vocabulary, top_k=4, threshold=0.99, device="cpu")
    assert strict.caption([Image.new("RGB", (64, 64))]) == [""]


def test_caption_in_batches_reports_unreadable_images():
    class Echo:
        name = "echo"
        calls: list[int] = []

        def caption(self, images):
            self.calls.append(len(images))
            return [f"{image.size[0]}" for image in images]

    def load(name):
        if name == "bad":
            raise ValueError("corrupt")
        return Image.new("RGB", (int(name), 4))

    echo = Echo()
    captions, failures = cap.caption_in_batches(echo, ["1", "2", "bad", "3"], load, batch_size=2)
    assert captions == {"1": "1", "2": "2", "3": "3"}
    assert failures == {"bad": "corrupt"}
    assert echo.calls == [2, 1]
