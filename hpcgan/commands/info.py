"""Summarise a dataset written by `hpcgan preprocess`: subjects and slices per split, image
shape, stored dtype, intensity range, pixel size and size on disk. With --verify, recompute every
shard's sha256 and compare it with the manifest (exit 1 on any mismatch or missing shard).

example:
  hpcgan info datasets/brats-t1 --verify
"""

import os

from hpcgan.errors import HpcganError
from hpcgan.io import sha256_file
from hpcgan.preprocess.manifest import load_manifest


def add_arguments(parser):
    parser.add_argument("dataset", metavar="DATASET_DIR", help="directory holding manifest.json and the shards")
    parser.add_argument("--verify", action="store_true", help="recompute shard checksums and compare with the manifest")


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.1f} {units[power]}"


def summary_lines(dataset_dir, manifest: dict) -> list:
    intensity = manifest["intensity"]
    on_disk = sum(
        os.path.getsize(os.path.join(dataset_dir, s["name"]))
        for s in manifest["shards"]
        if os.path.exists(os.path.join(dataset_dir, s["name"]))
    )
    lines = [
        f"dataset      {os.path.basename(os.path.abspath(dataset_dir))} (format {manifest['format']} "
        f"v{manifest['format_version']}, hpcgan {manifest.get('hpcgan_version', '?')})",
        f"modalities   {', '.join(manifest['modalities'])}"
        + (f"  mask: {manifest['mask']}" if manifest["has_masks"] else ""),
        *(
            [f"mask classes {manifest['mask_classes']}: {', '.join((manifest.get('class_names') or [])[:8])}"]
            + ([f"label map    {manifest['label_map']}"] if manifest.get("label_map") else [])
            if manifest.get("mask_classes")
            else []
        ),
        f"images       {' x '.join(map(str, manifest['image_shape']))} (C x H x W), stored as {manifest['dtype']}",
        f"pixels       {manifest['pixel_spacing_mm'][0]:.3f} x {manifest['pixel_spacing_mm'][1]:.3f} mm, "
        f"slice thickness {manifest['slice_thickness_mm']:.2f} mm",
        f"intensity    {intensity['norm']}: source {intensity['lo']:g} .. {intensity['hi']:g} -> -1 .. +1",
    ]
    for split, info in manifest["splits"].items():
        lines.append(f"{split:12s} {info['subjects']} subjects, {info['slices']} slices, {len(info['shards'])} shards")
    lines.append(
        f"skipped      {len(manifest['skipped'])} subjects"
        + "".join(f"\n  {s['subject']}: {s['reason']}" for s in manifest["skipped"])
    )
    lines.append(f"on disk      {_size(on_disk)}")
    return lines


def verify(dataset_dir, manifest: dict) -> list:
    """[(shard name, problem or None)] for every shard."""
    results = []
    for shard in manifest["shards"]:
        path = os.path.join(dataset_dir, shard["name"])
        if not os.path.exists(path):
            results.append((shard["name"], "missing"))
        elif sha256_file(path) != shard["sha256"]:
            results.append((shard["name"], "sha256 differs from the manifest"))
        else:
            results.append((shard["name"], None))
    return results


def run(args):
    manifest = load_manifest(args.dataset)
    print("\n".join(summary_lines(args.dataset, manifest)))
    if args.verify:
        results = verify(args.dataset, manifest)
        for name, problem in results:
            print(f"verify       {name}: {problem or 'ok'}")
        bad = [(n, p) for n, p in results if p]
        if bad:
            raise HpcganError(
                f"{os.path.join(args.dataset, bad[0][0])}: {bad[0][1]} "
                f"({len(bad)} of {len(results)} shards failed verification)"
            )
        print(f"verified     {len(results)} shards ok")
    return 0
