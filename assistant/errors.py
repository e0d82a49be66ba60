"""One error type for bad user input and one exit-code wrapper for every entry point.

    def main(argv=None) -> int:
        return run_main(_main, argv)          # _main(argv) parses, works and returns an exit code

Exit codes: 0 done; 1 the work failed (an unexpected error, or one the entry point names as a failure);
2 bad input (`UsageError`, an unreadable image, a model that cannot be loaded, or the entry point's own
bad-input types); 130 interrupted (Ctrl-C). An error is one line on stderr, ``error: <message>``, never
a traceback; ``ANOMALY_ASSISTANT_DEBUG=1`` lets the exception through with its traceback. Kept free of
heavy imports: the entry points check their input before torch and transformers load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "ANOMALY_ASSISTANT_DEBUG"


class UsageError(ValueError):
    """Bad input from the user: one line on stderr, exit code 2."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def is_bad_input(error: BaseException, extra: tuple[type, ...] = ()) -> bool:
    """Whether `error` is the user's input at fault (exit 2) rather than the work failing (exit 1)."""
    if isinstance(error, (UsageError, *extra)):
        return True
    for module, name in (("assistant.imageio", "ImageInputError"), ("assistant.checkpoint", "ModelLoadError")):
        loaded = sys.modules.get(module)  # only once something imported it: checking costs no import
        if loaded is not None and isinstance(error, getattr(loaded, name)):
            return True
    return False


def run_main(
    main: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    *,
    bad_input: tuple[type, ...] = (),
    interrupted: str = "interrupted",
) -> int:
    """Run `main(argv)` and map what it raises to one line on stderr and an exit code (see the module's doc)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line for the user; the traceback with ANOMALY_ASSISTANT_DEBUG=1
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT if is_bad_input(error, bad_input) else EXIT_FAILURE


def checked_question(question: str | None, max_chars: int) -> str | None:
    """The question to ask, by the rule every surface (CLI, app) shares; None means the default question.

    A question left out or blank (only spaces) asks the default question; one over `max_chars` is a
    `UsageError`. Anything else is asked as typed, without its surrounding whitespace.
    """
    if question is None or not question.strip():
        return None
    question = question.strip()
    if len(question) > max_chars:
        raise UsageError(f"the question is too long ({len(question)} characters; at most {max_chars})")
    return question
