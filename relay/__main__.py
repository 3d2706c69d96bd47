"""Allow ``python -m relay`` as an alias of the ``smtp-oauth-relay`` command."""

from relay.cli import main

raise SystemExit(main())
