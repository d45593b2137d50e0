"""Image stacks (hpcgan.stacks) and the `hpcgan sample` command (hpcgan.commands.sample)."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hpcgan.preprocess import transforms as T
from hpcgan.stacks import (
    NIFTI_DESCRIPTION,
    contact_sheet,
    read_stack_attrs,
    read_stack_h5,
    to_uint8,
    write_png,
    write_stack_h5,
    write_stack_nifti,
)


# ---------------------------------------------------------------- stacks: pure maths


def test_to_uint8_matches_the_preprocessing_encoding():
    images = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0], dtype=np.float32).reshape(1, 1, 2, 3)
    out = to_uint8(images)
    assert out.shape == (1, 2, 3, 1) and out.dtype == np.uint8
    assert out.ravel().tolist() == T.encode(images, "uint8").ravel().tolist() == [0, 0, 128, 191, 255, 255]


@pytest.mark.parametrize("channels", [1, 3])
def test_contact_sheet_places_image_i_at_row_i_div_nrow(channels):
    n, h, w, nrow = 7, 3, 2, 3
    values = np.linspace(-1, 1, n, dtype=np.float32)
    images = np.broadcast_to(values[:, None, None, None], (n, channels, h, w)).copy()
    images[:, -1] *= -1  # RGB: the blue channel differs from red
    sheet = contact_sheet(images, nrow=nrow)
    assert sheet.shape == ((3 * h, nrow * w) if channels == 1 else (3 * h, nrow * w, 3))
    pixels = to_uint8(images)
    for i in range(n):
        r, c = divmod(i, nrow)
        cell = sheet[r * h : (r + 1) * h, c * w : (c + 1) * w]
        assert np.array_equal(cell, pixels[i][..., 0] if channels == 1 else pixels[i])
    assert not sheet[2 * h :, 1 * w :].any()  # the two cells after the last image stay black


def test_png_and_h5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 3, 8, 8)).astype(np.float32)
    sheet = contact_sheet(images, nrow=2)
    write_png(sheet, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), sheet)
    attrs = {"checkpoint_sha256": "ab" * 32, "seed": 3, "stack_index": 1, "config": {"model": {"resolution": 8}}}
    write_stack_h5(tmp_path / "s.h5", images, attrs)
    assert np.array_equal(read_stack_h5(tmp_path / "s.h5"), images)
    got = read_stack_attrs(tmp_path / "s.h5")
    assert got["seed"] == 3 and got["stack_index"] == 1 and got["checkpoint_sha256"] == "ab" * 32
    assert json.loads(got["config"]) == attrs["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "s.png"]  # no temp files


def test_nifti_zooms_axes_header_and_intensity(tmp_path):
    # rows 0.5 mm (along Y), columns 0.8 mm (along X), 3 mm slices; 2 channels = 2 modalities
    images = np.full((5, 2, 4, 6), -1.0, dtype=np.float32)
    images[:, 0, 0, -1] = 1.0  # top right of the display: anterior (+Y), subject's right side (+X)
    intensity = {
        "norm": "percentile",
        "lo": 10.0,
        "hi": 110.0,
        "per_modality": {"t1": {"lo": 10.0, "hi": 110.0}, "flair": {"lo": 0.0, "hi": 50.0}},
    }
    write_stack_nifti(tmp_path / "v.nii.gz", images, [0.5, 0.8], 3.0, intensity, all_channels=True)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == (6, 4, 5, 2)
    assert img.header.get_zooms()[:3] == (0.8, 0.5, 3.0)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    for key in ("aux_file", "intent_name", "db_name"):
        assert img.header[key].tobytes().strip(b"\0") == b""
    assert img.header["descrip"].tobytes().strip(b"\0") == NIFTI_DESCRIPTION  # says: independent slices
    data = img.get_fdata(dtype=np.float32)
    assert img.get_data_dtype() == np.float32
    assert data[-1, -1, 0, 0] == 110.0  # top right of the image = max X (right), max Y (anterior)
    assert data[0, 0, 0, 0] == 10.0 and np.all(data[..., 1] == 0.0)
    write_stack_nifti(tmp_path / "first.nii.gz", images, [0.5, 0.8], 3.0, (10.0, 110.0))
    assert nib.load(tmp_path / "first.nii.gz").shape == (6, 4, 5)


def test_nifti_of_real_brain_slices_matches_the_preprocessed_volume(tmp_path, sample_data):
    """Slices made the way preprocessing makes them go back to the same RAS voxels."""
    src = nib.load(sample_data / "mni152" / "mni152_t1.nii.gz")
    volume, affine = T.reorient_to_ras(np.asarray(src.dataobj), src.affine)
    slab = volume[:, :, 80:90].astype(np.float32)
    lo, hi = T.percentile_range(slab, 1, 99)
    images = T.axial_to_image(T.scale_to_unit(slab, lo, hi))[:, None]  # (S, 1, H, W)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    write_stack_nifti(tmp_path / "brain.nii.gz", images, [spacing[1], spacing[0]], spacing[2], (lo, hi))
    out = nib.load(tmp_path / "brain.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert np.allclose(out.header.get_zooms(), spacing)
    np.testing.assert_allclose(out.get_fdata(), np.clip(slab, lo, hi), atol=1e-4 * (hi - lo))


# ---------------------------------------------------------------- generation and the sample command

import torch  # noqa: E402

from hpcgan.training.checkpointing import CheckpointWriter  # noqa: E402
from hpcgan.config import to_dict  # noqa: E402
from hpcgan.models import build_generator  # noqa: E402
from hpcgan.models.config import ModelConfig  # noqa: E402
from hpcgan.generation import generate_images, load_generator  # noqa: E402
from conftest import requires_mpirun, run_hpcgan, run_hpcgan_mpi  # noqa: E402

TINY = ModelConfig(resolution=32, channels=1, latent_dim=16, g_base_width=8, max_width=32)
DATASET = {
    "image_shape": [1, 32, 32],
    "pixel_spacing_mm": [6.0, 6.0],
    "slice_thickness_mm": 2.0,
    "modalities": ["t1"],
    "dtype": "uint8",
    "intensity": {"norm": "percentile", "lo": 5.0, "hi": 205.0, "per_modality": {"t1": {"lo": 5.0, "hi": 205.0}}},
}


def tiny_checkpoint(run_dir, model=None, step=40):
    """A run directory with one real checkpoint of a small generator (G and a different G_ema)."""
    torch.manual_seed(0)
    G = build_generator(TINY)
    with torch.no_grad():  # batch-norm statistics as after training, so eval mode differs from train mode
        G(torch.randn(64, TINY.latent_dim))
    G_ema = build_generator(TINY)
    G_ema.load_state_dict(G.state_dict())
    with torch.no_grad():
        for p in G_ema.parameters():
            p.mul_(0.9)
    state = {
        "config": {"model": model or to_dict(TINY), "train": {"seed": 0}},
        "dataset": DATASET,
        "step": step,
        "G": G.state_dict(),
        "G_ema": G_ema.state_dict(),
    }
    writer = CheckpointWriter(run_dir / "checkpoints")
    writer.submit(state, step)
    writer.close()
    return run_dir / "checkpoints" / f"ckpt-{step:08d}.pt"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    tiny_checkpoint(run_dir)
    return run_dir


def image_set(checkpoint, indices, seed, ema=True, labels=None, batch_size=64) -> np.ndarray:
    """Images `indices` of the image set of `seed` from a checkpoint's generator (hpcgan.generation)."""
    return generate_images(load_generator(checkpoint, ema), indices, seed, labels, batch_size).numpy()


