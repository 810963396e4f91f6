import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_pipeline.core.checkpoints import ResumeError
from lora_pipeline.core.config import LLMTrainingParams
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


def test_split_is_stable_when_lines_are_appended():
    convs = [parse_record({"prompt": f"患者 {i}: headache", "response": "rest"}, i) for i in range(1, 201)]
    train, val = split(convs, 0.2, salt="42")
    assert 25 <= len(val) <= 55 and len(train) + len(val) == 200  # about the fraction
    more = convs + [parse_record({"prompt": f"new patient {i}", "response": "r"}, 200 + i) for i in range(1, 51)]
    train2, val2 = split(more, 0.2, salt="42")
    old_lines = {c.line for c in convs}
    assert {c.line for c in val2 if c.line in old_lines} == {c.line for c in val}  # nothing old moved
    assert {c.line for c in train2 if c.line in old_lines} == {c.line for c in train}
    # the same prompt (whitespace aside) never sits on both sides, whatever its answer
    twins = [parse_record({"prompt": "患者  7: headache ", "response": "other"}, 999)]
    assert (twins[0] in split(convs + twins, 0.2, "42")[1]) == any(c.line == 7 for c in val)
    assert split(convs, 0.2, salt="other") != (train, val)  # the salt reshuffles on purpose


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
    from lora_pipeline.core.spec import LLMTrainingSummary, LoraFile
    from lora_pipeline.pipelines.llm_export.nodes import export_llm_adapter

    tokenizer, train_items, val_items = llm_items
    params = _params(tiny_models, tmp_path, max_steps=4)
    result = train_causal_lm(load_causal_lm(str(tiny_models["tiny-llm"]))[0], tokenizer, train_items, val_items,
                             params, dataset_hash="d")
    summary = LLMTrainingSummary(spec=result.spec, base_model=params.base_model, output_name="x", steps=4, epochs=1,
                                 seed=params.seed, learning_rate=params.learning_rate, dataset_hash="d",
                                 started_at="t0", finished_at="t1")
    summary = LLMTrainingSummary.model_validate_json(summary.model_dump_json())  # as the catalog stores it
    edited = LLMTrainingParams(**{**params.model_dump(), "alpha": 4.0, "lora_rank": 2, "target_modules": ["q_proj"]})
    folder, card = export_llm_adapter(LoraFile(result.adapter), summary, edited)
    peft_model = folder.parts[0]
    assert folder.model_card == card
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


def test_jsonschema_checks_types_ranges_items_and_more():
    from lora_pipeline.llm.constrained import schema_errors

    schema = {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "symptoms": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "urgency": {"enum": ["low", "medium", "high"]}},
        "required": ["age", "urgency"], "additionalProperties": False}
    assert parses('{"age": 45, "symptoms": ["头痛"], "urgency": "low"}', schema)
    for bad, why in [('{"age": "old", "urgency": "low"}', "age"), ('{"age": 500, "urgency": "low"}', "age"),
                     ('{"age": 5.5, "urgency": "low"}', "age"),
                     ('{"age": 5, "urgency": "low", "symptoms": ["a", "b", "c", "d", "e", "f", "g"]}', "symptoms"),
                     ('{"age": 5, "urgency": "urgent"}', "urgency"), ('{"age": 5}', "urgency"),
                     ('{"age": 5, "urgency": "low", "extra": 1}', "extra"), ('{"age": 5, "symptoms": [1]}', ""),
                     ("not json", "not JSON")]:
        assert not parses(bad, schema), bad
        assert why in schema_errors(bad, schema), (bad, schema_errors(bad, schema))
    assert parses('{"anything": 1}') and not parses("{")


def test_truncation_is_flagged_with_the_full_length(tiny_models):
    _, tokenizer = load_causal_lm(str(tiny_models["tiny-llm"]))
    record = parse_record({"prompt": "Patient: knee pain " * 20, "response": "Ice it and rest."}, 1)
    full = tokenize(tokenizer, record, None, 4096, "truncate")
    cut = tokenize(tokenizer, record, None, 32, "truncate")
    assert full["truncated_from"] == 0 and cut["truncated_from"] == len(full["input_ids"]) > 32


def test_generation_formats_prompts_exactly_as_training(tiny_models):
    from lora_pipeline.prep.llm_data import prompt_ids, user_prompt

    model, tokenizer = load_causal_lm(str(tiny_models["tiny-llm"]))
    record = parse_record({"prompt": "Patient: knee pain", "response": "Ice it."}, 1)
    trained_on = tokenize(tokenizer, record, None, 256, "truncate")
    first_answer = next(i for i, label in enumerate(trained_on["labels"]) if label != IGNORE_INDEX)
    assert prompt_ids(tokenizer, user_prompt("Patient: knee pain"), None) == trained_on["input_ids"][:first_answer]
    assert trained_on["input_ids"][0] == tokenizer.bos_token_id  # BOS in training and in generation
    calls = []
    original = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"][0].tolist()) or original(**kw)
    generate_answers(model, tokenizer, ["Patient: knee pain"], 2)
    assert calls == [trained_on["input_ids"][:first_answer]]


def _train_and_export(tiny_models, llm_items, tmp_path, folder, max_steps: int) -> LLMTrainingParams:
    """A short training run, exported through the llm_export node into ``folder`` (adapter + tokenizer)."""
    from lora_pipeline.core.spec import LLMTrainingSummary, LoraFile
    from lora_pipeline.pipelines.llm_export.nodes import export_llm_adapter

    tokenizer, train_items, val_items = llm_items
    params = _params(tiny_models, tmp_path, max_steps=max_steps)
    result = train_causal_lm(load_causal_lm(params.base_model)[0], tokenizer, train_items, val_items, params,
                             dataset_hash="d")
    summary = LLMTrainingSummary(spec=result.spec, base_model=params.base_model, output_name="t", steps=max_steps,
                                 epochs=1, seed=1, learning_rate=1e-3, dataset_hash="d", started_at="a",
                                 finished_at="b")
    (peft_model, tok) = export_llm_adapter(LoraFile(result.adapter), summary, params)[0].parts
    peft_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return params


