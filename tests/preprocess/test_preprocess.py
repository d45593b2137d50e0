"""`hpcgan preprocess` and `hpcgan info` on real brain MRI (the sample_data fixture): geometry,
intensities, splits, resume, de-identification, 1 vs 2 ranks, and every kind of bad input."""

import json
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import requires_mpirun, run_hpcgan, run_hpcgan_mpi, write_phi_laden_copy

from hpcgan.preprocess.plan import assign_shards, shards_of_rank, split_subjects

SMALL = ("--size", "64", "--slices", "80:84", "--min-brain-fraction", "0")


def make_cohort(root: Path, sample_data: Path, subjects=("colin27", "mni152"), modalities=("t1", "seg")) -> Path:
    """Copy the real sample volumes into a fresh BraTS-layout input folder."""
    for subject in subjects:
        (root / subject).mkdir(parents=True, exist_ok=True)
        for modality in modalities:
            name = f"{subject}_{modality}.nii.gz"
            shutil.copy(sample_data / subject / name, root / subject / name)
    return root


def preprocess(inp, out, *args, **kwargs):
    return run_hpcgan("preprocess", "--input", inp, "--output", out, *args, **kwargs)


def shards(out: Path, split="*"):
    return sorted(out.glob(f"{split}-*-of-*.h5"))


def read_shard(path) -> dict:
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f}


def save_like(path: Path, data, affine, dtype=None):
    image = nib.Nifti1Image(np.asarray(data if dtype is None else data.astype(dtype)), affine)
    path.unlink(missing_ok=True)
    nib.save(image, path)


