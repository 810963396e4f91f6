"""`kedro run --tags` picks subjects, the LLM track and the library stages, as `make demo`'s two runs do."""

from __future__ import annotations

import re

import yaml
from kedro_helpers import REPO_ROOT


def _make_variable(name: str) -> list[str]:
    [value] = re.findall(rf"^{name} := (.*)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    return value.split(",")


def test_a_subjects_tag_picks_its_nodes_and_the_llm_and_library_tags_the_rest(registered):
    pipelines, _ = registered
    picked = (pipelines["image"] + pipelines["llm"]).only_nodes_with_tags("demo_flux", "llm")
    assert {node.namespace for node in picked.nodes} == {"demo_flux", None}
    assert {node.name for node in picked.nodes if node.namespace is None} == {node.name for node in
                                                                             pipelines["llm"].nodes}
    library = pipelines["image"].only_nodes_with_tags("demo_lora", "library")
    assert {node.namespace for node in library.nodes} == {"demo_lora", None}
    assert {node.name for node in library.nodes if node.namespace is None} == {"generate_images",
                                                                              "summarize_subjects"}


def test_make_demos_two_runs_hold_every_demo_subject_and_every_node_once(registered):
    pipelines, _ = registered
    grid, other = _make_variable("DEMO_GRID_SUBJECTS"), _make_variable("DEMO_OTHER_SUBJECTS")
    subjects = yaml.safe_load((REPO_ROOT / "conf" / "demo" / "subjects.yml").read_text())["subjects"]
    assert sorted(grid + other) == sorted(subjects)
    everything = pipelines["image"] + pipelines["llm"]
    # the Makefile's two kedro runs: --pipelines image,llm --tags <other>,llm, then the default (image) pipeline
    # with --tags <grid>,library
    first = {node.name for node in everything.only_nodes_with_tags(*other, "llm").nodes}
    second = {node.name for node in pipelines["__default__"].only_nodes_with_tags(*grid, "library").nodes}
    assert not first & second
    assert first | second == {node.name for node in everything.nodes}
