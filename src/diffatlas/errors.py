"""The one exception type for bad input.

Raise :class:`UserError` whenever the input (a config value, a file, a layer name) is wrong
and the message alone tells the user what to fix: name the file, key or value and what is
allowed. The CLI turns it into one line and exit status :data:`EXIT_USER_ERROR`.
"""

EXIT_USER_ERROR = 2
"""Exit status of a command that failed on bad input (argparse's own for a bad flag, too): no
retry with more time or memory can fix it. A crash exits 1; a job SLURM killed for time or
memory shows as TIMEOUT / OUT_OF_MEMORY in ``sacct``."""


class UserError(ValueError):
    """Bad input, explained in the message."""
