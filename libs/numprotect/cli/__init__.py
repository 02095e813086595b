"""`numprotect`: the admin CLI (docs/cli.md). typer commands over the services' gRPC APIs.

Layout: `main` assembles the command groups; `contexts` reads and writes the kubectl-like config file;
`connection` turns a context into TLS channels with the bearer token and a deadline on every call; `failures`
maps a gRPC status (with its google.rpc details) or a local problem to one stderr line and an exit code;
`output` prints a response as a rich table or as the protobuf JSON mapping. A command group is a module with a
`typer.Typer` named `app`, registered in `main.COMMAND_GROUPS`; a command takes `ctx: typer.Context` and an
`OutputOption`, gets its channels from `session_of(ctx).connect()` and prints through `Printer`.
"""

import os
import sys

if "grpc" not in sys.modules:  # the console script, before anything loads gRPC (read when its core starts)
    # gRPC's C core logs a failed TLS handshake or an unusable CA file on stderr itself, beside the one line the
    # CLI prints for the failure; GRPC_VERBOSITY set by the caller still wins (debugging).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
