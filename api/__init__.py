"""The HTTP API: validates, stores through `db`, publishes through `tensorq.core.broker`."""
