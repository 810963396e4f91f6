"""captioning -> normalization through a real KedroSession on a temp copy of the project and demo data."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro_helpers import kedro_runs, run, stage_run
from PIL import Image

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import sha256_file

pytestmark = pytest.mark.slow  # a whole pipeline through Kedro (see make test-fast)


# The subjects that caption demo_lora's images (conf/demo/subjects.yml): the captions cache is shared, so the first
# of them to run captions each image and the others find it cached, in whatever order Kedro runs them.
SHARING_DEMO_IMAGES = ("demo_lora", "demo_sdxl_lora", "demo_flux")


def newly_captioned(root: Path, kedro_run) -> int:
    """Images the captioner saw in that `kedro run`, over the subjects sharing the demo images."""
    return sum(stage_run(root, kedro_run, s, "captioning").data.metrics[f"{s}.captioning.auto_new"]
               for s in SHARING_DEMO_IMAGES)


def latest_captions(root: Path) -> pd.DataFrame:
    versions = sorted((root / "data/02_intermediate/demo_lora/captions.csv").iterdir())
    return pd.read_csv(versions[-1] / "captions.csv", keep_default_na=False)


def test_captioning_then_normalization(project):
    raw_before = {p.name: sha256_file(p) for p in (project / "data/01_raw").rglob("*") if p.is_file()}
    run(project, "captioning")
    run(project, "normalization")

    [version] = sorted((project / "data/08_reporting/demo_lora/quality_report.csv").iterdir())
    report = pd.read_csv(version / "quality_report.csv", keep_default_na=False)
    raw_names = sorted(p.name for p in (project / "data/01_raw/demo_lora/images").iterdir() if p.suffix != ".txt")
    assert sorted(report.file_name) == raw_names  # one row per input image
    rejected = report[report.status == "rejected"].set_index("file_name").reason_code.to_dict()
    assert rejected == {"corrupt.jpg": "corrupt", "too_small.png": "too_small",
                        "red_circle_0_copy.jpg": "duplicate"}
    assert (report[report.status == "rejected"].reason != "").all()

    dataset = project / "data/03_primary/demo_lora/dataset"
    metadata = pd.read_csv(dataset / "metadata.csv", keep_default_na=False)
    kept = report[report.status == "kept"]
    assert sorted(metadata.file_name) == sorted(kept.output_name)
    assert metadata.text.str.startswith("lorachar").all()
    assert metadata.set_index("file_name").loc["grayscale.png"].text == (
        "lorachar, green square, monochrome, reviewed by hand")
    assert metadata.set_index("file_name").loc["red_square_0.png"].text == (
        "lorachar, simple background, square, red background")  # front_keywords moved forward
    for row in metadata.itertuples():
        with Image.open(dataset / row.file_name) as image:
            assert image.mode == "RGB" and image.size == (row.width, row.height)
            assert row.width * row.height <= 128 * 128
    with Image.open(dataset / "exif_rotated.png") as rotated:
        assert rotated.height > rotated.width

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = kedro_runs(project)
    assert len(runs) == 2  # two `kedro run`s, each with one MLflow run per subject and stage inside
    norm_run, cap_run = runs
    assert norm_run.data.params["demo_lora.normalization.resolution"] == "128"
    norm = stage_run(project, norm_run, "demo_lora", "normalization").data.metrics
    assert norm["demo_lora.normalization.images_kept"] == len(kept)
    assert norm["demo_lora.normalization.images_rejected"] == 3
    cap = stage_run(project, cap_run, "demo_lora", "captioning").data.metrics
    assert cap["demo_lora.captioning.reviewed"] == 1
    assert newly_captioned(project, cap_run) == cap["demo_lora.captioning.auto"] > 0  # once each, then cached
    stripes = stage_run(project, cap_run, "demo_stripes", "captioning")
    assert stripes.data.metrics["demo_stripes.captioning.sidecar"] == 8 and stripes.data.tags["subject"] == "demo_stripes"
    norm_stage = stage_run(project, norm_run, "demo_lora", "normalization")
    artifacts = mlflow.artifacts.list_artifacts(run_id=norm_stage.info.run_id, artifact_path="demo_lora")
    assert {"demo_lora/quality_report.csv", "demo_lora/dataset_info.json"} <= {a.path for a in artifacts}

    raw_after = {p.name: sha256_file(p) for p in (project / "data/01_raw").rglob("*") if p.is_file()}
    assert raw_after == raw_before  # raw data is never modified


def test_reviewed_caption_survives_rerun_and_new_images_are_the_only_ones_captioned(project):
    run(project, "captioning")
    first = latest_captions(project)
    review = project / "data/01_raw/demo_lora/reviewed_captions.csv"
    review.write_text(review.read_text() + 'red_circle_1.png,"lorachar, my own words"\n', encoding="utf-8")
    review_hash = sha256_file(review)
    Image.new("RGB", (640, 640), (9, 9, 9)).save(project / "data/01_raw/demo_lora/images/added_1.png")
    Image.new("RGB", (512, 768), (90, 9, 9)).save(project / "data/01_raw/demo_lora/images/added_2.png")

    run(project, "captioning")
    second = latest_captions(project).set_index("file_name")
    assert second.loc["red_circle_1.png"].text == "lorachar, my own words"
    assert second.loc["red_circle_1.png"].source == "reviewed"
    assert second.loc["grayscale.png"].source == "reviewed"
    assert sha256_file(review) == review_hash
    assert len(first) + 2 == len(second)  # the earlier version is still on disk
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    assert newly_captioned(project, kedro_runs(project)[0]) == 2  # only the two added images reached the captioner

    run(project, "normalization")
    metadata = pd.read_csv(project / "data/03_primary/demo_lora/dataset/metadata.csv", keep_default_na=False)
    assert metadata.set_index("file_name").loc["red_circle_1.png"].text == "lorachar, my own words"


def test_bad_parameter_stops_before_any_node(project):
    with pytest.raises(ConfigError, match="normalization.min_sise: unknown parameter"):
        run(project, "normalization", runtime_params={"normalization": {"min_sise": 5}})
    assert not (project / "data/08_reporting/demo_lora/quality_report.csv").exists()
    assert not (project / "data/03_primary/demo_lora/dataset").exists()


def test_empty_raw_folder_is_a_clear_error(project):
    shutil.rmtree(project / "data/01_raw/demo_lora/images")
    (project / "data/01_raw/demo_lora/images").mkdir()
    with pytest.raises(Exception, match="holds no images"):
        run(project, "captioning")


def _captioning_model(project: Path, model: str) -> None:
    """The demo environment's captioning model becomes ``model``."""
    config = project / "conf/demo/parameters_captioning.yml"
    config.write_text(config.read_text(encoding="utf-8").replace("data/06_models/tiny-blip", model), encoding="utf-8")