def test_generated_images_depend_on_seed_and_index_only(tiny_run):
    a = image_set(tiny_run, range(12), 3, batch_size=5)
    assert a.shape == (12, 1, 32, 32) and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    np.testing.assert_allclose(image_set(tiny_run, range(12), 3, batch_size=12), a, atol=1e-6)
    np.testing.assert_allclose(image_set(tiny_run, [11, 4, 7], 3), a[[11, 4, 7]], atol=1e-6)  # any split, any order
    assert not np.allclose(image_set(tiny_run, range(12, 24), 3), a)
    assert not np.allclose(image_set(tiny_run, range(12), 4), a)
    assert not np.allclose(image_set(tiny_run, range(12), 3, ema=False), a)


@pytest.mark.mpi
@pytest.mark.slow
@requires_mpirun
def test_sample_command_writes_stacks_identically_on_one_and_two_ranks(tiny_run, tmp_path):
    args = ["sample", "--checkpoint", tiny_run, "--num-stacks", 3, "--stack-size", 12, "--seed", 5, "--batch-size", 5]
    run_hpcgan(*args, "--out", tmp_path / "one", check=True)
    run_hpcgan_mpi(2, *args, "--out", tmp_path / "two", check=True)
    names = [f"stack-{k:05d}.{ext}" for k in range(3) for ext in ("h5", "nii.gz", "png")]
    for out in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted(names + ["index.json"])
        index = json.loads((tmp_path / out / "index.json").read_text())
        assert index["files"] == sorted(names) and index["step"] == 40 and index["seed"] == 5
        assert index["num_stacks"] == 3 and index["stack_size"] == 12 and index["formats"] == ["h5", "nifti", "png"]
        assert index["config"]["model"]["resolution"] == 32
    ckpt = tiny_run / "checkpoints" / "ckpt-00000040.pt"
    for k in range(3):
        one = read_stack_h5(tmp_path / "one" / f"stack-{k:05d}.h5")
        two = read_stack_h5(tmp_path / "two" / f"stack-{k:05d}.h5")
        assert one.shape == (12, 1, 32, 32) and one.tobytes() == two.tobytes()
        np.testing.assert_allclose(one, image_set(ckpt, range(12 * k, 12 * k + 12), 5), atol=1e-5)
        attrs = read_stack_attrs(tmp_path / "one" / f"stack-{k:05d}.h5")
        assert attrs["stack_index"] == k and attrs["checkpoint_sha256"] == index["checkpoint_sha256"]
        volume = nib.load(tmp_path / "one" / f"stack-{k:05d}.nii.gz")
        assert volume.shape == (32, 32, 12) and volume.header.get_zooms() == (6.0, 6.0, 2.0)
        data = volume.get_fdata()
        np.testing.assert_allclose(data[:, ::-1, :].transpose(2, 1, 0), 5.0 + (one[:, 0] + 1) * 100.0, atol=1e-3)
        with Image.open(tmp_path / "one" / f"stack-{k:05d}.png") as im:
            assert im.size == (10 * 32, 2 * 32) and im.mode == "L"
    assert not np.array_equal(
        read_stack_h5(tmp_path / "one" / "stack-00000.h5"), read_stack_h5(tmp_path / "one" / "stack-00001.h5")
    )


