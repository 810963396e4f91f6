"""Live progress of a run, read from its own console output (tqdm bars, Kedro's node lines, our Error line)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# tqdm's line: "training demo_lora:  45%|####5     | 9/20 [00:02<00:03,  3.2step/s, loss=0.1234, speed=12.3 img/s]"
_BAR = re.compile(r"(?P<desc>[^\r\n|]*?):\s+(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+"
                  r"\[(?P<elapsed>[^<\]]*)<(?P<left>[^,\]]*)(?:,\s*(?P<rest>[^\]]*))?\]")
_NODE = re.compile(r"Running node: (\w+)")
_FIELD = re.compile(r"(\w+)=([^,]+)")
_ERROR = re.compile(r"^Error: (.+)$")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")


@dataclass(frozen=True)
class Progress:
    node: str = ""  # the Kedro node running (train_lora, caption_images ...)
    bar: str = ""  # the newest progress bar's label ("training demo_lora", "captioning (blip)")
    step: int = 0
    total: int = 0
    time_left: str = ""
    loss: str = ""
    speed: str = ""  # "35.0 img/s" as the trainer prints it
    train_step: int = 0  # the training bar's step of total, which later stages' bars do not replace
    train_total: int = 0


def read_tail(path: Path, limit: int = 64_000) -> str:
    """The last ``limit`` characters of a log (all of it when shorter); carriage returns end lines, as a
    terminal shows tqdm's redraws."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_progress(text: str) -> Progress:
    """The run's state from its output so far: the last node started and the last bar drawn. The training bar
    carries the step, the loss and img/s; tqdm's ``<left`` is the time left."""
    nodes = _NODE.findall(text)
    bars = list(_BAR.finditer(text))
    if not bars:
        return Progress(node=nodes[-1] if nodes else "")
    last = bars[-1]
    training = [bar for bar in bars if bar.group("desc").strip().startswith("training ")]
    fields = dict(_FIELD.findall(training[-1].group("rest") or "")) if training else {}
    train_step, train_total = (int(training[-1].group("n")), int(training[-1].group("total"))) if training else (0, 0)
    return Progress(node=nodes[-1] if nodes else "", bar=last.group("desc").strip(), step=int(last.group("n")),
                    total=int(last.group("total")), time_left=last.group("left").strip(),
                    loss=fields.get("loss", "").strip(), speed=fields.get("speed", "").strip(),
                    train_step=train_step, train_total=train_total)


def error_message(text: str) -> str:
    """The project's message (from the last ``Error: ...`` line on: what the CLI prints for our errors, naming the
    file or key), else the last line of output: never a whole traceback."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        found = _ERROR.match(lines[index].strip())
        if found:
            return "\n".join([found.group(1), *lines[index + 1:index + 20]])
    for index in range(len(lines) - 1, -1, -1):  # an error the project did not word: the exception's own lines
        if _EXCEPTION.match(lines[index]):
            return "\n".join(lines[index:index + 10])
    return lines[-1].strip() if lines else ""
