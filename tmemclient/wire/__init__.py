"""The wire layer, shared by the guest library and the daemon: framing (codec), the messages
and their checks (messages), errors and their statuses (errors), shared-memory layout (layout),
request rings (ring), descriptor passing (fds) and sizes (units). Nothing here imports trio."""
