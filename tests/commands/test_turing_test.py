"""The visual Turing test (hpcgan.turing, hpcgan.commands.turing_test): its statistics, the session `make`
writes (blind, no PHI), the reader page in a real headless Chromium, scoring and the report section."""

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan.training.checkpointing import CheckpointWriter
from hpcgan.config import to_dict
from hpcgan.data import read_slices
from hpcgan.models import build_generator
from hpcgan.models.config import ModelConfig
from hpcgan.stacks import read_stack_h5, to_uint8, write_stack_h5
from hpcgan.turing.scores import report_section
from hpcgan.turing.stats import binomial_test, clopper_pearson, fleiss_kappa, reading_stats
from conftest import SAMPLE_DATASET_OPTIONS, run_hpcgan, write_phi_laden_copy

SECRETS = (b"SECRET", b"PATIENT_DIR", b"colin27", b"mni152")
NUM, READERS = 40, 2


# ---------------------------------------------------------------- statistics


def test_binomial_test_and_clopper_pearson_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for n, k in [(1, 0), (1, 1), (10, 3), (40, 40), (40, 27), (100, 50), (100, 61), (401, 230)]:
        expected = stats.binomtest(k, n, 0.5)
        assert binomial_test(k, n) == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
        ci = expected.proportion_ci(confidence_level=0.95, method="exact")
        np.testing.assert_allclose(clopper_pearson(k, n), (ci.low, ci.high), rtol=1e-7, atol=1e-12)
    assert binomial_test(40, 40) < 1e-6 < binomial_test(30, 40)


def test_fleiss_kappa_of_the_worked_example():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories, kappa = 0.210.
    counts = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-5)
    assert fleiss_kappa([[2, 0], [0, 2], [2, 0]]) == pytest.approx(1.0)  # full agreement
    assert fleiss_kappa([[2, 0], [2, 0]]) is None  # one category only: kappa is undefined


def test_reading_stats_sensitivity_specificity_and_confidence():
    readings = [
        ("synthetic", "synthetic", 5),
        ("synthetic", "real", 2),
        ("synthetic", "synthetic", 5),
        ("real", "real", 4),
        ("real", "synthetic", 2),
        ("real", "synthetic", 2),
    ]
    got = reading_stats(readings)
    assert (got["n"], got["correct"], got["accuracy"]) == (6, 3, 0.5)
    assert got["sensitivity"] == pytest.approx(2 / 3) and got["specificity"] == pytest.approx(1 / 3)
    assert got["by_confidence"] == {
        "2": {"n": 3, "correct": 0, "accuracy": 0.0},
        "4": {"n": 1, "correct": 1, "accuracy": 1.0},
        "5": {"n": 2, "correct": 2, "accuracy": 1.0},
    }
    assert got["p_value"] == 1.0


# ---------------------------------------------------------------- a session from a PHI-laden source


