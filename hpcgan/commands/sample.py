"""Write stacks of generated images from a checkpoint, as the reference study did (stacks of 100).

A stack is N independent 2-D slices, each from its own latent: not an anatomically coherent volume and
not a synthetic patient, even where it is saved as a NIfTI volume (its header says so).

Per stack k, in --out:
  stack-0000k.h5      dataset `images` (stack, C, H, W) float32 in [-1, 1]; attributes: checkpoint_sha256,
                      step, seed, stack_index, labels, truncation, config (JSON); from a joint image + mask model
                      also `masks` (stack, H, W) uint8 classes (the argmax of G's mask channels)
  stack-0000k.nii.gz  a volume (X, Y, stack) in RAS with the training voxel size, values mapped back to the
                      training intensity range, clean header (4-D (X, Y, stack, C) when the channels are
                      different modalities; else the first channel)
  stack-0000k-mask.nii.gz  (joint models) the masks as a uint8 label volume with the image volume's
                      geometry: open it as a label map over stack-0000k.nii.gz in 3D Slicer or ITK-SNAP
  stack-0000k.png     a 10x10 contact sheet (joint models: each mask class outlined in colour)
and index.json (checkpoint sha256, step, why that checkpoint, seed, sizes, formats, files, config), written last
by rank 0.

Stack k holds images k*N to (k+1)*N-1 of the image set of --seed (hpcgan.generation: image i's latent
is seeded by (seed, i)); the default seed is the run's train.seed, so the first images are the very
images its evaluation during training scored. The same seed gives the same images whatever the number of
ranks; `mpirun -np N hpcgan sample ...` deals the stacks out round-robin. --checkpoint takes a checkpoint
file, a `latest`/`best` pointer, or a run directory (or its checkpoints/): the checkpoint the run selected,
checkpoints/best, which honours the memorisation guard (hpcgan.training.checkpointing.select_checkpoint; one
log line says which step and why). RUN/checkpoints/latest samples the newest instead.

Example:
  hpcgan sample --checkpoint runs/cepa2023 --out samples/cepa2023 --num-stacks 10 --seed 1
  hpcgan sample --checkpoint runs/stylegan2 --out samples/stylegan2-psi07 --truncation 0.7"""

import argparse

import numpy as np
import torch

from hpcgan.commands import CHECKPOINT_HELP
from hpcgan.errors import UsageError
from hpcgan.generation import class_labels, generate_images, load_generator, run_seed
from hpcgan.io import check_writable_dir, sha256_file, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.models.layers import split_joint
from hpcgan.parallel import launch_env
from hpcgan.parallel.group import world_group
from hpcgan.progress import progress_bar
from hpcgan.stacks import contact_sheet, write_mask_nifti, write_png, write_stack_h5, write_stack_nifti
from hpcgan.training.checkpointing import load_checkpoint, select_checkpoint

FORMATS = ("h5", "nifti", "png")
SHEET_COLUMNS = 10

log = get_logger("sample")


def add_arguments(parser):
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help=CHECKPOINT_HELP,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--num-stacks", type=int, default=1, metavar="K", help="number of stacks (default 1)")
    parser.add_argument(
        "--stack-size",
        type=int,
        default=100,
        metavar="N",
        help="images per stack, each from its own latent: independent slices, not a coherent volume (default 100)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the image set (default: the run's train.seed, whose first images its evaluation scored)",
    )
    parser.add_argument("--format", default="h5,nifti,png", help="comma-separated subset of h5,nifti,png (default all)")
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the EMA generator if the checkpoint has one (default), or the trained G",
    )
    parser.add_argument(
        "--labels",
        default=None,
        metavar="L0,L1,...",
        help="class labels of a conditional model, cycled over the images (default: all classes)",
    )
    parser.add_argument(
        "--truncation",
        type=float,
        default=1.0,
        metavar="PSI",
        help="stylegan2 only: pull each w towards the mean w tracked in training, w_avg + PSI (w - w_avg); "
        "below 1 trades diversity for typical images (0.5-0.7 is common; default 1: none)",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda:<local rank> if CUDA is available, else cpu (default auto)",
    )


# ---------------------------------------------------------------- files


def set_truncation(G, psi: float, source):
    """--truncation on a generator whose family has a mapping network (stylegan2); 1 on any."""
    if not 0 <= psi <= 1:
        raise UsageError(f"--truncation: must be in [0, 1] (1 = none), got {psi:g}")
    if psi != 1 and not hasattr(G, "truncation"):
        raise UsageError(f"--truncation: {source} is a {G.cfg.arch} model, which has no mapping network to truncate")
    if psi != 1:
        G.truncation = psi


