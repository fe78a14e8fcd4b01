"""``python -m fedbip_flower.tools.deploy``: the deployment command line (see ``cli.py``)."""

import sys

from fedbip_flower.tools.deploy.cli import main

if __name__ == "__main__":
    sys.exit(main())
