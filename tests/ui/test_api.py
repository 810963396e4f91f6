"""The workbench's API through FastAPI's TestClient, and its run queue with real subprocesses."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from lora_pipeline.cli.commands import main as cli
from lora_pipeline.ui.app import TokenRequired, create_app
from lora_pipeline.ui.runs import RunQueue

SUBJECT = "demo_lora"


@pytest.fixture
def client(data_project):
    return TestClient(create_app(data_project, "demo", start_queue=False))


def _reviewed(root: Path) -> dict[str, str]:
    with open(root / "data/01_raw/demo_lora/reviewed_captions.csv", newline="", encoding="utf-8") as handle:
        return {row["file_name"]: row["text"] for row in csv.DictReader(handle)}


# ----------------------------------------------------------------------------- files from the client

def test_client_paths_are_confined_to_the_project_and_the_subjects_folders(client, data_project, tmp_path):
    images = data_project / "data/01_raw/demo_lora/images"
    name = sorted(p.name for p in images.glob("*.png"))[0]
    assert client.get(f"/api/subjects/{SUBJECT}/image", params={"name": name}).status_code == 200
    outside = tmp_path / "secret.png"
    outside.write_bytes((images / name).read_bytes())
    (images / "link.png").symlink_to(outside)  # a symlink inside the image folder that points out of it
    refused = {
        "../../demo_stripes/images/" + name: f"/api/subjects/{SUBJECT}/image",  # ../ out of the subject's folder
        str(outside): f"/api/subjects/{SUBJECT}/image",  # an absolute path elsewhere
        "link.png": f"/api/subjects/{SUBJECT}/image",
        "../secret.png": "/file",
        "/etc/passwd": "/file",
        "data/01_raw/demo_lora/images/link.png": "/file",
        "data/01_raw/demo_lora/reviewed_captions.csv": "/file",  # inside, but not an image
    }
    for path, route in refused.items():
        response = client.get(route, params={"name" if "subjects" in route else "path": path})
        assert response.status_code == 403, (path, route, response.text)
    assert client.get("/file", params={"path": f"data/01_raw/demo_lora/images/{name}"}).status_code == 200
    assert client.get("/api/subjects/../captions").status_code == 404
    # a save naming a file outside the subject's images is refused, and writes nothing
    before = _reviewed(data_project)
    response = client.post(f"/api/subjects/{SUBJECT}/captions/save", json={"edited": {"../../x.png": "a"}})
    assert response.status_code == 400 and _reviewed(data_project) == before


# ----------------------------------------------------------------------------- the token

def test_off_localhost_a_token_is_required_and_checked_on_every_request(data_project):
    with pytest.raises(TokenRequired, match="--token"):
        create_app(data_project, "demo", host="0.0.0.0", start_queue=False)
    result = CliRunner().invoke(cli, ["ui", "--env", "demo", "--host", "0.0.0.0"], env={"LORA_PIPELINE_UI_TOKEN": ""})
    assert result.exit_code == 2 and "--token" in result.output
    app = create_app(data_project, "demo", host="0.0.0.0", token="s3cret", start_queue=False)
    anonymous = TestClient(app)
    for path in ("/subjects", "/api/subjects", f"/api/subjects/{SUBJECT}/captions", "/static/app.js", "/library"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.post("/api/jobs", json={"subjects": [SUBJECT]}).status_code == 401
    assert anonymous.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert anonymous.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    browser = TestClient(app)
    assert browser.get("/subjects", params={"token": "s3cret"}).status_code == 200  # the link printed at start-up
    assert browser.get("/static/app.js").status_code == 200  # then the cookie it set carries the token
    assert app.state.queue.jobs() == []  # the refused POST queued nothing


# ----------------------------------------------------------------------------- captions

def test_caption_edits_save_to_reviewed_captions_and_keep_other_rows(client, data_project):
    data = client.get(f"/api/subjects/{SUBJECT}/captions").json()
    captions = {row["file_name"]: row["text"] for row in data["rows"]}
    assert data["trigger"] == "lorachar" and data["rows"][0]["status"] == "unchecked"
    with_square = [n for n, tags in data["tags"].items() if "square" in tags]
    assert with_square and data["tag_counts"]["square"] == len(with_square)
    edit = client.post(f"/api/subjects/{SUBJECT}/captions/edit", json={
        "op": "replace", "tag": "square", "replacement": "box", "names": list(captions), "captions": captions}).json()
    assert set(edit["changed"]) == set(with_square) and "square" not in edit["tag_counts"]
    assert all("box" in edit["tags"][name] for name in with_square)
    front = client.post(f"/api/subjects/{SUBJECT}/captions/edit", json={
        "op": "front", "tag": "box", "names": with_square[:1], "captions": {**captions, **edit["changed"]}}).json()
    assert front["changed"] == {} or list(front["changed"].values())[0].startswith("lorachar, box")
    saved = client.post(f"/api/subjects/{SUBJECT}/captions/save", json={"edited": edit["changed"]}).json()
    assert saved == {"saved": len(with_square), "path": "data/01_raw/demo_lora/reviewed_captions.csv"}
    reviewed = _reviewed(data_project)
    assert reviewed["grayscale.png"] == "lorachar, green square, monochrome, reviewed by hand"  # was there: kept
    assert {n: reviewed[n] for n in with_square if n != "grayscale.png"} == \
        {n: t for n, t in edit["changed"].items() if n != "grayscale.png"}
    again = {row["file_name"]: row for row in client.get(f"/api/subjects/{SUBJECT}/captions").json()["rows"]}
    assert all(again[n]["source"] == "reviewed" and "box" in again[n]["text"] for n in with_square)


# ----------------------------------------------------------------------------- the queue

def _script(marker: Path, seconds: float, fail: str = "") -> list[str]:
    """A job that records when it ran (real processes: what the queue starts is the command it is given)."""
    code = (f"import time, pathlib, sys; p = pathlib.Path({str(marker)!r}); p.write_text(str(time.time()));"
            f"time.sleep({seconds}); p.write_text(p.read_text() + ' ' + str(time.time()));"
            + (f"print('Error: ' + {fail!r}); sys.exit(1)" if fail else ""))
    return [sys.executable, "-c", code]


def _wait(queue: RunQueue, done, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue.tick()
        if done():
            return
        time.sleep(0.05)
    raise AssertionError([(j.label, j.status) for j in queue.jobs()])


def _span(marker: Path) -> tuple[float, float]:
    start, end = map(float, marker.read_text().split())
    return start, end


def test_two_queued_runs_of_one_subject_run_one_after_the_other(tmp_path):
    queue = RunQueue(tmp_path / "ui", tmp_path, slots=2)  # two slots: only the subject rule keeps them apart
    first = queue.submit("train", "aki", _script(tmp_path / "a1", 0.8), "train aki")
    second = queue.submit("train", "aki", _script(tmp_path / "a2", 0.2), "train aki again")
    other = queue.submit("train", "bob", _script(tmp_path / "b", 0.8), "train bob")
    _wait(queue, lambda: all(j.status == "done" for j in queue.jobs()))
    assert _span(tmp_path / "a1")[1] <= _span(tmp_path / "a2")[0]  # the second started after the first ended
    assert _span(tmp_path / "b")[0] < _span(tmp_path / "a1")[1]  # another subject ran beside it
    assert [j.id for j in queue.jobs()] == [first.id, second.id, other.id]
    assert RunQueue(tmp_path / "ui", tmp_path).get(second.id).status == "done"  # on disk: survives a restart


def test_queued_runs_cancel_running_ones_stop_and_failures_show_the_error_line(tmp_path):
    queue = RunQueue(tmp_path / "ui", tmp_path, slots=1)
    running = queue.submit("train", "aki", _script(tmp_path / "r", 30), "long")
    waiting = queue.submit("train", "bob", _script(tmp_path / "w", 0), "waiting")
    failing = queue.submit("train", "cid", _script(tmp_path / "f", 0, fail="subject cid: data/01_raw/cid/images "
                                                                            "holds no images"), "failing")
    _wait(queue, lambda: queue.get(running.id).status == "running")
    assert queue.cancel(waiting.id) and not queue.cancel(running.id)
    restarted = RunQueue(tmp_path / "ui", tmp_path, slots=1)  # a new workbench watches the run by its PID
    assert restarted.get(running.id).status == "running" and restarted.get(waiting.id).status == "cancelled"
    assert restarted.stop(running.id)
    _wait(restarted, lambda: restarted.get(failing.id).status in ("done", "failed"))
    assert restarted.get(running.id).status == "stopped"
    assert not (tmp_path / "w").exists()  # the cancelled job never started
    failed = restarted.get(failing.id)
    assert failed.status == "failed" and failed.error == "subject cid: data/01_raw/cid/images holds no images"
    assert not _alive_pid(restarted.get(running.id).pid)


def _alive_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
