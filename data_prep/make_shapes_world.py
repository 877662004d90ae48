"""Generate the synthetic shapes worlds A, B and C (see mmlora/showcase/shapes.py for what they contain).

Run:
    python data_prep/make_shapes_world.py --out data/shapes
    python data_prep/make_shapes_world.py --out /tmp/shapes --worlds A --scale 0.1 --image-size 96

Same as `mmlora data shapes ...`.
"""

import sys

from mmlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "shapes", *sys.argv[1:]]))
