"""``python -m captum_normgrad.runner CONFIG`` (also ``torchrun --nproc_per_node=N -m captum_normgrad.runner CONFIG``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
