"""What every ``dh-*`` command shares: bad flags and interrupts end in one line on stderr, never a traceback.

``@app.command(cls=OneLineErrors)`` makes a Typer command (``typer.Typer(cls=OneLineErrorsGroup)`` a command
with subcommands, such as ``dh-train``):

* print a usage error (an unknown option, ``--steps abc``, a ``typer.BadParameter``) as
  ``<prog>: error: <message>`` and exit 2, instead of Typer's multi-line usage box;
* turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted`, which unwinds like any exception (so the
  atomic writers drop their ``.part`` files), then print ``<prog>: error: interrupted by SIGTERM`` and
  exit ``128 + signal`` (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP). A command calls
  :func:`raise_if_interrupted` between stages, in case the exception was swallowed on the way.
"""

from __future__ import annotations

import signal
import sys
import threading

from typer import Abort, BadParameter
from typer.core import TyperCommand, TyperGroup

# typer >= 0.2x carries its own copy of click, whose exceptions are not the click package's: take the
# usage-error base class from typer's own BadParameter, whichever click that is.
UsageError = next(c for c in BadParameter.__mro__ if c.__name__ == "UsageError")

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException (as KeyboardInterrupt): ``except Exception`` does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


_received: list[int] = []  # the stop signal this process took, if any


def _on_signal(signum, _frame) -> None:
    for s in SIGNALS:  # one is enough: a second one must not interrupt the clean-up the first started
        signal.signal(s, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again where a stop signal arrived but its exception was swallowed on the way
    (a library's bare ``except:`` while it was being imported, say), so the command still stops."""
    if _received:
        raise Interrupted(_received[0])


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class _OneLine:
    """The ``main`` of :class:`OneLineErrors` and :class:`OneLineErrorsGroup` (see the module doc)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prog = prog_name or self.name or "dh"
        saved = None
        if threading.current_thread() is threading.main_thread():
            _received.clear()
            saved = {s: signal.signal(s, _on_signal) for s in SIGNALS}
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except UsageError as e:  # BadParameter, NoSuchOption, MissingParameter, ...
            message = one_line(e.format_message())
            if message:  # empty: a group called with no arguments, whose help Typer has just printed
                sys.stderr.write(f"{prog}: error: {message}\n")
            code = 2
        except Interrupted as e:
            sys.stderr.write(f"{prog}: error: {e}\n")
            code = 128 + e.signum
        except (KeyboardInterrupt, Abort):
            sys.stderr.write(f"{prog}: error: interrupted by SIGINT\n")
            code = 130
        finally:
            if saved:
                for s, handler in saved.items():
                    signal.signal(s, handler)
        sys.stderr.flush()
        sys.exit(code)


class OneLineErrors(_OneLine, TyperCommand):
    """A TyperCommand whose usage errors and interrupts are one line on stderr (see the module doc)."""


class OneLineErrorsGroup(_OneLine, TyperGroup):
    """The same for a command with subcommands (``typer.Typer(cls=OneLineErrorsGroup)``): an unknown
    subcommand, or a usage error in any subcommand, is one line too."""