def load(path: Path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


# ---------------------------------------------------------------- a normal run


def test_preprocess_writes_shards_and_manifest(sample_data, tmp_path):
    out = tmp_path / "ds"
    result = preprocess(sample_data, out, *SMALL, "--mask", "seg", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "hpcgan-dataset" and manifest["format_version"] == 1
    assert manifest["image_shape"] == [1, 64, 64] and manifest["dtype"] == "float16"
    assert manifest["modalities"] == ["t1"] and manifest["has_masks"] is True
    # One field of view for the dataset: the larger subject (MNI, 233 mm) sets it.
    assert manifest["pixel_spacing_mm"] == [233.0 / 64] * 2 and manifest["slice_thickness_mm"] == 1.0
    assert (
        manifest["intensity"]["norm"] == "percentile" and 0 < manifest["intensity"]["lo"] < manifest["intensity"]["hi"]
    )
    assert manifest["splits"]["train"] == {"slices": 8, "subjects": 2, "shards": [s.name for s in shards(out)]}
    assert [s.name for s in shards(out)] == ["train-00000-of-00002.h5", "train-00001-of-00002.h5"]
    for shard in manifest["shards"]:
        data = read_shard(out / shard["name"])
        assert data["images"].shape == (4, 1, 64, 64) and data["masks"].shape == (4, 64, 64)
        assert data["slice_index"].tolist() == [80, 81, 82, 83]
        assert data["images"].min() == -1.0 and data["images"].max() <= 1.0
        assert (data["images"][:, 0, 0, 0] == -1.0).all()  # background corner
        assert (data["masks"] > 0).any()
        # The mask lies on the brain: nearly every labelled pixel is brighter than background.
        assert (data["images"][:, 0][data["masks"] > 0] > -1.0).mean() > 0.95
    subject = manifest["subjects"]["mni152"]
    assert subject["split"] == "train" and subject["slice_indices"] == [80, 81, 82, 83]
    assert set(subject["files"]) == {"t1", "seg"} and len(subject["files"]["t1"]["sha256"]) == 64
    assert subject["files"]["t1"]["file"] == "mni152_t1.nii.gz"
    with h5py.File(out / shards(out)[0], "r") as f:
        assert f["images"].chunks[0] == 32 and f.attrs["norm"] == "percentile"
        assert json.loads(f.attrs["norm_params"])["percentiles"] == [0.5, 99.5]


def test_help_lists_every_option():
    result = run_hpcgan("preprocess", "--help")
    assert result.returncode == 0
    for flag in (
        "--modalities",
        "--mask",
        "--slices",
        "--min-brain-fraction",
        "--size",
        "--channels",
        "--norm",
        "--shards",
        "--val-fraction",
        "--seed",
        "--dtype",
        "--compression",
        "--pseudonymize",
        "--skip-bad",
        "--overwrite",
        "--volume-index",
        "--test-fraction",
        "--nan-as-background",
        "--config",
    ):
        assert flag in result.stdout


def test_anisotropic_reoriented_and_any_dtype_give_the_same_anatomy(sample_data, tmp_path):
    """2x2x3 mm voxels, an LPS-ordered file, int16 with a scale slope, float64 .nii: after RAS,
    square-FOV padding and resize, the slices match the 1 mm uint8 original."""
    t1, affine = load(sample_data / "mni152" / "mni152_t1.nii.gz")
    inp = tmp_path / "in"
    for name in ("iso", "aniso", "lps", "int16", "f64"):
        (inp / name).mkdir(parents=True)
    save_like(inp / "iso" / "iso_t1.nii.gz", t1, affine)
    save_like(inp / "aniso" / "aniso_t1.nii.gz", t1[::2, ::2, ::3], affine @ np.diag([2.0, 2.0, 3.0, 1.0]))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [t1.shape[0] - 1, t1.shape[1] - 1]
    save_like(inp / "lps" / "lps_t1.nii.gz", t1[::-1, ::-1, :], affine @ flip)
    scaled = nib.Nifti1Image((t1.astype(np.int16) * 4), affine)
    scaled.header.set_slope_inter(0.25, 0.0)
    nib.save(scaled, inp / "int16" / "int16_t1.nii.gz")
    save_like(inp / "f64" / "f64_t1.nii", t1, affine, np.float64)  # uncompressed: memory-mapped
    out = tmp_path / "ds"
    result = preprocess(inp, out, "--size", "64", "--min-brain-fraction", "0", "--val-fraction", "0", "--shards", "5")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    images = {}
    for shard in manifest["shards"]:
        data = read_shard(out / shard["name"])
        images[data["subject"][0].decode()] = data["images"].astype(np.float32)
    iso = images["iso"]
    assert iso.shape == (189, 1, 64, 64)
    for name in ("lps", "int16", "f64"):
        np.testing.assert_allclose(images[name], iso, atol=2e-3, err_msg=name)
    aniso = images["aniso"]
    assert aniso.shape == (63, 1, 64, 64)
    for k in (25, 30, 35):  # 3 mm slice k sits at 1 mm slice 3k
        a, b = aniso[k, 0], iso[3 * k, 0]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95, k
        assert np.abs(a - b).mean() < 0.08, k


def test_channels_modalities_dtype_and_compression(sample_data, tmp_path):
    inp = make_cohort(tmp_path / "in", sample_data, subjects=("mni152",), modalities=("t1", "gm"))
    ref = tmp_path / "ref"
    assert preprocess(inp, ref, *SMALL, "--val-fraction", "0").returncode == 0
    t1 = read_shard(shards(ref)[0])["images"].astype(np.float32)
    runs = {
        "two": ("--modalities", "t1,gm"),
        "rgb": ("--channels", "3"),
        "u8": ("--dtype", "uint8", "--compression", "gzip"),
    }
    for name, extra in runs.items():
        result = preprocess(inp, tmp_path / name, *SMALL, "--val-fraction", "0", *extra)
        assert result.returncode == 0, result.stderr
    two = read_shard(shards(tmp_path / "two")[0])["images"].astype(np.float32)
    assert two.shape == (4, 2, 64, 64)
    np.testing.assert_array_equal(two[:, 0], t1[:, 0])  # channel order = --modalities order
    assert np.abs(two[:, 1] - two[:, 0]).mean() > 0.05
    rgb = read_shard(shards(tmp_path / "rgb")[0])["images"]
    assert rgb.shape == (4, 3, 64, 64) and all((rgb[:, c] == rgb[:, 0]).all() for c in range(3))
    with h5py.File(shards(tmp_path / "u8")[0], "r") as f:
        assert f["images"].dtype == np.uint8 and f["images"].compression == "gzip"
        decoded = f["images"][()].astype(np.float32) / 127.5 - 1.0
    assert np.abs(decoded - t1).max() <= 0.5 / 127.5 + 1e-3
    assert json.loads((tmp_path / "u8" / "manifest.json").read_text())["dtype"] == "uint8"


def test_norm_zscore_and_ct_window_record_their_source_range(sample_data, tmp_path):
    inp = make_cohort(tmp_path / "in", sample_data, subjects=("mni152",), modalities=("t1",))
    for norm, extra in (("zscore", ("--zscore-clip", "2")), ("ct-window", ("--ct-level", "100", "--ct-width", "100"))):
        out = tmp_path / norm
        assert preprocess(inp, out, *SMALL, "--val-fraction", "0", "--norm", norm, *extra).returncode == 0
        intensity = json.loads((out / "manifest.json").read_text())["intensity"]
        images = read_shard(shards(out)[0])["images"]
        assert intensity["norm"] == norm and images.min() == -1.0 and images.max() <= 1.0
        if norm == "ct-window":
            assert (intensity["lo"], intensity["hi"]) == (50.0, 150.0)
        else:
            t1, _ = load(inp / "mni152" / "mni152_t1.nii.gz")
            values = t1[t1 != 0].astype(np.float64)
            assert np.isclose(intensity["lo"], values.mean() - 2 * values.std())


def test_split_is_by_subject_and_reproducible(sample_data, tmp_path):
    ids = [f"s{i:02d}" for i in range(20)]
    a, b = split_subjects(ids, 0.25, seed=3), split_subjects(ids, 0.25, seed=3)
    assert a == b and sum(v == "val" for v in a.values()) == 5
    assert a != split_subjects(ids, 0.25, seed=4)
    out = tmp_path / "ds"
    assert preprocess(sample_data, out, *SMALL, "--val-fraction", "0.5").returncode == 0
    train = {s.decode() for p in shards(out, "train") for s in read_shard(p)["subject"]}
    val = {s.decode() for p in shards(out, "val") for s in read_shard(p)["subject"]}
    assert len(train) == 1 and len(val) == 1 and not train & val
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s for s, v in manifest["subjects"].items() if v["split"] == "val"} == val


def test_shards_are_balanced_over_ranks_and_their_content_does_not_depend_on_ranks():
    ids = [f"s{i:02d}" for i in range(43)]
    shards = assign_shards(ids, 8, "train") + assign_shards([f"v{i}" for i in range(5)], 1, "val")
    assert [len(s["subjects"]) for s in shards] == [6, 6, 6, 5, 5, 5, 5, 5, 5]
    assert sorted(x for s in shards[:8] for x in s["subjects"]) == ids
    for world in (1, 2, 3, 4):
        parts = [shards_of_rank(shards, r, world) for r in range(world)]
        names = [s["name"] for part in parts for s in part]
        assert sorted(names) == sorted(s["name"] for s in shards)  # every shard exactly once
        loads = [sum(len(s["subjects"]) for s in part) for part in parts]
        assert max(loads) - min(loads) <= 6, (world, loads)
    # Largest first beats round-robin (27 + 21 subjects here); finer shards balance better still.
    assert max(sum(len(s["subjects"]) for s in shards_of_rank(shards, r, 2)) for r in (0, 1)) == 26
    fine = assign_shards(ids, 16, "train")
    assert max(sum(len(s["subjects"]) for s in shards_of_rank(fine, r, 2)) for r in (0, 1)) == 22


def test_config_file_with_flags_overriding(sample_data, tmp_path):
    config = tmp_path / "pre.yaml"
    config.write_text(
        f"input: {sample_data}\noutput: {tmp_path / 'ds'}\nsize: 64\nslices: '80:82'\n"
        "min-brain-fraction: 0\nval_fraction: 0\n"
    )
    assert run_hpcgan("preprocess", "--config", config, "--size", "32").returncode == 0
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["image_shape"] == [1, 32, 32] and manifest["splits"]["train"]["slices"] == 4
    config.write_text("input: x\noutput: y\nsise: 64\n")
    result = run_hpcgan("preprocess", "--config", config)
    assert result.returncode == 2 and "unknown key 'sise'" in result.stderr
    for flags, words in (
        (("--size", "100"), "'size' must be a power of two"),
        (("--dtype", "int8"), "'dtype' must be one of float16, uint8"),
        (("--channels", "2"), "'channels' must be 1"),
    ):
        result = preprocess(sample_data, tmp_path / "bad", *flags)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- finding the input


def test_symlinked_subject_folders_are_followed_and_loops_end(sample_data, tmp_path):
    """data/raw/<subject> linking to a shared copy, as on a cluster's project space; a link back
    to a parent and one inside a linked folder make loops (glob's `**` never returns on them)."""
    shared = make_cohort(tmp_path / "project" / "cohort", sample_data, modalities=("t1",))
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for subject in ("colin27", "mni152"):
        (raw / subject).symlink_to(shared / subject, target_is_directory=True)
    (raw / "loop").symlink_to(raw.parent, target_is_directory=True)
    (shared / "mni152" / "up").symlink_to(shared, target_is_directory=True)
    args = (*SMALL, "--val-fraction", "0")
    assert preprocess(shared, tmp_path / "ref", *args).returncode == 0
    expected = (tmp_path / "ref" / "manifest.json").read_text()
    for n, spec in enumerate((raw, f"{raw}/*", f"{raw}/**/*_t1.nii.gz")):
        out = tmp_path / f"ds{n}"
        result = preprocess(spec, out, *args, timeout=60)
        assert result.returncode == 0, (spec, result.stderr)
        assert (out / "manifest.json").read_text() == expected, spec  # both subjects, each once


# ---------------------------------------------------------------- resume and overwrite


def test_rerun_resumes_and_a_different_config_needs_overwrite(sample_data, tmp_path):
    out = tmp_path / "ds"
    args = (*SMALL, "--val-fraction", "0")
    assert preprocess(sample_data, out, *args).returncode == 0
    first, second = shards(out)
    inode = first.stat().st_ino
    manifest = (out / "manifest.json").read_text()
    # Interrupted run: the manifest and one shard missing, the other shard corrupted.
    (out / "manifest.json").unlink()
    os.remove(second)
    result = preprocess(sample_data, out, *args)
    assert result.returncode == 0 and "kept 1 shard" in result.stderr
    assert first.stat().st_ino == inode and (out / "manifest.json").read_text() == manifest
    with open(second, "ab") as f:
        f.write(b"x")
    assert preprocess(sample_data, out, *args).returncode == 0
    assert (out / "manifest.json").read_text() == manifest  # rewritten shard, same checksum
    result = preprocess(sample_data, out, "--size", "32", "--val-fraction", "0")
    assert result.returncode == 2 and "different config" in result.stderr and "--overwrite" in result.stderr
    assert (out / "manifest.json").read_text() == manifest
    assert preprocess(sample_data, out, "--size", "32", "--val-fraction", "0", "--overwrite").returncode == 0
    assert json.loads((out / "manifest.json").read_text())["image_shape"] == [1, 32, 32]


# ---------------------------------------------------------------- de-identification


def test_no_header_text_path_or_name_reaches_outputs(sample_data, tmp_path):
    inp = write_phi_laden_copy(sample_data, tmp_path / "PATIENT_DIR_Doe", b"SECRET_John_Doe_1970")
    salt = tmp_path / "salt.txt"
    out = tmp_path / "ds"
    result = preprocess(inp, out, *SMALL, "--mask", "seg", "--pseudonymize", "--salt-file", salt)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s.startswith("sub-") for s in manifest["subjects"])
    blobs = [result.stdout.encode(), result.stderr.encode()]
    blobs += [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for secret in (b"SECRET", b"PATIENT_DIR", str(tmp_path).encode(), b"colin27", b"mni152"):
        assert not any(secret in blob for blob in blobs), secret
    # Same salt → same pseudonyms (and a resumable dataset).
    again = preprocess(inp, out, *SMALL, "--mask", "seg", "--pseudonymize", "--salt-file", salt)
    assert again.returncode == 0 and json.loads((out / "manifest.json").read_text()) == manifest


# ---------------------------------------------------------------- 1 rank vs 2 ranks


@requires_mpirun
@pytest.mark.mpi
def test_two_ranks_write_the_same_bytes_as_one(sample_data, tmp_path):
    args = ("--input", sample_data, "--mask", "seg", "--size", "64", "--slices", "70:90", "--val-fraction", "0.5")
    one, two = tmp_path / "one", tmp_path / "two"
    run_hpcgan("preprocess", *args, "--output", one, check=True)
    result = run_hpcgan_mpi(2, "preprocess", *args, "--output", two, check=True)
    assert "on 2 rank(s)" in result.stderr
    names = [p.name for p in shards(one)]
    assert names == [p.name for p in shards(two)] == ["train-00000-of-00001.h5", "val-00000-of-00001.h5"]
    for name in names:
        a, b = read_shard(one / name), read_shard(two / name)
        assert a.keys() == b.keys() == {"images", "masks", "subject", "slice_index"}
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), (name, key)
    assert (one / "manifest.json").read_text() == (two / "manifest.json").read_text()


