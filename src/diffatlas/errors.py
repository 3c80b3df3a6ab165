"""The one exception type for bad input.

Raise :class:`UserError` whenever the input (a config value, a file, a layer name) is wrong
and the message alone tells the user what to fix: name the file, key or value and what is
allowed. The CLI turns it into one line and exit status 2.
"""


class UserError(ValueError):
    """Bad input, explained in the message."""
