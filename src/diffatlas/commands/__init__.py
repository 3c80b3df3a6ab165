"""One module per command: ``diffatlas make-shapesworld`` runs ``commands/make_shapesworld.py``.

Each module defines ``main(argv: list[str]) -> int``. Adding a command means adding a
module here; nothing else has to be edited, so stages stay independent.
"""
