"""Progress in batch jobs: with stderr not a terminal (Slurm's job log) commands log plain lines at
each 10 % of the work, never tqdm's carriage-return redraws; on a terminal they keep the bar."""

import io
import logging

from conftest import run_hpcgan
from hpcgan.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def captured_progress_lines():
    handler = Captured()
    logger = logging.getLogger("hpcgan.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler, logger


def test_a_terminal_gets_a_bar_and_a_log_file_gets_lines():
    from tqdm import tqdm

    with progress_bar(10, "x", "items", stream=Terminal()) as bar:
        assert isinstance(bar, tqdm)
    with progress_bar(10, "x", "items", stream=io.StringIO()) as bar:
        assert isinstance(bar, LineProgress)


def test_line_progress_logs_each_tenth_once_and_where_it_stopped():
    handler, logger = captured_progress_lines()
    try:
        with LineProgress(200, "train", "steps", initial=40, interval_s=3600) as bar:
            for step in range(41, 131):
                bar.n = step
                bar.set_postfix({"loss_d": "0.5"}, refresh=False)
                bar.refresh()
        with LineProgress(5, "quiet", "items", enabled=False) as silent:
            silent.update(5)
    finally:
        logger.removeHandler(handler)
    percents = [line.split("(")[1].split("%")[0] for line in handler.lines]
    assert percents == ["30", "40", "50", "60", "65"], handler.lines  # 65 %: the run stopped at 130/200
    assert handler.lines[0].startswith("train: 60/200 steps (30%)") and "loss_d=0.5" in handler.lines[0]
    assert "eta" in handler.lines[0] and all("quiet" not in line for line in handler.lines)


def test_line_progress_logs_on_time_between_tenths():
    handler, logger = captured_progress_lines()
    try:
        bar = LineProgress(1000, "slow", "items", interval_s=0.0)
        bar.update(1)
        bar.update(1)
        bar.close()
    finally:
        logger.removeHandler(handler)
    assert [line.split(" items")[0] for line in handler.lines] == ["slow: 1/1000", "slow: 2/1000"]


def test_commands_write_no_carriage_returns_into_a_job_log(sample_data, sample_dataset, tmp_path):
    preprocess = run_hpcgan(
        "preprocess",
        "--input",
        sample_data,
        "--output",
        tmp_path / "dataset",
        "--modalities",
        "t1",
        "--slices",
        "80:90",
        "--size",
        "32",
        "--val-fraction",
        "0",
        check=True,
    )
    assert "\r" not in preprocess.stderr
    assert "preprocess: 2/2 subjects (100%)" in preprocess.stderr, preprocess.stderr
    train = run_hpcgan(
        "train",
        "--config",
        "wgan-gp-64",
        "--data",
        sample_dataset,
        "--out",
        tmp_path / "run",
        "--set",
        "train.steps=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "log.every_steps=1",
        check=True,
    )
    assert "\r" not in train.stderr
    assert "train: 4/4 steps (100%)" in train.stderr, train.stderr