@pytest.fixture(scope="module")
def phi_dataset(sample_data, tmp_path_factory) -> Path:
    """The real sample brains with names in every free-text header field, under a folder named after
    a patient, preprocessed at 64x64 (slices 60:108, one subject in val) without pseudonyms."""
    root = tmp_path_factory.mktemp("turing")
    source = write_phi_laden_copy(sample_data, root / "PATIENT_DIR_Doe")
    out = root / "dataset"
    run_hpcgan(
        "preprocess",
        "--input",
        source,
        "--output",
        out,
        *SAMPLE_DATASET_OPTIONS,
        check=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """30 generated 64x64 images (`hpcgan sample`) from an untrained small generator: they need not be good."""
    root = tmp_path_factory.mktemp("turing-samples")
    model = ModelConfig(resolution=64, channels=1, latent_dim=16, g_base_width=8, max_width=32)
    torch.manual_seed(0)
    G = build_generator(model)
    writer = CheckpointWriter(root / "run" / "checkpoints")
    writer.submit({"config": {"model": to_dict(model)}, "step": 1, "G": G.state_dict()}, 1)
    writer.close()
    run_hpcgan(
        "sample",
        "--checkpoint",
        root / "run",
        "--out",
        root / "samples",
        "--stack-size",
        30,
        "--format",
        "h5",
        "--no-ema",
        check=True,
    )
    return root / "samples"


@pytest.fixture(scope="module")
def session(phi_dataset, samples) -> dict:
    out = phi_dataset.parent / "session"
    result = run_hpcgan(
        "turing-test",
        "make",
        "--data",
        phi_dataset,
        "--samples",
        samples,
        "--out",
        out,
        "--num",
        NUM,
        "--seed",
        3,
        "--readers",
        READERS,
        check=True,
    )
    key = json.loads(Path(f"{out}.key.json").read_text())
    return {"dir": out, "key": key, "result": result}


def page_data(session_dir) -> dict:
    text = (session_dir / "index.html").read_text()
    return json.loads(re.search(r'<script id="session-data" type="application/json">(.*?)</script>', text, re.S)[1])


def png_chunks(path) -> list:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        chunks.append(data[at + 4 : at + 8].decode("ascii"))
        at += 12 + length
    return chunks


def test_session_is_blind_and_holds_no_phi(session, phi_dataset, samples):
    out, key = session["dir"], session["key"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    images = sorted(out.glob("images/*.png"))
    assert files == sorted(["index.html", *[f"images/{p.name}" for p in images]]) and len(images) == NUM
    truth = {name: key["truth"][name] for name in (p.name for p in images)}
    assert sorted(truth.values()).count("synthetic") == NUM // 2

    # Nothing on disk separates the classes: random names, one size, one time, no metadata.
    assert all(re.fullmatch(r"[0-9a-f]{16}\.png", p.name) for p in images)
    assert len({p.stat().st_size for p in images}) == 1
    assert len({p.stat().st_mtime for p in [*images, out / "index.html", out / "images"]}) == 1
    for path in images:
        assert png_chunks(path) == ["IHDR", "IDAT", "IEND"], path
        with Image.open(path) as im:
            assert im.info == {} and not im.getexif() and im.size == (64, 64) and im.mode == "L"
    by_name = sorted(truth)
    assert 0 < [truth[n] for n in by_name[: NUM // 2]].count("real") < NUM // 2  # name order is not class order

    # The page holds the orders, nothing else; each reader's order is its own, and mixes the classes.
    data = page_data(out)
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", (out / "index.html").read_text())  # offline: no remote asset
    assert set(data) == {"format", "version", "session", "confidence_levels", "readers"}
    orders = [r["order"] for r in data["readers"]]
    assert [r["id"] for r in data["readers"]] == ["R1", "R2"] and orders[0] != orders[1]
    for order in orders:
        assert sorted(order) == by_name
        assert 0 < [truth[n] for n in order[: NUM // 2]].count("real") < NUM // 2
    assert data["session"] == key["session"]

    # Same rendering for both kinds, and the key is right: each picture is a rendered dataset
    # slice or a rendered generated image, as the key says.
    real = {p.tobytes() for p in to_uint8(read_slices(phi_dataset, "val"))[..., 0]}
    fake = {p.tobytes() for p in to_uint8(read_stack_h5(samples / "stack-00000.h5"))[..., 0]}
    for path in images:
        with Image.open(path) as im:
            pixels = np.asarray(im).tobytes()
        assert pixels in (real if truth[path.name] == "real" else fake), path.name

    # No subject name, header text or input path, in the session, the key or the command's output.
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    blobs += [json.dumps(key).encode(), session["result"].stdout.encode(), session["result"].stderr.encode()]
    for secret in (*SECRETS, str(phi_dataset).encode(), str(samples).encode()):
        assert not any(secret in blob for blob in blobs), secret
    assert b"slice" not in json.dumps(key).encode() and b"subject" not in json.dumps(key).encode()


# ---------------------------------------------------------------- the page in a headless browser


def chromium_driver(download_dir: Path, profile_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no chromium/chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--user-data-dir={profile_dir}",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    return webdriver.Chrome(service=Service(driver_path), options=options)


def start_reading(driver, reader: str, expect_position: int = 0):
    """Choose `reader` on the start page and begin (or resume) at image expect_position + 1."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "reader")).select_by_value(reader)
    driver.find_element(By.ID, "begin").click()
    progress = driver.find_element(By.ID, "progress").text
    assert progress == f"Image {expect_position + 1} of {NUM}", progress


def read_by_keyboard(driver, answer_for, limit: int | None = None):
    """Answer the shown images by keyboard, answer_for(name) → keys, until the end or `limit` images."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    body = driver.find_element(By.TAG_NAME, "body")
    answered = 0
    while driver.find_element(By.ID, "reading").is_displayed() and answered != limit:
        name = driver.find_element(By.ID, "image").get_attribute("src").rsplit("/", 1)[-1]
        WebDriverWait(driver, 10, poll_frequency=0.05).until(  # the image file loaded from the folder
            lambda d: (
                d.execute_script("const i = document.getElementById('image'); return i.complete && i.naturalWidth")
                == 64
            )
        )
        body.send_keys(*answer_for(name))
        answered += 1


def export_answers(driver, download_dir: Path, reader: str) -> Path:
    from selenium.webdriver.common.by import By

    driver.find_element(By.TAG_NAME, "body").send_keys("e")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = [p for p in download_dir.glob(f"answers-{reader}-*.json")]
        if done:
            break
        time.sleep(0.2)
    assert done, f"no download of {reader}'s answers"
    shown = driver.find_element(By.ID, "export-text").get_attribute("value")
    assert json.loads(done[0].read_text()) == json.loads(shown)  # the copy-paste fallback says the same
    return done[0]


@pytest.mark.slow
def test_oracle_and_random_readers_in_a_browser_then_score_and_report(session, tmp_path):
    out, truth = session["dir"], session["key"]["truth"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(downloads, tmp_path / "profile")
    try:
        driver.get(out.joinpath("index.html").as_uri())
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        def oracle(name):
            return ("s", "5") if truth[name] == "synthetic" else ("r", "4")

        start_reading(driver, "R1")
        # A wrong answer to the first image, Backspace, and the right one: the last answer counts.
        read_by_keyboard(
            driver, lambda name: ("r" if truth[name] == "synthetic" else "s", "1", Keys.BACKSPACE), limit=1
        )
        assert driver.find_element(By.ID, "progress").text == f"Image 1 of {NUM}"
        read_by_keyboard(driver, oracle, limit=15)
        driver.refresh()  # a pause: the page forgets nothing
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "reader")).select_by_value("R1")
        assert driver.find_element(By.ID, "begin").text == f"Resume (15 of {NUM} answered)"
        start_reading(driver, "R1", expect_position=15)
        read_by_keyboard(driver, oracle)
        oracle_file = export_answers(driver, downloads, "R1")

        driver.refresh()
        # A reader at chance: a seeded coin decides each answer, whatever the image, with random confidence.
        rng, rights = np.random.default_rng(7), []

        def at_chance(name):
            right = "s" if truth[name] == "synthetic" else "r"
            rights.append(bool(rng.random() < 0.5))
            return (right if rights[-1] else {"s": "r", "r": "s"}[right]), str(rng.integers(1, 6))

        start_reading(driver, "R2")
        read_by_keyboard(driver, at_chance)
        random_file = export_answers(driver, downloads, "R2")
    finally:
        driver.quit()

    exported = json.loads(oracle_file.read_text())
    assert exported["session"] == session["key"]["session"] and len(exported["answers"]) == NUM
    assert [a["image"] for a in exported["answers"]] == page_data(out)["readers"][0]["order"]
    scores_path = tmp_path / "run" / "turing-test.json"
    scores_path.parent.mkdir()
    result = run_hpcgan("turing-test", "score", out, oracle_file, random_file, "--out", scores_path, check=True)
    scores = json.loads(scores_path.read_text())
    r1, r2 = scores["readers"]["R1"], scores["readers"]["R2"]
    assert (r1["n"], r1["accuracy"], r1["sensitivity"], r1["specificity"]) == (NUM, 1.0, 1.0, 1.0)
    assert r1["p_value"] < 1e-6 and r1["ci95"][0] > 0.9
    assert r1["by_confidence"] == {
        "4": {"n": 20, "correct": 20, "accuracy": 1.0},
        "5": {"n": 20, "correct": 20, "accuracy": 1.0},
    }
    assert (r2["n"], r2["correct"]) == (NUM, sum(rights)) and r2["p_value"] == binomial_test(sum(rights), NUM)
    assert r2["p_value"] > 0.05 and r2["ci95"][0] < 0.5 < r2["ci95"][1]  # chance: no evidence against 1/2
    assert scores["pooled"]["n"] == 2 * NUM and scores["fleiss_kappa"]["images"] == NUM
    assert -1 <= scores["fleiss_kappa"]["value"] < 0.5
    table = result.stdout
    assert re.search(r"^R1 +40 +1\.000 +\[0\.91\d, 1\.000\]", table, re.M), table
    assert "pooled" in table and "Fleiss' kappa between 2 readers on 40 images" in table
    assert str(out) not in table  # the scores name no input path

    run_hpcgan("report", scores_path.parent, check=True)
    page = (scores_path.parent / "report.html").read_text()
    assert "Visual Turing test" in page and "Fleiss" in page and "Clopper-Pearson" in page


def test_score_of_exported_answers_and_the_report_section(session, tmp_path, capsys, cli_in_process):
    """Without a browser: R1 calls everything real, R2 knows the key."""
    out, key = session["dir"], session["key"]
    paths = []
    for reader, answer_of in (("R1", lambda truth: "real"), ("R2", lambda truth: truth)):
        paths.append(tmp_path / f"answers-{reader}.json")
        paths[-1].write_text(
            json.dumps(
                {
                    "format": "hpcgan-turing-answers",
                    "version": 1,
                    "session": key["session"],
                    "reader": reader,
                    "answers": [
                        {"image": name, "answer": answer_of(truth), "confidence": 3}
                        for name, truth in key["truth"].items()
                    ],
                }
            )
        )
    assert cli_in_process(["turing-test", "score", str(out), *map(str, paths)]) == 0
    scores = json.loads(Path(f"{out}.scores.json").read_text())  # the default place, beside the session
    r1 = scores["readers"]["R1"]
    assert (r1["accuracy"], r1["sensitivity"], r1["specificity"]) == (0.5, 0.0, 1.0) and r1["p_value"] == 1.0
    assert scores["readers"]["R2"]["accuracy"] == 1.0 and scores["pooled"]["correct"] == NUM + NUM // 2
    # real images: both say real (full agreement); synthetic ones: split. Kappa = (0.5 - 0.625) / 0.375.
    assert scores["fleiss_kappa"]["value"] == pytest.approx(-1 / 3)
    assert "Fleiss' kappa between 2 readers on 40 images: -0.333" in capsys.readouterr().out
    section = report_section(scores)
    assert "<td>R1</td><td>40</td><td>0.5</td>" in section and "-0.3333" in section
    assert "No visual Turing test" in report_section(None)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    session, phi_dataset, samples, tmp_path, capsys, cli_in_process
):
    out, key = session["dir"], session["key"]
    good = {
        "format": "hpcgan-turing-answers",
        "version": 1,
        "session": key["session"],
        "reader": "R1",
        "answers": [{"image": name, "answer": "real", "confidence": 3} for name in sorted(key["truth"])],
    }
    files = {}
    for name, content in {
        "other-session.json": json.dumps({**good, "session": "0" * 32}),
        "malformed.json": json.dumps(good)[:-20],
        "not-answers.json": json.dumps([1, 2, 3]),
        "unknown-image.json": json.dumps({**good, "answers": [{"image": "x.png", "answer": "real", "confidence": 3}]}),
        "bad-answer.json": json.dumps({**good, "answers": [{**good["answers"][0], "answer": "fake"}]}),
        "bad-confidence.json": json.dumps({**good, "answers": [{**good["answers"][0], "confidence": 9}]}),
        "good.json": json.dumps(good),
        "other-key.json": json.dumps({**key, "session": "1" * 32}),
    }.items():
        files[name] = tmp_path / name
        files[name].write_text(content)
    small = tmp_path / "small-samples"
    small.mkdir()
    write_stack_h5(small / "stack-00000.h5", np.zeros((30, 1, 32, 32), np.float32), {})
    new = tmp_path / "new-session"
    make = ["turing-test", "make", "--data", str(phi_dataset), "--samples", str(samples), "--out", str(new)]
    scores = tmp_path / "scores.json"
    score = ["turing-test", "score", str(out), "--out", str(scores)]
    cases = [
        (make + ["--num", "100"], "the val split has 48 slices; --num 100 with --fake-fraction 0.5 needs 50 real"),
        (
            make + ["--num", "40", "--fake-fraction", "0.9"],
            "30 generated images; --num 40 with --fake-fraction 0.9 needs 36",
        ),
        (make[:-1] + [str(out)], "exists and is not an empty folder"),
        (make + ["--fake-fraction", "1"], "--fake-fraction: must be between 0 and 1"),
        (
            make[:5] + [str(small)] + make[6:] + ["--num", "20"],
            "generated images are [1, 32, 32], the dataset's are [1, 64, 64]",
        ),
        (score + [str(files["other-session.json"])], "an answer file of another session (00000000)"),
        (score + [str(files["malformed.json"])], "malformed.json: unreadable answer file (JSONDecodeError"),
        (score + [str(files["not-answers.json"])], "not-answers.json: not an answer file of hpcgan turing-test"),
        (score + [str(files["unknown-image.json"])], "answer 1 is for an image that is not in this session"),
        (score + [str(files["bad-answer.json"])], "answer 1 is 'fake', not one of real, synthetic"),
        (score + [str(files["bad-confidence.json"])], "answer 1 has confidence 9, not 1 to 5"),
        (score + [str(files["good.json"]), str(files["good.json"])], "a second answer file of reader R1"),
        (
            score + ["--key", str(files["good.json"]), str(files["good.json"])],
            "good.json: not an answer key of hpcgan turing-test",
        ),
        (
            score + ["--key", str(files["other-key.json"]), str(files["good.json"])],
            "an answer key of another session (11111111)",
        ),
        (score + [str(tmp_path / "missing.json")], "missing.json: no such file"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        code = cli_in_process(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], (argv, lines)
        assert sorted(p.name for p in tmp_path.iterdir()) == before and not new.exists()  # nothing written
    # One real process: what a user sees.
    result = run_hpcgan(*score, files["other-session.json"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and not scores.exists()


def answer_file(path, key, reader, readings) -> Path:
    """An exported answer file: readings [(image, answer, confidence)] in reading order."""
    answers = [{"image": image, "answer": answer, "confidence": c} for image, answer, c in readings]
    path.write_text(
        json.dumps(
            {
                "format": "hpcgan-turing-answers",
                "version": 1,
                "session": key["session"],
                "reader": reader,
                "answers": answers,
            }
        )
    )
    return path


def read_csv(path) -> list:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_random_reader_is_at_chance_a_perfect_one_is_detected_and_csv_holds_every_reading(session, tmp_path):
    """R1 answers by a seeded coin, R2 knows the key, each in an own random order: R1's score must be
    consistent with chance (its p-value large, its interval around 1/2), R2's far from it. The CSV beside
    the JSON holds every reading as answered and the JSON's per-reader statistics."""
    out, truth = session["dir"], session["key"]["truth"]
    rng = np.random.default_rng(11)
    flip = {"real": "synthetic", "synthetic": "real"}
    coin = [
        (image, truth[image] if rng.random() < 0.5 else flip[truth[image]], int(rng.integers(1, 6)))
        for image in rng.permutation(sorted(truth))
    ]
    perfect = [(image, truth[image], 5) for image in rng.permutation(sorted(truth))]
    files = [
        answer_file(tmp_path / f"answers-{r}.json", session["key"], r, rows)
        for r, rows in (("R1", coin), ("R2", perfect))
    ]
    scores_path = tmp_path / "scores.json"
    run_hpcgan("turing-test", "score", out, *files, "--out", scores_path, check=True)
    scores = json.loads(scores_path.read_text())
    right = sum(truth[image] == answer for image, answer, _ in coin)
    r1, r2 = scores["readers"]["R1"], scores["readers"]["R2"]
    assert (r1["n"], r1["correct"]) == (NUM, right) and r1["p_value"] == binomial_test(right, NUM)
    assert r1["p_value"] > 0.05 and r1["ci95"][0] < 0.5 < r1["ci95"][1]
    assert (r2["correct"], r2["sensitivity"], r2["specificity"]) == (NUM, 1.0, 1.0)
    assert r2["p_value"] < 1e-6 and r2["ci95"][0] > 0.9

    readings = read_csv(tmp_path / "scores.readings.csv")
    assert [(r["reader"], r["position"], r["image"], r["answer"], r["confidence"]) for r in readings] == [
        (reader, str(i), image, answer, str(c))
        for reader, rows in (("R1", coin), ("R2", perfect))
        for i, (image, answer, c) in enumerate(rows, 1)
    ]
    assert all(
        r["truth"] == truth[r["image"]] and r["correct"] == str(int(r["truth"] == r["answer"])) for r in readings
    )
    readers = read_csv(tmp_path / "scores.readers.csv")
    assert [r["reader"] for r in readers] == ["R1", "R2", "pooled"]
    for row, stats in zip(readers, (r1, r2, scores["pooled"])):
        assert (int(row["n"]), int(row["correct"])) == (stats["n"], stats["correct"])
        for column in ("accuracy", "p_value", "sensitivity", "specificity"):
            assert float(row[column]) == pytest.approx(stats[column], rel=1e-12, abs=1e-300), column
        assert (float(row["ci95_low"]), float(row["ci95_high"])) == pytest.approx(stats["ci95"])
        assert float(row["accuracy_confidence_5"]) == pytest.approx(stats["by_confidence"]["5"]["accuracy"])
        assert float(row["fleiss_kappa"]) == pytest.approx(scores["fleiss_kappa"]["value"])
    assert readers[2]["complete"] == "" and readers[0]["complete"] == "1"
