"""Imported only as the local engine's forkserver preload (``engine/local.py:_context``), never by other code.

The server's children inherit its signal handlers as they were after the preload: ignoring SIGINT here means a
worker ignores Ctrl-C from its first instant (the parent alone stops the run), with no start-up window in which
Ctrl-C in a terminal would print a worker's KeyboardInterrupt traceback. Importing torch here once makes each
worker's start a fork instead of a torch import.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import torch  # noqa: E402,F401 - the preload itself
