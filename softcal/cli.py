"""The ``softcal`` command: post-hoc calibration of a classifier's saved outputs.

    softcal calibrate [VAL] [--test TEST] [--save T.json] ...   fit T, report before/after
    softcal calibrate [VAL] --method M [--save CAL.json] ...    another calibrator (vector, ...)
    softcal compare [VAL] [--test TEST] ...                     every method, one table
    softcal evaluate FILE [--temperature T|T.json] ...          metrics and diagram, no fitting
    softcal apply FILE --temperature T|T.json|CAL.json ...      write calibrated probabilities
    softcal bench [...]                                         the loss benchmark (quick)

``softcal`` and ``python -m softcal`` with no arguments run ``softcal calibrate`` on the embedded
DenseNet-40 / CIFAR-10 logits (softcal/data, MIT licence, see the LICENSE file there).

Files are read safely (see :mod:`softcal._io`): .npz/.npy without pickles, .pt with
``weights_only=True``, CSV/TSV, Parquet (with pyarrow); pickles and object arrays only with
``--allow-pickle``. Exit status: 0 success, 2 usage or input error (one line on stderr), 1
unexpected failure (set SOFTCAL_TRACEBACK=1 for the traceback), 128 + the signal's number for
Ctrl-C, SIGTERM and SIGHUP, 141 (silently) when stdout is a pipe that closed early.

Each command is a module of :mod:`softcal._cli` with ``add_parser(subparsers)`` and
``run(args)``; a new command is one more module and one more line in ``COMMANDS``. Every file a
command writes is checked against its inputs first and written whole (see
:mod:`softcal._cli.common`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback
from typing import Callable, Dict, List, Optional

import torch

from . import _io
from ._cli import apply as _apply_cmd
from ._cli import calibrate as _calibrate_cmd
from ._cli import compare as _compare_cmd
from ._cli import evaluate as _evaluate_cmd
from ._cli.common import (DEFAULT_DATA, EXIT_CODES, EXIT_FAILURE, EXIT_OK, EXIT_PIPE, EXIT_USAGE,
                          FORMATS_LINE)
from ._files.atomic import Terminated, signals_raise
from ._io import InputError, Split

__all__ = ["main", "load_scores", "DEFAULT_DATA", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

DEFAULT_CHUNK_ROWS = _apply_cmd.DEFAULT_CHUNK_ROWS

#: the commands: name -> module with add_parser(subparsers) and run(args) -> exit status
COMMANDS = {"calibrate": _calibrate_cmd, "evaluate": _evaluate_cmd, "apply": _apply_cmd,
            "compare": _compare_cmd}


def load_scores(path: str, allow_pickle: bool = False) -> Dict[str, Split]:
    """Load a file of (scores, labels) safely (see :func:`softcal._io.load_scores`)."""
    return _io.load_scores(path, allow_pickle=allow_pickle)


def _bench(argv: List[str]) -> int:
    from . import bench

    return bench.main(argv, prog="softcal bench", quick_default=True)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="softcal",
        description="Post-hoc calibration of a classifier's saved outputs by temperature "
                    "scaling. With no arguments: softcal calibrate on the embedded DenseNet-40 / "
                    "CIFAR-10 logits.",
        epilog=f"{FORMATS_LINE}\n{EXIT_CODES}.\n'softcal COMMAND --help' describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version",
                   version=f"softcal {__version__} (torch {torch.__version__}, python "
                           f"{platform.python_version()})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND",
                           title="commands (softcal COMMAND --help for each)")
    for module in COMMANDS.values():
        module.add_parser(sub)
    sub.add_parser("bench", add_help=False,
                   help="the loss benchmark (quick by default; softcal bench --help for options)")
    return p


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``softcal`` and ``python -m softcal``; returns the exit status."""
    try:
        rc = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return rc
    except BrokenPipeError:  # stdout is a pipe whose reader has gone (softcal ... | head)
        _quiet_stdout()
        return EXIT_PIPE


def _main(argv: List[str]) -> int:
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["calibrate"] + argv
    if argv[0] == "bench":
        return _guard("bench", lambda: _bench(argv[1:]), signals=False)
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # the command's own usage, not the top-level one
            sub = _subparser(parser, args.command) if args.command in COMMANDS else parser
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version (0) or a usage error (2, message printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    args.argv = argv
    run = COMMANDS[args.command].run
    return _guard(args.command, lambda: run(args))


def _quiet_stdout() -> None:
    """After a closed pipe: stdout goes to /dev/null, so that the interpreter's last flush at exit
    finds nowhere to fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured in tests)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _guard(command: str, fn: Callable[[], int], signals: bool = True) -> int:
    """Run a command: its exit status, or the status of what stopped it (one line on stderr);
    with ``signals``, SIGTERM and SIGHUP stop it as Ctrl-C does (outputs cleaned up)."""
    try:
        if not signals:
            rc = fn()
        else:
            with signals_raise():
                rc = fn()
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return rc
    except InputError as e:
        print(f"softcal {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        print(f"softcal {command}: interrupted (no output was left half-written)", file=sys.stderr)
        return 130
    except Terminated as e:
        import signal

        name = signal.Signals(e.signum).name
        print(f"softcal {command}: stopped by {name} (no output was left half-written)", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:  # noqa: BLE001  (unexpected: one line, status 1)
        if os.environ.get("SOFTCAL_TRACEBACK", "0") not in ("", "0"):
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"softcal {command}: unexpected error: {type(e).__name__}: {msg} (please report it; "
              "SOFTCAL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