@requires_mpirun
@pytest.mark.mpi
def test_a_bad_volume_on_one_rank_leaves_nothing_behind(sample_data, tmp_path):
    inp = make_cohort(tmp_path / "in", sample_data)
    victim = inp / "mni152" / "mni152_t1.nii.gz"
    data, affine = load(victim)
    save_like(victim, np.zeros_like(data), affine)
    out = tmp_path / "ds"
    result = run_hpcgan_mpi(2, "preprocess", "--input", inp, "--output", out, *SMALL, "--val-fraction", "0")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line and "hpcgan preprocess" in line]
    assert len(errors) == 1 and "mni152_t1.nii.gz: all voxels are zero" in errors[0]
    assert not shards(out) and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".h5") or ".h5." in p.name]


# ---------------------------------------------------------------- bad input


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_nifti(path):
    path.write_bytes(b"this is a text file, not an image\n" * 50)


def _empty(path):
    path.write_bytes(b"")


def _two_d(path):
    data, affine = load(path)
    save_like(path, data[:, :, 90], affine)


def _four_d(path):
    data, affine = load(path)
    save_like(path, np.stack([data, data[::-1]], axis=-1), affine)


def _all_zero(path):
    data, affine = load(path)
    save_like(path, np.zeros_like(data), affine)


