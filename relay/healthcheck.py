"""``python -m relay.healthcheck``: the probe the container image and the Kubernetes example
run; it lives in :mod:`relay.ops.healthcheck`, this name is kept for them."""

import sys

from relay.ops.healthcheck import main

if __name__ == "__main__":
    sys.exit(main())
