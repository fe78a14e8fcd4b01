#!/usr/bin/env python
"""Write one site's data folder from the bundled FedBiP-Shapes benchmark.

Usage: make-site-data.py OUT_DIR [STYLE] [--site N] [--per-class K] [--seed S] [--force]
(``--help`` lists every option; same as ``python -m fedbip_flower.tools.deploy make-site-data``.)
"""

import sys

from fedbip_flower.tools.deploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-site-data", *sys.argv[1:]]))