def _one_voxel(value):
    def breaker(path):
        data, affine = load(path)
        data = data.astype(np.float32)
        data[90, 100, 80] = value
        save_like(path, data, affine)

    return breaker


def _other_shape(path):
    seg = path.with_name(path.name.replace("_t1", "_seg"))
    data, affine = load(seg)
    save_like(seg, data[:-4], affine)


def _other_affine(path):
    seg = path.with_name(path.name.replace("_t1", "_seg"))
    data, affine = load(seg)
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    save_like(seg, data, shifted)


def _missing(path):
    path.with_name(path.name.replace("_t1", "_seg")).unlink()


def _duplicate(path):
    data, affine = load(path)
    save_like(path.with_name(path.name.replace(".nii.gz", ".nii")), data, affine)


BAD_SUBJECT = {  # how the mni152 subject is broken → words of the one-line error
    "truncated": (_truncate, "mni152_t1.nii.gz: truncated or corrupt"),
    "not-nifti": (_not_nifti, "mni152_t1.nii.gz: not a readable NIfTI file"),
    "empty": (_empty, "mni152_t1.nii.gz: empty file"),
    "2d": (_two_d, "mni152_t1.nii.gz: a 2-D image"),
    "4d": (_four_d, "mni152_t1.nii.gz: a 4-D image with 2 volumes; pick one with --volume-index"),
    "all-zero": (_all_zero, "mni152_t1.nii.gz: all voxels are zero"),
    "nan": (
        _one_voxel(np.nan),
        "mni152_t1.nii.gz: contains NaN voxels (1; outside a resampled field of view? "
        "--nan-as-background makes them background)",
    ),
    "inf": (_one_voxel(np.inf), "mni152_t1.nii.gz: contains Inf voxels"),
    "shape": (_other_shape, "subject mni152: seg has shape 193x233x189 but t1 has 197x233x189"),
    "affine": (_other_affine, "subject mni152: seg and t1 have different affines"),
    "missing": (_missing, "subject mni152: missing modality seg"),
    "duplicate": (_duplicate, "subject mni152: 2 files for modality t1 (mni152_t1.nii, mni152_t1.nii.gz)"),
}