def test_warm_start_continues_the_previous_adapter_exactly(tiny_models, llm_items, tmp_path):
    """init_adapter: the step-0 model of a retrain computes what the previous adapter did, even with another
    alpha; another base or rank is refused."""
    from lora_pipeline.core.errors import ConfigError
    from lora_pipeline.llm.training import llm_lora_spec, load_init_adapter, resolve_init_adapter

    tokenizer, train_items, val_items = llm_items
    folder = tmp_path / "exports" / "t_adapter" / "2026-01-01T00.00.00.000Z" / "t_adapter"
    params = _train_and_export(tiny_models, llm_items, tmp_path, folder, max_steps=4)
    assert resolve_init_adapter("latest", str(tmp_path / "exports"), "t") == folder
    ids = torch.tensor([train_items[0]["input_ids"]])
    previous = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(params.base_model), str(folder)).eval()
    retrain = _params(tiny_models, tmp_path, alpha=8.0, init_adapter=str(folder))  # another alpha: rescaled
    state = load_init_adapter(folder, llm_lora_spec(retrain), retrain.base_model)
    warm = with_adapter(load_causal_lm(retrain.base_model)[0], llm_lora_spec(retrain), state).eval()
    with torch.no_grad():
        torch.testing.assert_close(warm(input_ids=ids).logits, previous(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    # the trainer starts from it: its first loss is the previous adapter's, well below a new adapter's
    continued = train_causal_lm(load_causal_lm(retrain.base_model)[0], tokenizer, train_items, val_items,
                                _params(tiny_models, tmp_path / "c", max_steps=1, alpha=8.0), dataset_hash="d2",
                                init_state=state, init_from=str(folder))
    fresh = train_causal_lm(load_causal_lm(retrain.base_model)[0], tokenizer, train_items, val_items,
                            _params(tiny_models, tmp_path / "f", max_steps=1), dataset_hash="d2")
    assert continued.losses[0] < fresh.losses[0]
    with pytest.raises(ConfigError, match="set lora_rank: 16"):
        load_init_adapter(folder, llm_lora_spec(_params(tiny_models, tmp_path, lora_rank=8)), retrain.base_model)
    with pytest.raises(ConfigError, match="another base|trained on base model"):
        load_init_adapter(folder, llm_lora_spec(retrain), str(tiny_models["tiny-sd"]))


@pytest.mark.slow
def test_exported_adapter_loads_from_any_folder(tiny_models, llm_items, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "adapter"
    _train_and_export(tiny_models, llm_items, tmp_path, folder, max_steps=2)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    script = ("import sys, torch; from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer;"
              "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
              "print(m.peft_config['default'].base_model_name_or_path)")
    out = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=elsewhere, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tiny_models["tiny-llm"].resolve())


def test_gradient_checkpointing_on_the_llm_uses_the_current_api(tiny_models, llm_items, tmp_path):
    import warnings

    tokenizer, train_items, val_items = llm_items
    base, _ = load_causal_lm(str(tiny_models["tiny-llm"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_causal_lm(base, tokenizer, train_items, val_items,
                        _params(tiny_models, tmp_path, gradient_checkpointing=True, max_steps=1), dataset_hash="d")
    assert base.is_activation_checkpointing
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)], caught


def test_llm_eval_loads_the_trained_base_and_spec_not_edited_parameters(tiny_models, llm_items, tmp_path,
                                                                        monkeypatch):
    """llm_training parameters edited between training and evaluation change neither the base model evaluated
    nor the rank/alpha the report states: both are the training summary's."""
    from lora_pipeline.core.config import LLMDataParams, LLMEvalParams
    from lora_pipeline.core.spec import LLMTrainingSummary
    from lora_pipeline.llm.training import llm_lora_spec
    from lora_pipeline.pipelines.llm_eval import nodes

    folder = tmp_path / "adapter"
    params = _train_and_export(tiny_models, llm_items, tmp_path, folder, max_steps=2)
    summary = LLMTrainingSummary(spec=llm_lora_spec(params), base_model=params.base_model, output_name="t", steps=2,
                                 epochs=1, seed=1, learning_rate=1e-3, dataset_hash="d", started_at="a",
                                 finished_at="b")
    edited = params.model_copy(update={"base_model": "someone/edited-after-training", "lora_rank": 2, "alpha": 4.0})
    loaded = []
    real = nodes.load_causal_lm
    monkeypatch.setattr(nodes, "load_causal_lm", lambda base, *a: loaded.append(base) or real(base, *a))
    validation = [{"line": 1, "messages": [{"role": "user", "content": "Patient: fever and cough"},
                                           {"role": "assistant", "content": "Rest and drink fluids."}]}]
    report, metrics = nodes.evaluate_llm(validation, folder, summary, LLMDataParams(tokenizer=params.base_model),
                                         edited, LLMEvalParams(max_new_tokens=4, max_prompts=1))
    assert loaded == [params.base_model, params.base_model]  # base, then base + adapter
    assert f"LoRA rank {params.lora_rank}, alpha {params.alpha}" in report and "rank 2" not in report
    assert {"eval_loss_base", "eval_loss_adapter"} <= metrics.keys()
