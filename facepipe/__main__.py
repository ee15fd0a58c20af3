"""``python -m facepipe`` = the ``facepipe`` command."""

from facepipe.cli import main

main()
