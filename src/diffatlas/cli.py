"""Command-line dispatcher: ``diffatlas <command> [options]``.

Commands live in :mod:`diffatlas.commands`, one module each; the command name uses dashes
and the module name underscores. Errors that come from bad input (:class:`UserError`)
print one clear line and exit with status 2 (:data:`~diffatlas.errors.EXIT_USER_ERROR`) instead of
a traceback.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

from diffatlas import commands
from diffatlas.errors import EXIT_USER_ERROR, UserError
from diffatlas.logs import setup_logging

log = logging.getLogger("diffatlas")


def available_commands() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: diffatlas <command> [options]\n\ncommands:\n")
        for name in available_commands():
            sys.stdout.write(f"  {name}\n")
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in available_commands():
        sys.stderr.write(f"diffatlas: unknown command {name!r}; available: {', '.join(available_commands())}\n")
        return EXIT_USER_ERROR
    setup_logging()
    module = importlib.import_module(f"diffatlas.commands.{name.replace('-', '_')}")
    try:
        return int(module.main(rest) or 0)
    except UserError as err:
        log.error("%s", err)
        sys.stderr.write(f"diffatlas {name}: error: {err}\n")
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as err:
        # torch.OutOfMemoryError (devices) and the CPU allocator's RuntimeError ("can't allocate memory")
        cpu_oom = "can't allocate memory" in str(err)
        if not isinstance(err, MemoryError) and type(err).__name__ != "OutOfMemoryError" and not cpu_oom:
            raise
        first = (str(err).strip().splitlines() or ["out of memory"])[0]
        msg = (f"out of memory ({first}); lower this stage's batch_size or chunk settings in the config "
               "(config.schema.yaml lists them), or use a device with more memory")
        log.error("%s", msg)
        sys.stderr.write(f"diffatlas {name}: error: {msg}\n")
        return EXIT_USER_ERROR