def test_sample_format_subsets_and_no_ema(tiny_run, tmp_path, cli_in_process):
    """--format writes only the formats asked for; --no-ema samples the trained G, not G_ema."""
    ckpt = tiny_run / "checkpoints" / "ckpt-00000040.pt"
    common = ["sample", "--checkpoint", str(tiny_run), "--num-stacks", "2", "--stack-size", "6", "--seed", "2"]
    assert cli_in_process([*common, "--out", str(tmp_path / "g"), "--format", "h5", "--no-ema"]) == 0
    assert cli_in_process([*common, "--out", str(tmp_path / "ema"), "--format", "png,nifti"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["index.json", "stack-00000.h5", "stack-00001.h5"]
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == [
        "index.json",
        "stack-00000.nii.gz",
        "stack-00000.png",
        "stack-00001.nii.gz",
        "stack-00001.png",
    ]
    g_index, ema_index = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("g", "ema"))
    assert (g_index["formats"], g_index["ema"]) == (["h5"], False)
    assert (ema_index["formats"], ema_index["ema"]) == (["nifti", "png"], True)
    for k in range(2):
        from_g = image_set(ckpt, range(6 * k, 6 * k + 6), 2, ema=False)
        from_ema = image_set(ckpt, range(6 * k, 6 * k + 6), 2)
        assert not np.allclose(from_g, from_ema, rtol=0.05, atol=0)  # the two generators really differ
        np.testing.assert_allclose(read_stack_h5(tmp_path / "g" / f"stack-{k:05d}.h5"), from_g, rtol=1e-5, atol=0)
        volume = nib.load(tmp_path / "ema" / f"stack-{k:05d}.nii.gz").get_fdata()
        np.testing.assert_allclose(volume[:, ::-1, :].transpose(2, 1, 0), 5.0 + (from_ema[:, 0] + 1) * 100.0, atol=1e-4)


def test_sample_refuses_bad_input_with_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, cli_in_process):
    good = tiny_run / "checkpoints" / "ckpt-00000040.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:4000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(3)}, plain)
    foreign = tiny_checkpoint(tmp_path / "foreign", model={**to_dict(TINY), "wings": 2})
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cases = [
        ([tmp_path / "missing.pt"], "no such checkpoint"),
        ([truncated], "truncated or corrupt checkpoint"),
        ([text], "truncated or corrupt checkpoint"),
        ([plain], "not an hpcgan checkpoint"),
        ([foreign], "unknown key 'model.wings'"),
        ([good, "--labels", "1"], "--labels: the model is unconditional"),
        ([good, "--format", "h5,jpeg"], "--format h5,jpeg"),
    ]
    out = tmp_path / "out"
    for (ckpt, *more), message in cases:  # in-process through the CLI's error handling: fast
        code = cli_in_process(
            ["sample", "--checkpoint", str(ckpt), "--out", str(out), "--stack-size", "2", *map(str, more)]
        )
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], (ckpt, lines)
        assert not out.exists()
    # one real process: the exit status and stderr a user sees
    result = run_hpcgan("sample", "--checkpoint", good, "--out", blocker / "out", "--stack-size", 2)
    lines = result.stderr.strip().splitlines()
    assert (
        result.returncode == 2
        and len(lines) == 1
        and f"{blocker / 'out'}: output directory is not writable" in lines[0]
    )


