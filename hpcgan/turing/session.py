"""A blinded reading session: the folder readers get (index.html and images/ with random names, one
modification time) and its answer key kept apart; and reading the session page, the key and the readers'
exported answers back, each checked to belong to the session."""

import json
import os
import random
import re
import shutil
import time
from importlib import resources

from hpcgan.errors import UsageError
from hpcgan.io import make_temp_dir, read_json, write_bytes_atomic, write_json_atomic
from hpcgan.stacks import to_uint8, write_png

SESSION_FORMAT = "hpcgan-turing-session"
KEY_FORMAT = "hpcgan-turing-key"
ANSWERS_FORMAT = "hpcgan-turing-answers"
LABELS = ("real", "synthetic")
CONFIDENCE_LEVELS = 5
IMAGES_DIR = "images"
PAGE = "index.html"


def default_key_path(session_dir) -> str:
    return os.path.normpath(os.fspath(session_dir)) + ".key.json"


# ---------------------------------------------------------------- writing a session


def render_slices(images) -> list:
    """(N, C, H, W) in [-1, 1] → N uint8 pictures: grey (H, W) from the first channel, or RGB for three
    channels. Real and generated images go through this one function."""
    pixels = to_uint8(images)
    pixels = pixels if pixels.shape[-1] == 3 else pixels[..., 0]
    return list(pixels)


def page_html(session_data: dict) -> str:
    template = resources.files("hpcgan.turing").joinpath("session.html").read_text(encoding="utf-8")
    data = json.dumps(session_data, sort_keys=True).replace("</", "<\\/")  # stays inside its <script>
    return template.replace("{{SESSION_DATA}}", data)


def draw_session(images, truths: list, num_readers: int) -> tuple:
    """(session data for the page, {image name: truth}, {image name: picture}) of images (N, C, H, W) in
    [-1, 1] with their truths, each reader R1.. with an own order."""
    pictures = render_slices(images)
    # Names, order and session id come from the system's randomness, not from --seed: nothing a reader
    # could recompute.
    secure = random.SystemRandom()
    names = set()
    while len(names) < len(pictures):
        names.add(f"{secure.getrandbits(64):016x}.png")
    names = sorted(names)
    secure.shuffle(names)
    truth_of = dict(zip(names, truths))
    picture_of = dict(zip(names, pictures))
    session_id = f"{secure.getrandbits(128):032x}"
    readers = []
    for r in range(num_readers):
        order = sorted(names)
        secure.shuffle(order)
        readers.append({"id": f"R{r + 1}", "order": order})
    session_data = {
        "format": SESSION_FORMAT,
        "version": 1,
        "session": session_id,
        "confidence_levels": CONFIDENCE_LEVELS,
        "readers": readers,
    }
    return session_data, truth_of, picture_of


def write_session(session_dir, session_data: dict, picture_of: dict, key: dict, key_path):
    """The session folder, whole or not at all (staged beside it, then renamed onto the missing or empty
    folder), and its key; a key whose session could not be written is removed. Files are written in name
    order and get one modification time, so neither the directory order, the inode numbers nor the times
    follow the truth."""
    out = os.path.abspath(session_dir)
    key_inside = os.path.commonpath([os.path.abspath(key_path), out]) == out
    key_written = False
    staging = make_temp_dir(os.path.dirname(out), prefix=f".{os.path.basename(out)}.")  # the mode: the umask's
    try:
        os.makedirs(os.path.join(staging, IMAGES_DIR))
        for name in sorted(picture_of):
            write_png(picture_of[name], os.path.join(staging, IMAGES_DIR, name), compress_level=0)
        write_bytes_atomic(os.path.join(staging, PAGE), page_html(session_data).encode())
        if key_inside:
            inside = os.path.join(staging, os.path.relpath(os.path.abspath(key_path), out))
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            write_json_atomic(inside, key)
        else:
            write_json_atomic(key_path, key)
            key_written = True
        stamp = int(time.time())
        for folder, _, files in os.walk(staging):
            for name in [*files, "."]:
                os.utime(os.path.join(folder, name), (stamp, stamp))
        os.rename(staging, out)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if key_written:
            os.remove(key_path)  # a key without its session is no use
        raise


# ---------------------------------------------------------------- reading it back


def read_session_json(path, what: str, file_format: str, body: str, body_type: type, session_id: str) -> dict:
    """A JSON file of this session (`what`: "answer key" or "answer file"): its format, its `body`
    entry and its session id checked."""
    data = read_json(path, what)
    if not isinstance(data, dict) or data.get("format") != file_format or not isinstance(data.get(body), body_type):
        raise UsageError(f"{path}: not an {what} of hpcgan turing-test")
    if data.get("session") != session_id:
        raise UsageError(
            f"{path}: an {what} of another session ({str(data.get('session'))[:8]}), not of this one ({session_id[:8]})"
        )
    return data


def read_session_page(session_dir) -> dict:
    """The session data embedded in SESSION_DIR/index.html."""
    path = os.path.join(session_dir, PAGE)
    if not os.path.isfile(path):
        raise UsageError(f"{session_dir}: not a Turing-test session (no {PAGE})")
    with open(path, encoding="utf-8") as f:
        match = re.search(r'<script id="session-data" type="application/json">(.*?)</script>', f.read(), re.S)
    try:
        data = json.loads(match.group(1)) if match else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        raise UsageError(f"{path}: no session data in the page (not written by hpcgan turing-test make)")
    return data


def read_key(session_dir, key_path, session_id: str) -> dict:
    """The answer key of the session (default: SESSION_DIR.key.json)."""
    return read_session_json(
        key_path or default_key_path(session_dir), "answer key", KEY_FORMAT, "truth", dict, session_id
    )


def read_answers(path, key: dict) -> tuple:
    """(reader id, [(image, answer, confidence)]) of one exported answer file, checked against the key."""
    data = read_session_json(path, "answer file", ANSWERS_FORMAT, "answers", list, key["session"])
    reader = data.get("reader")
    if not isinstance(reader, str) or not reader:
        raise UsageError(f"{path}: no reader id")
    rows, seen = [], set()
    for number, entry in enumerate(data["answers"], start=1):
        image = entry.get("image") if isinstance(entry, dict) else None
        answer = entry.get("answer") if isinstance(entry, dict) else None
        confidence = entry.get("confidence") if isinstance(entry, dict) else None
        if not isinstance(image, str) or image not in key["truth"]:
            raise UsageError(f"{path}: answer {number} is for an image that is not in this session")
        if image in seen:
            raise UsageError(f"{path}: answer {number} repeats image {image}")
        if answer not in LABELS:
            raise UsageError(f"{path}: answer {number} is {answer!r}, not one of {', '.join(LABELS)}")
        if confidence is not None and (
            not isinstance(confidence, int) or isinstance(confidence, bool) or not 1 <= confidence <= CONFIDENCE_LEVELS
        ):
            raise UsageError(f"{path}: answer {number} has confidence {confidence!r}, not 1 to {CONFIDENCE_LEVELS}")
        seen.add(image)
        rows.append((image, answer, confidence))
    if not rows:
        raise UsageError(f"{path}: no answers")
    return reader, rows
