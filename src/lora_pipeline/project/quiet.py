"""Known third-party noise, silenced once, early: registered as a ``kedro.init`` plugin (run before Kedro
imports its plugins, whose imports raise some of these warnings) and called from settings.py too.

Only messages listed here are hidden; the project's own warnings, and any new third-party one, still show.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

KNOWN_WARNINGS = (
    r".*Add type hints to the `predict` method",  # mlflow.pyfunc, on import (kedro-mlflow imports it)
    r"register_new_resolver\(\) is deprecated",  # OmegaConf via Kedro's config loader
    r".*is_gradient_checkpointing.* is deprecated",  # transformers 5, from diffusers/peft internals
    r".*torchvision.*",  # transformers' image-processor fallback notice
    r"Already found a `peft_config` attribute in the model",  # PEFT, on the second LoRA of a stack: intended
    # Kedro, for the generation node that reads every subject's export (demo_lora.lora_kohya): the dots are
    # the subjects' namespaces, on purpose
    r"One or more dataset names contain '\.' characters",
)
QUIET_LOGGERS = {
    # "No LoRA keys associated to CLIPTextModel found" for every UNet-only LoRA (the usual kind)
    "diffusers.loaders.peft": logging.ERROR,
    "diffusers.loaders.lora_base": logging.ERROR,
    "diffusers.loaders.lora_pipeline": logging.ERROR,
    # "There are modules in ... that should be kept in float32: []" (an empty list) on every .to(dtype)
    "diffusers.models.modeling_utils": logging.ERROR,
    "transformers.modeling_utils": logging.ERROR,
    # with the quantization extra installed, on every import: optional CPU kernels and CUDA-arch .so files that
    # do not apply to this machine, and torch's notes on torchao's enums; a real failure is an error, not these
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    "torchao": logging.ERROR,
    "torch.utils._pytree": logging.ERROR,
    "diffusers.quantizers.torchao.torchao_quantizer": logging.ERROR,
}


class _KnownWarnings(logging.Filter):
    """For warnings routed through logging (Kedro captures them): mlflow raises its hint inside its own
    ``catch_warnings(); simplefilter("once")``, which no warnings filter set outside can reach."""

    patterns = [re.compile(message) for message in KNOWN_WARNINGS]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(pattern.search(text) for pattern in self.patterns)


class BarSafeStream:
    """The stream Kedro's rich log handler writes to, made tqdm-aware: while a progress bar is on screen, a log
    line clears the bars, prints, and redraws them (tqdm's ``external_write_mode``), instead of landing in
    the middle of the bar's line. ``logging_redirect_tqdm`` cannot do this: it only reroutes StreamHandlers."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        from tqdm.auto import tqdm

        if getattr(tqdm, "_instances", None):
            with tqdm.external_write_mode(file=sys.stderr, nolock=False):
                return self._stream.write(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):  # isatty, fileno, encoding, flush ... as the real stream
        return getattr(self._stream, name)


def _bar_safe_logging() -> None:
    from rich import get_console

    console = get_console()  # the one Kedro's RichHandler prints through
    if not isinstance(console.file, BarSafeStream):
        console.file = BarSafeStream(console.file)


def install() -> None:
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    _bar_safe_logging()
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _KnownWarnings) for f in warnings_logger.filters):
        warnings_logger.addFilter(_KnownWarnings())
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    if os.environ.get("LORA_PIPELINE_VERBOSE") != "1":
        # About a third of a run's lines were "Loading data from ... / Saving data to ..."; DEBUG detail here.
        logging.getLogger("kedro.io.data_catalog").setLevel(logging.WARNING)
