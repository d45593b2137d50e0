"""The model families, keyed by `model.arch`: `build_generator(cfg)` and `build_discriminator(cfg)` build
the networks of `FAMILIES[cfg.arch]`.

A family is one module of this package that provides
  Generator(cfg)      the nn.Module G (shapes: `build_generator`)
  Discriminator(cfg)  the nn.Module D (shapes: `build_discriminator`)
  check_config(cfg)   the family's own rules on the config (the length of g_channels, the layout of D, ...),
                      raising ValueError("model.KEY: ...") naming the key
where cfg is a hpcgan.models.config.ModelConfig whose family-independent checks have passed. Family modules
read it duck-typed and do not import hpcgan.models.config, which imports this registry. Everything is
tensors and modules: devices follow the input, no per-rank Python state; the only randomness (D input
noise, dropout) uses torch's RNG in training mode. A family keeps its parameter names and order and its
init's random draws: checkpoints store the former, tests/training/test_golden_curve.py records what the latter give.

Adding a family: a module NAME.py here with those three names (shared blocks: hpcgan.models.layers; a
variant of an existing family can subclass its classes, as cepa2023 does dcgan's), its entry in FAMILIES,
a shipped config (configs/), and its tests.
"""

from torch import nn

from hpcgan.models import cepa2023, dcgan, stylegan2

FAMILIES = {"dcgan": dcgan, "cepa2023": cepa2023, "stylegan2": stylegan2}


def family(arch: str):
    """The module of family `arch`; any other name is a ValueError naming the families."""
    if arch not in FAMILIES:
        raise ValueError(f"model.arch: must be one of {', '.join(FAMILIES)}, got {arch!r}")
    return FAMILIES[arch]


def build_generator(cfg) -> nn.Module:
    """G(z: (N, latent_dim), labels: (N,) int64 | None) -> (N, channels [+ mask_classes], resolution,
    resolution) in [-1, 1]."""
    return family(cfg.arch).Generator(cfg)


def build_discriminator(cfg) -> nn.Module:
    """D(x: (N, channels [+ mask_classes], resolution, resolution), labels | None) -> (N,) raw scores."""
    return family(cfg.arch).Discriminator(cfg)


def layer_summary(name: str, net: nn.Module, arch: str) -> list:
    """Lines of a table of `net`'s layers (each module that holds parameters itself, with those of its own
    sub-layers folded in) and their parameter counts, ending with the total: what a run prints at start."""
    rows, owners = [], set()
    for path, module in net.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(path.startswith(f"{owner}.") for owner in owners):
            continue  # a sub-layer of a layer already listed (a modulated conv's affine)
        owners.add(path)
        rows.append((path, type(module).__name__, sum(p.numel() for p in module.parameters())))
    width = max((len(path) for path, _, _ in rows), default=0)
    lines = [f"  {path:<{width}}  {kind:<16} {count:>12,}" for path, kind, count in rows]
    total = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers())
    return [f"{name} ({arch}): {total:,} parameters, {buffers:,} buffer values", *lines]
