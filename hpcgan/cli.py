"""The `hpcgan` command: a thin dispatcher. Each command lives in its own module, which
provides `add_arguments(parser)` and `run(args) -> int | None`; this file only maps names to
modules, so `hpcgan --help` stays fast and imports no torch."""

import argparse
import importlib
import sys
import time
import traceback

from hpcgan import __version__
from hpcgan.errors import HpcganError, UsageError
from hpcgan.commands import common_flags
from hpcgan.io import group_readable_from_env, set_output_permissions
from hpcgan.log import setup_logging
from hpcgan.parallel.failure import PEER_FAILURE_GRACE_S, abort_job, lost_a_peer

# name -> (module in hpcgan.commands, one-line help). A command appears here only once it works.
COMMANDS = {
    "doctor": ("doctor", "check Python, torch, MPI, mpi4py, h5py, nibabel, Horovod and Slurm"),
    "sample-data": ("sample_data", "write real brain MRI volumes that ship inside installed packages"),
    "preprocess": ("preprocess", "NIfTI volumes -> sharded HDF5 dataset (MPI-parallel, resumable)"),
    "train": ("train", "train a GAN on a preprocessed dataset (one process, or many under mpirun/srun)"),
    "info": ("info", "summarise a preprocessed dataset; --verify checks shard checksums"),
    "sample": ("sample", "write stacks of generated images (HDF5, NIfTI, PNG) from a checkpoint"),
    "evaluate": ("evaluate", "score generated images: SWD, MS-SSIM, intensity, memorisation (+FID offline)"),
    "report": ("report", "HTML report of a run: losses, metrics, sample grids, memorisation, config"),
    "turing-test": ("turing_test", "blinded real-vs-synthetic reading session for clinicians, and its scores"),
    "sweep": ("sweep", "grid point I of a hyper-parameter grid as --set overrides (Slurm job arrays)"),
    "sweep-summary": ("sweep_summary", "rank finished runs by an evaluation metric (table and CSV)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(command: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(
        prog="hpcgan",
        parents=[common_flags(top=True)],
        description="Distributed GAN training on medical images for HPC clusters. "
        "`hpcgan COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"hpcgan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"hpcgan.commands.{module_name}") if name == command else None
        description = (module.__doc__ or help_text).strip() if module else help_text
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            parents=[common_flags(top=False)],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if module:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _wanted_command(argv):
    return next((a for a in argv if a in COMMANDS), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_wanted_command(argv))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(debug=args.debug)
    try:
        # Outputs derive from patients: private (or group-readable) before anything is written. Not for
        # doctor, which writes nothing and runs at container build time, where the byte-code caches of
        # the modules it imports must stay readable to every user of the image.
        if args.command != "doctor":
            set_output_permissions(args.group_readable or group_readable_from_env())
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"hpcgan {args.command}: interrupted\n")
        return 130
    except Exception as exc:  # one line, after the traceback with --debug
        if lost_a_peer(exc):
            # Another rank failed first and is ending the job with the line that says why: give the
            # launcher time to stop this rank quietly, so that line is the only one.
            time.sleep(PEER_FAILURE_GRACE_S)
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, HpcganError):
            code, text = exc.exit_code, str(exc)
        elif isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            code, text = 1, f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        else:
            code, text = 1, f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"hpcgan {args.command}: error: {text}\n")
        sys.stderr.flush()
        if not isinstance(exc, UsageError):
            # A runtime failure on one rank must end the whole job, not leave the others in a collective.
            abort_job(code)
        return code
