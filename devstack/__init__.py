"""Throwaway real servers for tests, the developer stack and the benchmark.

Nothing here is imported by the daemon. Each module owns one concern:

- `certs`: a private PKI (CA, server certificate, client certificates whose SAN
  email is the identity nats-server's `verify_and_map` maps to a user).
- `natsd`: a nats-server subprocess with JetStream, mutual TLS and
  `verify_and_map`, restartable on the same port.
- `postgres`: a PostgreSQL cluster made with initdb (or an external server named
  by `NOTIP_TEST_PG_DSN`), with a password-authenticated application user.
- `env`: the daemon's environment variables (SPEC.md, Configuration) for a stack.

Every server is a subprocess of this process: `close()` (also registered with
`atexit`) stops it and removes its temporary directory, and every wait has a
deadline.
"""

from __future__ import annotations
