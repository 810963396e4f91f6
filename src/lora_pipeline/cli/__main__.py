"""``python -m lora_pipeline.cli ARGS`` is ``lora-pipeline ARGS`` (what ``accelerate launch -m`` needs)."""

from lora_pipeline.cli.commands import main

main()
