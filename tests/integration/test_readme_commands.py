"""The README's commands, taken from the README itself: each parses against the real CLIs and names real
pipelines, subjects, datasets and parameters; the per-subject run is run as written and its console checked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from kedro.framework.cli.cli import KedroCLI
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.pipeline import Pipeline

from lora_pipeline.cli import main as lora_pipeline_cli
from lora_pipeline.core.config import validate_all
from lora_pipeline.prep.kohya_config import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
BIN = Path(sys.executable).parent
# The README's example names, mapped onto the demo project's.
EXAMPLE_NAMES = {"<subject>": "demo_lora", "aki": "demo_lora", "my_lora": "demo_lora",
                 "<version>": "2026-01-01T00.00.00.000Z"}
# Commands of other tools the README shows for after our pipeline: not ours to run here; and an option named
# in a sentence ("`kedro run --params` would split it").
OTHER_TOOLS = ("python llama.cpp/", "llama-cli", "mlflow ui", "accelerate launch")
PROSE = {"kedro run --params"}


def readme_commands(text: str) -> list[str]:
    """Every shell command the README shows: lines of ```bash blocks (continuations joined, comments dropped)
    and inline `kedro ...` / `lora-pipeline ...` / `make ...` spans."""
    commands = []
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    commands += re.findall(r"`((?:[A-Z_]+=\S+ )*(?:kedro|lora-pipeline|make|\.venv/bin/pip) [^`]+)`", text)
    return [c for c in commands if c and not c.startswith("#")]


def _words(command: str) -> list[str]:
    for example, demo in EXAMPLE_NAMES.items():
        command = re.sub(rf"(?<![\w/.-]){re.escape(example)}(?![\w-])", demo, command)
    words = shlex.split(command, comments=True)
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
        words = words[1:]
    return words


def _leaf(group: click.Group, words: list[str]) -> tuple[click.Context, list[str]]:
    """Walk the CLI's groups down to the command ``words`` name, and parse its options and arguments as click
    would (option callbacks, such as ``--params`` splitting, run)."""
    context = click.Context(group, info_name=group.name)
    command: click.Command = group
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        name, words = words[0], words[1:]
        found = command.get_command(context, name)
        assert found is not None, f"no command {name!r} (under {command.name!r})"
        command = found
        if isinstance(command, click.Group):
            context = click.Context(command, info_name=name, parent=context)
    try:
        return command.make_context(command.name, words, parent=context), words
    except click.exceptions.Exit as done:  # --help
        assert done.exit_code == 0
        return context, words


def _check_kedro_run(options: dict, project: Path, catalog) -> None:
    names = options.get("pipelines") or ["__default__"]
    for name in names:
        assert name in pipelines, f"no pipeline {name!r}; registered: {sorted(pipelines)}"
    selected = sum((pipelines[name] for name in names), start=Pipeline([]))
    namespaces = options.get("namespaces") or []
    if namespaces:
        known = {node.namespace.split(".")[0] for node in selected.nodes if node.namespace}
        assert set(namespaces) <= known, f"namespaces {namespaces} not among {sorted(known)}"
        selected = selected.only_nodes_with_namespaces(namespaces)
    tags = options.get("tags") or []
    if tags:
        known = set().union(*(node.tags for node in selected.nodes))
        assert set(tags) <= known, f"tags {tags} not among {sorted(known)}"
    # --load-versions does nothing unless the dataset is an input of what runs (the old "reproduce" bug)
    for dataset in options.get("load_versions") or {}:
        assert dataset in selected.all_inputs(), f"{dataset} is not read by {names}"
        assert catalog.get(dataset)._version is not None, f"{dataset} is not versioned"
    if options.get("params"):  # merged into the demo's parameters and checked as a run would
        with KedroSession.create(project_path=project, env="demo", runtime_params=options["params"]) as session:
            context = session.load_context()
            validate_all(context.params, context.config_loader.subjects())


@pytest.fixture
def demo_catalog(project):
    with KedroSession.create(project_path=project, env="demo") as session:
        yield session.load_context().catalog


def test_the_readme_shows_the_commands_a_user_needs():
    commands = readme_commands(README.read_text())
    assert commands[:2] == ["make demo", "make test"]
    for expected in ("lora-pipeline generate", "lora-pipeline import-kohya", "lora-pipeline lineage",
                     "kedro run --namespaces", "--load-versions", "kedro viz build", "kedro jupyter lab"):
        assert any(expected in c for c in commands), expected


@pytest.mark.slow
def test_every_readme_command_parses_and_names_real_things(project, demo_catalog):
    makefile = (REPO_ROOT / "Makefile").read_text()
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    kedro_cli = KedroCLI(project_path=project)
    checked = []
    for command in readme_commands(README.read_text()):
        if command.startswith(OTHER_TOOLS) or command in PROSE:
            continue
        words = _words(command)
        if words[0] == "make":
            assert all(re.search(rf"^{target}:", makefile, re.M) for target in words[1:]), command
        elif words[0].endswith("pip"):
            for spec in words[words.index("-e") + 1:words.index("-e") + 2]:
                for extra in re.findall(r"\[(.*)\]", spec)[0].split(","):
                    assert extra in extras, f"{command}: no extra {extra!r} in pyproject.toml"
        elif words[0] == "kedro":
            context, _ = _leaf(kedro_cli, words[1:])
            if context.command.name == "run":
                _check_kedro_run(context.params, project, demo_catalog)
        elif words[0] == "lora-pipeline":
            _leaf(lora_pipeline_cli, [w if not w.endswith((".toml", ".yaml", ".safetensors")) else __file__
                                      for w in words[1:]])
        else:
            raise AssertionError(f"the README shows a command this test does not know: {command}")
        checked.append(command)
    assert len(checked) >= 20, checked
    # The notebook extra really holds what `kedro jupyter lab` / `notebook` need.
    assert {re.split(r"[<>=\[ ]", dep)[0] for dep in extras["notebook"]} >= {"jupyterlab", "notebook"}


@pytest.mark.slow
def test_one_subject_run_as_the_readme_writes_it_shows_bars_and_only_our_warnings(project):
    """`kedro run --namespaces <subject>` on the demo: the console a user reads."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "KEDRO_ENV": "demo",
           "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    words = _words(next(c for c in readme_commands(README.read_text()) if c.startswith("kedro run --namespaces aki")))
    result = subprocess.run([str(BIN / "kedro"), *words[1:]], cwd=project, env=env, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert (project / "data/07_model_output/demo_lora.safetensors").is_dir()
    # progress bars on every long step: captioning, latents, training, evaluation
    for bar in ("captioning (", "encoding latents", "training demo_lora", "denoising loss", "CLIP prompts"):
        assert bar in output, bar
    assert "Pipeline execution completed successfully" in output or "Completed" in output
    assert "Loading data from" not in output  # catalog lines only with LORA_PIPELINE_VERBOSE=1
    for noise in ("Warning:", "FutureWarning", "DeprecationWarning", "UserWarning", "register_new_resolver",
                  "Add type hints", "should be kept in float32", "No LoRA keys associated"):
        assert noise not in output, f"{noise!r} in:\n{output[-4000:]}"
    # every WARNING line comes from our package (rich prints the emitting file at the right)
    ours = {p.name for p in (REPO_ROOT / "src" / "lora_pipeline").rglob("*.py")}
    for line in output.splitlines():
        if " WARNING " in line:
            source = re.search(r"(\w+\.py):\d+\s*$", line)
            assert source and source.group(1) in ours, line