@pytest.mark.slow
def test_sample_from_a_trained_run_has_the_dataset_geometry(sample_dataset, tmp_path):
    """A run of `hpcgan train` on the real-brain dataset → NIfTI volumes with its voxel size and intensities."""
    run = tmp_path / "run"
    run_hpcgan(
        "train",
        "--config",
        "wgan-gp-64",
        "--data",
        sample_dataset,
        "--out",
        run,
        "--set",
        "train.steps=2",
        "--set",
        "model.g_base_width=8",
        "--set",
        "model.d_base_width=8",
        "--set",
        "model.max_width=32",
        "--set",
        "model.latent_dim=16",
        "--set",
        "train.batch_size=4",
        "--set",
        "log.sample_every_steps=0",
        "--set",
        "log.tensorboard=false",
        "--set",
        "checkpoint.every_steps=0",
        check=True,
    )
    run_hpcgan("sample", "--checkpoint", run, "--out", tmp_path / "s", "--stack-size", 10, check=True)
    manifest = json.loads((sample_dataset / "manifest.json").read_text())
    volume = nib.load(tmp_path / "s" / "stack-00000.nii.gz")
    spacing = manifest["pixel_spacing_mm"]
    assert volume.shape == (64, 64, 10)
    np.testing.assert_allclose(volume.header.get_zooms(), [spacing[1], spacing[0], manifest["slice_thickness_mm"]])
    images = read_stack_h5(tmp_path / "s" / "stack-00000.h5")
    lo, hi = manifest["intensity"]["lo"], manifest["intensity"]["hi"]
    np.testing.assert_allclose(
        volume.get_fdata()[:, ::-1, :].transpose(2, 1, 0), lo + (images[:, 0] + 1) * (hi - lo) / 2, rtol=1e-5, atol=1e-3
    )
    text = b"".join(p.read_bytes() for p in (tmp_path / "s").iterdir() if p.suffix in (".json", ".h5"))
    assert str(sample_dataset).encode() not in text and b"mni152" not in text.lower()  # no input paths or subjects


def test_latents_are_pinned_to_their_seeds():
    """The latents of `hpcgan sample --seed 3` (stack 1) and of a training step: a change of the seeding
    changes every sample and breaks the bit-exact resume of older runs, so it must be deliberate."""
    from hpcgan.generation import draw_latents, seed_for

    assert seed_for(3, 1) == 5712964121383671236 and seed_for(0, 5, 2) == 2676082015876268747
    expected = torch.tensor(
        [
            [-0.8185847401618958, -0.21339473128318787, 0.7480843663215637],
            [1.4823997020721436, -0.8282589912414551, 0.040718335658311844],
        ]
    )
    assert torch.equal(draw_latents(2, 3, 3, 1), expected)
