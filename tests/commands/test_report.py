"""`hpcgan report RUN_DIR` on a run directory laid out as training writes it (real slices as the
'generated' images): the page parses, every figure it references exists and is a valid PNG."""

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hpcgan.cli import main
from hpcgan.data import read_slices
from hpcgan.stacks import contact_sheet, write_png, write_stack_h5
from hpcgan.training.run_directory import run_source


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def parse(path) -> Page:
    page = Page()
    page.feed(Path(path).read_text())
    return page


def assert_every_image_is_a_png(page, html_path):
    assert page.images
    for img in page.images:
        src = Path(html_path).parent / img["src"]
        assert not Path(img["src"]).is_absolute() and src.is_file(), img["src"]
        with Image.open(src) as im:
            assert im.format == "PNG"
            im.verify()


@pytest.fixture(scope="module")
def run_dir(sample_dataset, tmp_path_factory):
    """config.yaml, env.json, metrics.jsonl (training + evaluation lines), samples/grid-*.png, a
    sample directory with a stack, and evaluation.json with its worst pairs, as the tools write them."""
    from hpcgan.config import to_dict
    from hpcgan.metrics import evaluate
    from hpcgan.training.config import Config

    run = tmp_path_factory.mktemp("report") / "run"
    (run / "samples").mkdir(parents=True)
    train, val = read_slices(sample_dataset, "train"), read_slices(sample_dataset, "val")
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(Config())))
    (run / "env.json").write_text(json.dumps({"torch": "2.13.0", "world_size": 2, "backend": "horovod"}))
    manifest = json.loads((sample_dataset / "manifest.json").read_text())
    source = run_source("configs/wgan-gp-64.yaml", ["train.steps=100"], sample_dataset, manifest)
    (run / "run.json").write_text(json.dumps(source))
    lines = []
    for step in range(10, 110, 10):
        lines.append(
            {
                "step": step,
                "epoch": 0,
                "time_s": step / 10,
                "images_per_s": 50.0,
                "loss_d": 1.0 / step,
                "loss_g": 2.0 - step / 100,
            }
        )
        if step % 50 == 0:
            result = evaluate(val[:16], train, val, metrics=("swd", "intensity"))
            lines.append({"step": step, "eval": result})
            write_png(contact_sheet(val[:16], nrow=4), run / "samples" / f"grid-{step:08d}.png")
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 110, "lo')
    samples = run / "stacks"
    samples.mkdir()
    write_stack_h5(samples / "stack-00000.h5", val[:20], {"step": 100})
    copies = np.roll(train[:12], 1, axis=3)  # a memorising 'generator': flagged, with worst pairs
    from hpcgan.io import write_json_atomic
    from hpcgan.metrics.memorization import compute

    mem = compute(np.concatenate([copies, val[:12]]), train, val, worst_dir=run / "worst-pairs")
    write_json_atomic(
        run / "evaluation.json",
        {
            "format": "hpcgan-evaluation",
            "format_version": 1,
            "metrics": {"memorization": mem},
            "worst_dir": "worst-pairs",
            "generated": {"count": 24},
            "real": {"train": 48, "val": 48},
        },
    )
    return run


def test_report_references_only_existing_valid_pngs(run_dir, sample_dataset, capsys):
    assert main(["report", str(run_dir), "--samples", str(run_dir / "stacks")]) == 0
    html_path = run_dir / "report.html"
    page = parse(html_path)
    assert_every_image_is_a_png(page, html_path)
    srcs = [img["src"] for img in page.images]
    for name in ("losses.png", "metrics.png", "grids.png", "contact-sheet.png", "worst-000.png"):
        assert f"report/{name}" in srcs
    assert page.headings[:4] == ["Losses", "Evaluation metrics", "Sample grids over time", "Last stack"]
    text = html_path.read_text()
    # The title names the run folder, its config (by name) and its dataset (by its folder's name and contents).
    splits = "train: 1 subject, 48 slices; val: 1 subject, 48 slices"
    dataset = f"dataset {Path(sample_dataset).name} (t1, 64x64, 113-class masks; {splits})"  # seg's labels 0..112
    assert f"<h1>Run run: wgan-gp-64 (1 override) on {dataset}</h1>" in text
    assert "copying: the share of images nearer a training slice" in text  # each metric in plain words
    assert "Memorisation audit" in text and "<b>memorisation</b>" in text  # the copies are flagged
    assert "latent_dim" in text and "horovod" in text  # config and environment
    # The contact sheet is the stack's (20 images of 64² → 10 per row, 2 rows).
    with Image.open(run_dir / "report" / "contact-sheet.png") as im:
        assert im.size == (640, 128)


def test_report_elsewhere_and_of_a_bare_run(run_dir, tmp_path, capsys):
    out = tmp_path / "pages" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert_every_image_is_a_png(parse(out), out)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("train: {steps: 5}\n")
    assert main(["report", str(bare)]) == 0
    text = (bare / "report.html").read_text()
    assert "No training metrics yet" in text and "No evaluation" in text and "<img" not in text
    assert "<h1>Run bare</h1>" in text  # no run.json (a run from before it was written): the folder's name


def test_report_of_a_missing_run_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
