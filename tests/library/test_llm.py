import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_pipeline.config import LLMTrainingParams
from lora_pipeline.core.checkpoints import ResumeError
from lora_pipeline.llm.constrained import JsonConstraint, parses
from lora_pipeline.llm.training import (
    adapter_state,
    eval_loss,
    generate_answers,
    load_causal_lm,
    token_f1,
    train_causal_lm,
    with_adapter,
)
from lora_pipeline.prep.llm_data import (
    IGNORE_INDEX,
    dedupe,
    pack,
    pad_packed_batch,
    parse_record,
    read_jsonl,
    split,
    tokenize,
)


@pytest.fixture(scope="module")
def llm_items(tiny_models):
    _, tokenizer = load_causal_lm(str(tiny_models["tiny-llm"]))
    pairs = [("患者：头痛三天", "初步考虑偏头痛，建议休息。"), ("Patient: knee pain after running", "Ice it and rest."),
             ("Patient: fever and cough", "Rest and drink fluids."), ("患者：发烧两天", "多喝水，注意休息。")]
    convs = [parse_record({"prompt": p, "response": r}, i) for i, (p, r) in enumerate(pairs * 4, start=1)]
    items = [tokenize(tokenizer, c, None, 128, "truncate") for c in convs]
    return tokenizer, items[:12], items[12:]


def test_read_jsonl_reports_bad_lines_and_keeps_good_ones(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "患者：头痛", "response": "休息"}, ensure_ascii=False).encode()
    lines = [good, b"", b'{"prompt": "a", "response": "b",}', b'{"prompt": "a"}', b'{"prompt": " ", "response": "x"}',
             b"\xff\xfe bad utf8", json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), good]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    before = path.read_bytes()
    convs, rejects = read_jsonl(path)
    assert [c.line for c in convs] == [1, 8]
    reasons = {r.line: r.reason for r in rejects}
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert "invalid JSON" in reasons[3] and "missing key(s) response" in reasons[4]
    assert "'prompt' is empty" in reasons[5] and "UTF-8" in reasons[6] and "assistant" in reasons[7]
    kept, dupes = dedupe(convs)
    assert len(kept) == 1 and dupes[0].reason == "duplicate of line 1"
    assert path.read_bytes() == before


