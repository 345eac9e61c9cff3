"""The downstream client as the worker's package offers it: `streamer_client` (its own distribution,
`streamer-client`, in client/ of this repository), under its older name."""

from streamer_client import *  # noqa: F401,F403
from streamer_client import __all__  # noqa: F401
