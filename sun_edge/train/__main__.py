"""``python -m sun_edge.train ...`` / ``accelerate launch -m sun_edge.train ...``: the ``sun-edge train`` command."""

import sys

from sun_edge.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
