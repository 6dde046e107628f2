"""Tables, sessions and the job state machine. The only package that writes job status."""

# Installs the mapper events that seal and open tenant data in job (and other) rows.
from db import sealing as _sealing  # noqa: F401
