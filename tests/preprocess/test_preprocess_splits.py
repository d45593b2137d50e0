"""`hpcgan preprocess --test-fraction` (a third split by subject, shown and verified by `hpcgan info`, read by
`read_slices`) and `--nan-as-background` (NaN outside a resampled field of view), on the real sample brains."""

import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import run_hpcgan
from test_preprocess import SMALL, _assert_one_error_and_nothing_written, preprocess, read_shard, shards

from hpcgan.data import read_slices
from hpcgan.preprocess.plan import split_subjects
from hpcgan.preprocess.transforms import decode

# Four subjects made of the two sample brains: enough for one in val, one in test and two in train.
COHORT = {"sub-a": "colin27", "sub-b": "mni152", "sub-c": "colin27", "sub-d": "mni152"}


@pytest.fixture(scope="module")
def cohort(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    for name, brain in COHORT.items():
        (root / name).mkdir()
        shutil.copy(sample_data / brain / f"{brain}_t1.nii.gz", root / name / f"{name}_t1.nii.gz")
    return root


def subjects_of(out, split) -> set:
    return {s.decode() for p in shards(out, split) for s in read_shard(p)["subject"]}


def test_test_split_is_a_third_disjoint_split_by_subject(cohort, tmp_path):
    out = tmp_path / "ds"
    result = preprocess(cohort, out, *SMALL, "--val-fraction", "0.25", "--test-fraction", "0.25", "--seed", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["test"] == {"slices": 4, "shards": ["test-00000-of-00001.h5"], "subjects": 1}
    assert [manifest["splits"][s]["subjects"] for s in ("train", "val")] == [2, 1]
    train, val, test = (subjects_of(out, split) for split in ("train", "val", "test"))
    assert len(train) == 2 and len(val) == len(test) == 1 and not (train & val or train & test or val & test)
    assert train | val | test == set(COHORT)
    assert {s for s, v in manifest["subjects"].items() if v["split"] == "test"} == test
    # Reproducible from the seed; adding the test split takes it from training and leaves val as it was.
    with_test = split_subjects(sorted(COHORT), 0.25, 1, test_fraction=0.25)
    assert with_test == split_subjects(sorted(COHORT), 0.25, 1, test_fraction=0.25)
    assert {s for s, v in with_test.items() if v == "test"} == test
    assert {s for s, v in split_subjects(sorted(COHORT), 0.25, 1).items() if v == "val"} == val
    # What `hpcgan evaluate --split test` reads.
    with h5py.File(out / "test-00000-of-00001.h5", "r") as f:
        assert np.array_equal(read_slices(out, "test"), decode(f["images"][()]))

    info = run_hpcgan("info", out, "--verify")
    assert info.returncode == 0, info.stderr
    assert "test         1 subjects, 4 slices, 1 shards" in info.stdout and "verified     4 shards ok" in info.stdout
    with h5py.File(out / "test-00000-of-00001.h5", "r+") as f:
        f["images"][0, 0, 0, 0] = 0.5
    info = run_hpcgan("info", out, "--verify")
    assert info.returncode == 1 and "test-00000-of-00001.h5: sha256 differs" in info.stderr


def test_without_a_test_fraction_the_dataset_has_no_test_split(cohort, tmp_path):
    out = tmp_path / "ds"
    assert preprocess(cohort, out, *SMALL, "--val-fraction", "0.25").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train", "val"] and not shards(out, "test")
    with pytest.raises(Exception, match="no split 'test'"):
        read_slices(out, "test")


@pytest.mark.parametrize(
    "options, words",
    [
        (("--test-fraction", "-0.1"), "'test_fraction' must be in [0, 1), got -0.1"),
        (("--test-fraction", "1"), "'test_fraction' must be in [0, 1), got 1.0"),
        (("--val-fraction", "0.5", "--test-fraction", "0.5"), "leave no training subject"),
        # The two sample brains: one for training, one for validation, none left for a test split.
        (("--val-fraction", "0.5", "--test-fraction", "0.1"), "2 usable subject(s) are too few for a test split"),
    ],
)
def test_bad_test_fractions_fail_with_one_line_before_any_volume_is_read(options, words, sample_data, tmp_path):
    out = tmp_path / "ds"
    _assert_one_error_and_nothing_written(preprocess(sample_data, out, *SMALL, *options), words, out)


def write_with_nan_outside(sample_data, root, offset=0.0) -> np.ndarray:
    """The MNI152 T1 (+ `offset`) as float32 under root/clean and, with NaN in its first 24 sagittal planes
    (no brain there, as after resampling a smaller scan onto its grid), under root/nan. Returns that region."""
    image = nib.load(sample_data / "mni152" / "mni152_t1.nii.gz")
    volume = np.asanyarray(image.dataobj).astype(np.float32)
    outside = np.zeros(volume.shape, dtype=bool)
    outside[:24] = True
    assert not volume[outside].any() and volume.min() == 0
    volume += np.float32(offset)
    for name, data in (("clean", volume), ("nan", np.where(outside, np.float32(np.nan), volume))):
        (root / name / "mni152").mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, image.affine), root / name / "mni152" / "mni152_t1.nii.gz")
    return outside


def test_nan_outside_the_field_of_view_is_refused_or_made_background(sample_data, tmp_path):
    outside = write_with_nan_outside(sample_data, tmp_path)
    refused = preprocess(tmp_path / "nan", tmp_path / "refused", *SMALL, "--val-fraction", "0")
    words = f"subject mni152: mni152_t1.nii.gz: contains NaN voxels ({outside.sum()}; "
    _assert_one_error_and_nothing_written(refused, words, tmp_path / "refused")
    assert "--nan-as-background" in refused.stderr

    out, reference = tmp_path / "ds", tmp_path / "reference"
    result = preprocess(tmp_path / "nan", out, *SMALL, "--val-fraction", "0", "--nan-as-background")
    assert result.returncode == 0, result.stderr
    assert preprocess(tmp_path / "clean", reference, *SMALL, "--val-fraction", "0").returncode == 0
    images = read_shard(shards(out)[0])["images"]
    assert not np.isnan(images).any()
    # NaN became zero, MRI's background: the same slices as from the volume with zeros there.
    assert images.tobytes() == read_shard(shards(reference)[0])["images"].tobytes()


def test_nan_in_ct_becomes_its_lowest_value_not_zero(sample_data, tmp_path):
    write_with_nan_outside(sample_data, tmp_path, offset=-1000.0)  # air at -1000 HU around the head
    ct = (*SMALL, "--val-fraction", "0", "--norm", "ct-window", "--ct-level", "0", "--ct-width", "400")
    out, reference = tmp_path / "ds", tmp_path / "reference"
    assert preprocess(tmp_path / "nan", out, *ct, "--nan-as-background").returncode == 0
    assert preprocess(tmp_path / "clean", reference, *ct).returncode == 0
    # 0 HU (water) would be mid-window; the lowest value is the air that was there.
    assert read_shard(shards(out)[0])["images"].tobytes() == read_shard(shards(reference)[0])["images"].tobytes()
