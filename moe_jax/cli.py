"""Helpers shared by the experiment binaries: one clear error line instead of a traceback wall."""

from __future__ import annotations

import sys

from absl import flags


def _one_line(error: BaseException) -> str:
    text = str(error.args[0]) if len(error.args) == 1 else str(error)
    text = text.replace("\\n", " ").replace("\\'", "").replace("'", "")
    return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for app.run(main, flags_parser=parse_flags): a bad flag or a bad
    --config.* override prints one 'error:' line and exits with status 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        bad = [arg for arg in argv[1:] if arg.startswith("--config")]
        fail(f"bad config or override ({' '.join(bad)}): {_one_line(error)}")
    return []


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
