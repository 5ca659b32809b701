"""``python -m rlflow``: the same as the ``rlflow`` command."""

from rlflow.cli import main

raise SystemExit(main())
