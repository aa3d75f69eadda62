"""Process isolation: the engine in a child process, so a crash of MLX (a SIGSEGV, an abort, an
out-of-memory kill) takes the engine, not the server and its open streams.

`host` runs in the child (the engine side plus a frame pump over its pipes); `link` is the
front's end (spawn, restart under a policy, re-submit what was in flight); `frames` is the wire
format; `recovery` is the pure bookkeeping of what must be resumed after a death.
"""