def stack_name(index: int) -> str:
    return f"stack-{index:05d}"


def write_stack(out, index: int, images: np.ndarray, formats, attrs: dict, dataset: dict | None, masks=None) -> list:
    """Write one stack (and its masks, from a joint model) in each format; returns the file names."""
    name, files = stack_name(index), []
    if "h5" in formats:
        write_stack_h5(f"{out}/{name}.h5", images, attrs, masks)
        files.append(f"{name}.h5")
    if "nifti" in formats:
        modalities = dataset.get("modalities") or []
        write_stack_nifti(
            f"{out}/{name}.nii.gz",
            images,
            dataset["pixel_spacing_mm"],
            dataset["slice_thickness_mm"],
            dataset.get("intensity"),
            all_channels=len(modalities) > 1,
        )
        files.append(f"{name}.nii.gz")
        if masks is not None:
            write_mask_nifti(
                f"{out}/{name}-mask.nii.gz", masks, dataset["pixel_spacing_mm"], dataset["slice_thickness_mm"]
            )
            files.append(f"{name}-mask.nii.gz")
    if "png" in formats:
        write_png(contact_sheet(images, nrow=SHEET_COLUMNS, masks=masks), f"{out}/{name}.png")
        files.append(f"{name}.png")
    return files


# ---------------------------------------------------------------- the command


def parse_formats(text: str) -> list:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format {text}: expected a comma-separated subset of {','.join(FORMATS)}")
    return [f for f in FORMATS if f in formats]


def parse_labels(text):
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--labels {text}: expected comma-separated class numbers, e.g. 0,1") from None


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_nifti_geometry(dataset, source):
    missing = [k for k in ("pixel_spacing_mm", "slice_thickness_mm") if not (dataset or {}).get(k)]
    if missing:
        raise UsageError(
            f"{source}: the checkpoint has no dataset.{missing[0]} to write NIfTI volumes; use --format h5,png"
        )


def run(args):
    # Every input is checked on every rank before any collective or any file.
    env = launch_env()
    for flag in ("num_stacks", "stack_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    formats = parse_formats(args.format)
    labels = parse_labels(args.labels)
    path, reason = select_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    device = resolve_device(args.device, env.local_rank)
    G = load_generator(ckpt, args.ema, device, source=str(path))
    set_truncation(G, args.truncation, path)
    class_labels(labels, [0], G.cfg.num_classes)  # refuse bad --labels now, not after the first stack
    seed = run_seed(ckpt) if args.seed is None else args.seed
    dataset = ckpt.get("dataset") or {}
    if "nifti" in formats:
        check_nifti_geometry(dataset, path)
    out = check_writable_dir(args.out)
    sha = sha256_file(path)
    if env.rank == 0:  # once every input is known to be good: an error stays the only line
        log.info("%s: %s", path, reason)
    group = world_group()  # after the checks, before the first stack: a world MPI does not see fails at once

    config = ckpt.get("config") or {}
    attrs = {
        "checkpoint_sha256": sha,
        "step": int(ckpt.get("step") or 0),
        "seed": seed,
        "labels": labels or [],
        "truncation": args.truncation,
        "config": config,
    }
    mine = range(group.rank, args.num_stacks, group.world_size)
    files = []
    with progress_bar(len(mine) * args.stack_size, "sampling", "images", enabled=group.is_root) as bar:
        for k in mine:
            first = k * args.stack_size
            images = generate_images(
                G, range(first, first + args.stack_size), seed, labels, batch_size=args.batch_size, progress=bar
            )
            images, masks = split_joint(images.numpy(), G.cfg.channels)
            files += write_stack(out, k, images, formats, {**attrs, "stack_index": k}, dataset, masks)

    every_rank = group.gather_object(files)
    if group.is_root:
        index = {
            "checkpoint_sha256": sha,
            "step": attrs["step"],
            "seed": seed,
            "num_stacks": args.num_stacks,
            "stack_size": args.stack_size,
            "formats": formats,
            "ema": args.ema,
            "labels": labels or [],
            "truncation": args.truncation,
            "class_names": dataset.get("class_names") if G.cfg.mask_classes else None,
            "files": sorted(f for rank_files in every_rank for f in rank_files),
            "checkpoint_selection": reason,
            "config": config,
        }
        write_json_atomic(f"{out}/index.json", index)
        log.info("wrote %d stacks of %d images to %s", args.num_stacks, args.stack_size, out)
    return 0
