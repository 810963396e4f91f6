# The two README commands: `make demo` and `make test`. Both work offline (package registry only).
VENV ?= .venv
PY := $(VENV)/bin/python
KEDRO := $(VENV)/bin/kedro
# No telemetry, no hub downloads: the demo and the tests use tiny models built locally.
export KEDRO_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-demo demo demo-sd-base demo-other-subjects test test-fast test-demo clean-demo

# `make demo` installs what the demo and the workbench run on (.[ui]); `make test` adds the test tools (Airflow,
# Playwright, kedro-viz, ONNX, ...), which took as long again to install (91 s against 183 s with a warm pip cache).
# pip installs without byte-compiling: it compiles all of site-packages on one core (65 of the 114 s that installing
# .[ui] took here). Python compiles each module the first time one is imported instead, and keeps the .pyc (19 s
# more for the demo's first import of torch, diffusers, kedro and mlflow). With PYTHONDONTWRITEBYTECODE in the
# environment every process would compile its imports again (12 s to import them with .pyc, 31 s without), so
# make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE
INSTALL = python3 -m venv $(VENV) && $(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet --no-compile -e

$(VENV)/.installed-demo: pyproject.toml
	$(INSTALL) '.[ui]'
	touch $@

$(VENV)/.installed: pyproject.toml
	$(INSTALL) '.[test]'
	touch $@ $(VENV)/.installed-demo

setup: $(VENV)/.installed

setup-demo: $(VENV)/.installed-demo

# The demo's two SD1.x LoRAs train longer than the tests' runs of conf/demo (30 / 20 steps), so that what each
# teaches (red shapes, striped backgrounds) shows in the comparison grid of the pre-trained tiny base. demo_lora at
# rank 32 (alpha 64, the same scale 2 as the tests' rank 4 / alpha 8): at rank 4 its red switched on between weights
# 0.5 and 0.75 (red share 0.001 at 0.5, 0.074 at 1, mean of 6 seeds, on the first pre-trained base); at rank 32, on
# the current base, the means of seeds 0-5 are 0.13 at 0.5 and 0.16 at 1, with red at 0.5 on all six.
# tests/library/test_demo_effect.py trains both as this does.
DEMO_PARAMS := demo_lora.training.max_steps=400,demo_lora.training.learning_rate=0.004,demo_lora.training.lora_rank=32,demo_lora.training.alpha=64,demo_lora.training.save_steps=200,demo_lora.training.sample_every_steps=200,demo_stripes.training.max_steps=300,demo_stripes.training.learning_rate=0.003,demo_stripes.training.save_steps=150,demo_stripes.training.sample_every_steps=150

# make demo's subjects by their base. The grid's two train on the tiny SD1.x base pre-trained on the demo world:
# the longest step of a machine's first make demo (about 4 minutes on one core). Meanwhile the other core
# pre-trains the Flux.1 base and runs what needs no SD1.x base: one subject per other family (conf/demo/subjects.yml)
# and the LLM track (kedro run --tags selects them: each subject's nodes carry its name, the LLM track's "llm",
# generation's and reporting's "library"). tests/pipelines/test_registry.py checks that the two lists hold
# conf/demo/subjects.yml's subjects, and the two runs every node once.
DEMO_GRID_SUBJECTS := demo_lora,demo_stripes
DEMO_OTHER_SUBJECTS := demo_sdxl_lora,demo_flux,demo_sd3,demo_chroma,demo_z_image,demo_flux2,demo_qwen_image
DEMO_OTHER_LOG := data/08_reporting/demo_other_subjects.log

demo: setup-demo
	$(PY) -m lora_pipeline.demo --only data
	$(MAKE) --no-print-directory -j2 demo-sd-base demo-other-subjects
	$(KEDRO) run --env demo --params "$(DEMO_PARAMS)" --tags "$(DEMO_GRID_SUBJECTS),library"
	mkdir -p docs && cp data/08_reporting/comparison_grid.png docs/comparison_grid.png
	@echo
	@echo "Subjects (conf/demo/subjects.yml): demo_lora, demo_stripes (SD1.x), demo_sdxl_lora (SDXL), demo_flux (Flux.1), demo_sd3 (SD3.5), demo_chroma (Chroma), demo_z_image (Z-Image), demo_flux2 (Flux.2), demo_qwen_image (Qwen-Image)"
	@echo "Normalized dataset:   data/03_primary/demo_lora/dataset/ (metadata.csv + images)"
	@echo "Data-quality report:  $$(ls -td data/08_reporting/demo_lora/quality_report.csv/*/quality_report.csv | head -1)"
	@echo "LoRA for WebUI/ComfyUI: $$(ls -t data/07_model_output/demo_lora.safetensors/*/demo_lora.safetensors | head -1)"
	@echo "LoRA for diffusers:     $$(ls -td data/07_model_output/demo_lora_diffusers/*/demo_lora_diffusers | head -1)"
	@echo "Second subject:         $$(ls -t data/07_model_output/demo_stripes.safetensors/*/demo_stripes.safetensors | head -1)"
	@echo "SDXL LoRA (WebUI):      $$(ls -t data/07_model_output/demo_sdxl_lora.safetensors/*/demo_sdxl_lora.safetensors | head -1)"
	@echo "SDXL LoRA (diffusers):  $$(ls -td data/07_model_output/demo_sdxl_lora_diffusers/*/demo_sdxl_lora_diffusers | head -1)"
	@echo "Flux.1 LoRA (WebUI):    $$(ls -t data/07_model_output/demo_flux.safetensors/*/demo_flux.safetensors | head -1)"
	@echo "Flux.1 LoRA (diffusers): $$(ls -td data/07_model_output/demo_flux_diffusers/*/demo_flux_diffusers | head -1)"
	@echo "SD3.5 LoRA (WebUI):     $$(ls -t data/07_model_output/demo_sd3.safetensors/*/demo_sd3.safetensors | head -1)"
	@echo "SD3.5 LoRA (diffusers): $$(ls -td data/07_model_output/demo_sd3_diffusers/*/demo_sd3_diffusers | head -1)"
	@echo "Chroma LoRA (WebUI):    $$(ls -t data/07_model_output/demo_chroma.safetensors/*/demo_chroma.safetensors | head -1)"
	@echo "Chroma LoRA (diffusers): $$(ls -td data/07_model_output/demo_chroma_diffusers/*/demo_chroma_diffusers | head -1)"
	@echo "Z-Image LoRA (ComfyUI): $$(ls -t data/07_model_output/demo_z_image.safetensors/*/demo_z_image.safetensors | head -1)"
	@echo "Z-Image LoRA (diffusers): $$(ls -td data/07_model_output/demo_z_image_diffusers/*/demo_z_image_diffusers | head -1)"
	@echo "Flux.2 LoRA (ComfyUI):  $$(ls -t data/07_model_output/demo_flux2.safetensors/*/demo_flux2.safetensors | head -1)"
	@echo "Flux.2 LoRA (diffusers): $$(ls -td data/07_model_output/demo_flux2_diffusers/*/demo_flux2_diffusers | head -1)"
	@echo "Qwen-Image LoRA (ComfyUI): $$(ls -t data/07_model_output/demo_qwen_image.safetensors/*/demo_qwen_image.safetensors | head -1)"
	@echo "Qwen-Image LoRA (diffusers): $$(ls -td data/07_model_output/demo_qwen_image_diffusers/*/demo_qwen_image_diffusers | head -1)"
	@echo "LLM adapter (PEFT):     $$(ls -td data/07_model_output/demo_llm_lora_adapter/*/demo_llm_lora_adapter | head -1)"
	@echo "Both subjects stacked:  $$(ls -td data/07_model_output/generated/*/generated | head -1)/000_00_seed1.png"
	@echo "Comparison grid:        data/08_reporting/comparison_grid.png (copied to docs/), measured per cell in comparison_report.md"
	@echo "Reports:              data/08_reporting/<subject>/ (quality, evaluation), llm_data_report, llm_eval_report"
	@echo "Runs:                 $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"

# make demo's two halves, side by side (see DEMO_GRID_SUBJECTS). The second writes to a log, so that the first's
# progress bar stays readable; OMP_NUM_THREADS=1 keeps its kedro run to its own core.
demo-sd-base: setup-demo
	$(PY) -m lora_pipeline.demo --only tiny-sd

demo-other-subjects: setup-demo
	@mkdir -p $(dir $(DEMO_OTHER_LOG))
	@echo "Meanwhile: the Flux.1 base, $(DEMO_OTHER_SUBJECTS) and the LLM track (log: $(DEMO_OTHER_LOG))"
	@{ $(PY) -m lora_pipeline.demo --only tiny-flux && OMP_NUM_THREADS=1 $(KEDRO) run --env demo \
		--pipelines image,llm --tags "$(DEMO_OTHER_SUBJECTS),llm"; } > $(DEMO_OTHER_LOG) 2>&1 \
		|| { tail -n 40 $(DEMO_OTHER_LOG); echo "make demo: the other subjects failed (above: the end of $(DEMO_OTHER_LOG))"; exit 1; }
	@echo "Done: the Flux.1 base, $(DEMO_OTHER_SUBJECTS) and the LLM track (log: $(DEMO_OTHER_LOG))"

# Two pytest workers (pytest-xdist), one OpenMP thread each: on 2 cores torch's spinning threads would otherwise
# fight (a 0.1 s tiny step took 32 s with four jobs side by side). The tests that need the demo's pre-trained base
# (@pytest.mark.pretrained: about 4 and 1.5 min to build the SD1.x and Flux.1 ones once per machine) run with `make test-demo`.
test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 -m "not pretrained" $(PYTEST_ARGS)

# The unit tests only (no @pytest.mark.slow: pipeline runs, subprocesses, kill -9, airflow, accelerate launch).
test-fast: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 -m "not slow and not pretrained" $(PYTEST_ARGS)

# What the demo's pre-trained tiny base shows (issue 22): each demo LoRA's statistic against its weight.
test-demo: setup
	$(VENV)/bin/pytest -m pretrained $(PYTEST_ARGS)

clean-demo:
	rm -rf data/01_raw/*/images data/02_intermediate/* data/03_primary/* data/08_reporting/* mlflow.db mlruns
	git checkout -- data 2>/dev/null || true
