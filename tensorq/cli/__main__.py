"""`python -m tensorq.cli`: the same command as the `tensorq` console script."""

from tensorq.cli.main import app

app()
