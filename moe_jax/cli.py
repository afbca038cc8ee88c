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


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Joins a multi-process run when a coordinator is given (flags first, then the environment
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). On CPU the collectives
    go through gloo. A single-process run does nothing here."""
    import os

    import jax

    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return
    count = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if count is None or index is None:
        fail("a coordinator address needs --num_processes and --process_id "
             "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(count), process_id=int(index))


def define_distributed_flags() -> None:
    """--coordinator_address, --num_processes and --process_id: how a binary joins a multi-process
    run (`join_distributed` reads them)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def join_distributed() -> None:
    """initialize_distributed from the flags of define_distributed_flags (or the environment)."""
    f = flags.FLAGS
    initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