def _assert_one_error_and_nothing_written(result, words, out: Path):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpcgan preprocess: error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    if out.exists():
        assert not [p for p in out.iterdir() if p.name.endswith(".h5") or ".h5." in p.name]
        assert not (out / "manifest.json").exists()


def broken_cohort(case, sample_data, tmp_path):
    """Both sample subjects, with mni152 broken as BAD_SUBJECT[case] says; (input, words)."""
    inp = make_cohort(tmp_path / "in", sample_data)
    breaker, words = BAD_SUBJECT[case]
    breaker(inp / "mni152" / "mni152_t1.nii.gz")
    return inp, words


@pytest.mark.parametrize("case", sorted(BAD_SUBJECT))
def test_bad_subject_fails_with_one_line_and_no_output(case, sample_data, tmp_path):
    inp, words = broken_cohort(case, sample_data, tmp_path)
    out = tmp_path / "ds"
    # Two shards: colin27 (shard 0) is written before mni152 fails, and must be removed.
    result = preprocess(inp, out, *SMALL, "--mask", "seg", "--val-fraction", "0")
    _assert_one_error_and_nothing_written(result, words, out)


@pytest.mark.parametrize("case", sorted(BAD_SUBJECT))
def test_skip_bad_lists_the_bad_subject_and_writes_the_rest(case, sample_data, tmp_path):
    inp, words = broken_cohort(case, sample_data, tmp_path)
    out = tmp_path / "ds"
    result = preprocess(inp, out, *SMALL, "--mask", "seg", "--val-fraction", "0", "--skip-bad")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["subjects"]) == ["colin27"] and manifest["splits"]["train"]["slices"] == 4
    assert [s["subject"] for s in manifest["skipped"]] == ["mni152"]
    assert words.split(": ", 1)[-1] in manifest["skipped"][0]["reason"]
    assert str(tmp_path) not in json.dumps(manifest)