@pytest.mark.parametrize("record", [
    {"prompt": "Patient: knee pain", "response": "Ice it and rest."},
    {"messages": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Patient: knee pain"},
                  {"role": "assistant", "content": "Ice it and rest."}]},
])
def test_loss_mask_covers_exactly_the_response(tiny_models, record):
    _, tokenizer = load_causal_lm(str(tiny_models["tiny-llm"]))
    item = tokenize(tokenizer, parse_record(record, 1), None, 256, "truncate")
    labels, ids = item["labels"], item["input_ids"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert labels[first:] == ids[first:]  # every response token (and the final EOS) is a target
    assert tokenizer.decode(ids[first:-1]) == "Ice it and rest." and ids[-1] == tokenizer.eos_token_id
    prompt_text = tokenizer.decode(ids[:first])
    assert prompt_text.endswith("<|assistant|>\n") and "knee pain" in prompt_text
    assert ("Be careful." in prompt_text) == ("messages" in record)
    assert tokenize(tokenizer, parse_record(record, 1), None, 8, "reject") is None
    assert len(tokenize(tokenizer, parse_record(record, 1), None, 16, "truncate")["input_ids"]) == 16


def test_split_is_seeded():
    convs = [parse_record({"prompt": f"p{i}", "response": "r"}, i) for i in range(1, 21)]
    train, val = split(convs, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16 and split(convs, 0.2, seed=1) == (train, val)


def _params(tiny_models, tmp_path, **overrides):
    values = dict(base_model=str(tiny_models["tiny-llm"]), device="cpu", batch_size=4, max_steps=12,
                  learning_rate=3e-3, lr_scheduler="constant", checkpoint_dir=str(tmp_path / "ckpt"),
                  output_name="t", resume="none")
    return LLMTrainingParams(**{**values, **overrides})


def test_training_lowers_validation_loss_and_resumes_exactly(tiny_models, llm_items, tmp_path):
    tokenizer, train_items, val_items = llm_items
    base, _ = load_causal_lm(str(tiny_models["tiny-llm"]))
    before = eval_loss(base, val_items, tokenizer.pad_token_id)
    params = _params(tiny_models, tmp_path / "a", save_steps=4)
    straight = train_causal_lm(base, tokenizer, train_items, val_items, params, dataset_hash="d")
    assert straight.eval_losses[-1] < before * 0.9, (before, straight.eval_losses)
    assert straight.tokens_per_second > 0

    def stop(step, model):
        if step == 6:
            raise KeyboardInterrupt

    interrupted = _params(tiny_models, tmp_path / "b", save_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train_causal_lm(load_causal_lm(str(tiny_models["tiny-llm"]))[0], tokenizer, train_items, val_items,
                        interrupted, dataset_hash="d", step_callback=stop)
    resumed = train_causal_lm(load_causal_lm(str(tiny_models["tiny-llm"]))[0], tokenizer, train_items, val_items,
                              _params(tiny_models, tmp_path / "b", save_steps=4, resume="latest"), dataset_hash="d")
    assert resumed.resumed_from.endswith("checkpoint-0000004") and len(resumed.losses) == 8
    for key, tensor in straight.adapter.items():
        assert torch.equal(tensor, resumed.adapter[key]), key
    with pytest.raises(ResumeError, match="different run"):
        train_causal_lm(load_causal_lm(str(tiny_models["tiny-llm"]))[0], tokenizer, train_items, val_items,
                        _params(tiny_models, tmp_path / "b", max_steps=16, resume="latest", lora_rank=8),
                        dataset_hash="d")


def test_exported_adapter_and_merged_model_give_the_trained_logits(tiny_models, llm_items, tmp_path):
    tokenizer, train_items, val_items = llm_items
    params = _params(tiny_models, tmp_path, max_steps=4)
    result = train_causal_lm(load_causal_lm(str(tiny_models["tiny-llm"]))[0], tokenizer, train_items, val_items,
                             params, dataset_hash="d")
    trained = with_adapter(load_causal_lm(params.base_model)[0], result.spec, result.adapter).eval()
    ids = torch.tensor([train_items[0]["input_ids"]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    trained.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 32
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(params.base_model),
                                         str(tmp_path / "adapter")).eval()
    merged = with_adapter(load_causal_lm(params.base_model)[0], result.spec, result.adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max() < 1e-5
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-4
    base = load_causal_lm(params.base_model)[0].eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter changes the model
    assert adapter_state(trained).keys() == result.adapter.keys()


def test_json_mode_always_parses_and_matches_the_schema(tiny_models):
    model, tokenizer = load_causal_lm(str(tiny_models["tiny-llm"]))
    schema = {"type": "object", "properties": {"diagnosis": {"type": "string", "maxLength": 30},
                                               "urgency": {"enum": ["low", "medium", "high"]}},
              "required": ["diagnosis", "urgency"], "additionalProperties": False}
    prompts = ["患者：头痛三天", "Patient: knee pain", "fever", "hello", "{", "answer in JSON"]
    for chosen in (schema, None):
        constraint = JsonConstraint(tokenizer, model.config.vocab_size, chosen)
        answers = generate_answers(model, tokenizer, prompts, 256, constraint)
        assert all(parses(a, chosen) for a in answers), answers
    free = generate_answers(model, tokenizer, prompts, 32)
    print("unconstrained valid-JSON rate:", sum(parses(a) for a in free) / len(free))  # reported, not asserted


def test_token_f1():
    assert token_f1("rest and fluids", "rest and fluids") == 1.0
    assert token_f1("多喝水", "多喝水，注意休息") == pytest.approx(2 * 1 * 3 / 8 / (1 + 3 / 8))
    assert token_f1("", "x") == 0.0


def test_packing_keeps_samples_apart(tiny_models, llm_items):
    tokenizer, train_items, _ = llm_items
    model, _ = load_causal_lm(str(tiny_models["tiny-llm"]))
    model.eval()
    rows = pack(train_items[:5], length=256)
    assert len(rows) < 5 and sum(len(r["segments"]) for r in rows) == 5  # several samples share a row
    batch = pad_packed_batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              attention_mask=batch["attention_mask"]).logits
        start = 0
        for size, item in zip(rows[0]["segments"], train_items):
            alone = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
            assert (packed_logits[0, start:start + size] - alone).abs().max() < 1e-4
            start += size
    assert batch["labels"][0, : rows[0]["segments"][0]].tolist() == train_items[0]["labels"]


def test_training_with_packing_lowers_validation_loss(tiny_models, llm_items, tmp_path):
    tokenizer, train_items, val_items = llm_items
    base, _ = load_causal_lm(str(tiny_models["tiny-llm"]))
    before = eval_loss(base, val_items, tokenizer.pad_token_id)
    result = train_causal_lm(base, tokenizer, train_items, val_items,
                             _params(tiny_models, tmp_path, packing=True, batch_size=2), dataset_hash="d")
    assert result.eval_losses[-1] < before * 0.9


def test_llm_export_uses_the_trained_spec_not_edited_parameters(tiny_models, llm_items, tmp_path):
    """Changing alpha/rank/targets in parameters_llm.yml after training must not change the exported adapter."""
    from lora_pipeline.core.spec import TrainingSummary
    from lora_pipeline.pipelines.llm_export.nodes import export_llm_adapter

    tokenizer, train_items, val_items = llm_items
    params = _params(tiny_models, tmp_path, max_steps=4)
    result = train_causal_lm(load_causal_lm(str(tiny_models["tiny-llm"]))[0], tokenizer, train_items, val_items,
                             params, dataset_hash="d")
    summary = TrainingSummary(spec=result.spec, base_model=params.base_model, output_name="x", steps=4, epochs=1,
                              seed=params.seed, learning_rate=params.learning_rate, dataset_hash="d",
                              started_at="t0", finished_at="t1")
    summary = TrainingSummary.model_validate_json(summary.model_dump_json())  # as the catalog stores it
    edited = {**params.model_dump(), "alpha": 4.0, "lora_rank": 2, "target_modules": ["q_proj"]}
    (peft_model, _), card = export_llm_adapter({"state": result.adapter}, summary, edited)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (params.lora_rank, params.alpha) == (16, 32.0)
    assert "alpha 32.0" in card
    ids = torch.tensor([train_items[0]["input_ids"]])
    trained = with_adapter(load_causal_lm(params.base_model)[0], result.spec, result.adapter).eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(params.base_model),
                                         str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max() < 1e-5
