"""The `hpcgan` commands, one module each: `add_arguments(parser)` and `run(args) -> int | None`, a thin
layer that parses flags, checks them and calls the library. hpcgan.cli's COMMANDS table is the one
place that lists them."""