def test_volume_index_picks_one_volume_of_a_4d_image(sample_data, tmp_path):
    inp = make_cohort(tmp_path / "in", sample_data, subjects=("mni152",), modalities=("t1",))
    ref = tmp_path / "ref"
    assert preprocess(inp, ref, *SMALL, "--val-fraction", "0").returncode == 0
    _four_d(inp / "mni152" / "mni152_t1.nii.gz")
    out = tmp_path / "ds"
    assert preprocess(inp, out, *SMALL, "--val-fraction", "0", "--volume-index", "0").returncode == 0
    assert read_shard(shards(out)[0])["images"].tobytes() == read_shard(shards(ref)[0])["images"].tobytes()


def test_no_input_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "ds"
    _assert_one_error_and_nothing_written(preprocess(tmp_path / "empty", out), "--input: no NIfTI volumes", out)
    _assert_one_error_and_nothing_written(preprocess(tmp_path / "nowhere", out), "--input: no such file", out)


def test_unwritable_output_directory(sample_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "ds"
    _assert_one_error_and_nothing_written(preprocess(sample_data, out, *SMALL), "output directory is not writable", out)


# ---------------------------------------------------------------- hpcgan info


def test_info_summarises_and_verifies(sample_dataset, tmp_path):
    result = run_hpcgan("info", sample_dataset, "--verify")
    assert result.returncode == 0, result.stderr
    for words in (
        "1 x 64 x 64",
        "float16",
        "train        1 subjects, 48 slices",
        "val          1 subjects, 48 slices",
        "percentile",
        "verified     2 shards ok",
    ):
        assert words in result.stdout, words
    copy = tmp_path / "copy"
    shutil.copytree(sample_dataset, copy)
    with h5py.File(copy / "val-00000-of-00001.h5", "r+") as f:
        f["images"][0, 0, 0, 0] = 0.5
    result = run_hpcgan("info", copy, "--verify")
    assert result.returncode == 1 and "val-00000-of-00001.h5: sha256 differs" in result.stderr
    result = run_hpcgan("info", tmp_path)
    assert result.returncode == 2 and "not a dataset" in result.stderr