def test_a_missing_captioning_model_stops_the_run_before_any_node(project):
    _captioning_model(project, "no-such/blip-model")
    next((project / "data/01_raw/demo_stripes/images").glob("*.txt")).unlink()  # one image needs the captioner
    with pytest.raises(ConfigError, match=r"demo_stripes\.captioning\.model: .*no-such/blip-model[\s\S]*image\(s\) "
                                          r"have no caption file"):
        run(project, "captioning", namespaces=["demo_stripes"])
    assert not (project / "data/02_intermediate/demo_stripes").exists()  # not even hashed
    [stopped] = kedro_runs(project)
    assert stopped.info.status == "FAILED"  # not FINISHED: nothing ran


def test_a_subject_whose_images_all_have_sidecars_needs_no_captioning_model(project):
    images = project / "data/01_raw/demo_stripes/images"
    for image in images.iterdir():
        image.with_suffix(".txt").write_text(f"stripes, {image.stem}", encoding="utf-8")
    _captioning_model(project, "no-such/blip-model")
    run(project, "captioning", namespaces=["demo_stripes"])
    versions = sorted((project / "data/02_intermediate/demo_stripes/captions.csv").iterdir())
    captions = pd.read_csv(versions[-1] / "captions.csv", keep_default_na=False)
    assert set(captions.source) == {"sidecar"} and len(captions) == len(list(images.glob("*.png")))


def test_a_busy_subject_is_refused_before_the_first_node(project):
    import subprocess
    import sys

    from lora_pipeline.core.lock import SubjectBusyError

    folder = project / "data/06_models/checkpoints/demo_stripes"
    script = ("import sys, time\nfrom lora_pipeline.core.lock import subject_lock\n"
              "with subject_lock(sys.argv[1], 'demo_stripes'):\n    print('locked', flush=True)\n    time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SubjectBusyError, match=f"demo_stripes is being trained by PID {holder.pid}"):
            run(project, "data", "training", namespaces=["demo_stripes"])
        assert not (project / "data/02_intermediate/demo_stripes").exists()  # refused before captioning
    finally:
        holder.kill()
        holder.wait()
