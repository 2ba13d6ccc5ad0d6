"""The developer toolkit: throwaway real servers and helpers shared by the tests,
the benchmark (`benchmarks/`) and `scripts/trio-run`.

Not installed with the daemon (the wheel holds `notip_trio` only) and never
imported by it; run from a checkout (`devstack.proc.child_env` puts the checkout
on PYTHONPATH for child processes). Each module owns one concern:

- `certs`: a private PKI (CA, server certificate, client certificates whose SAN
  email is the identity nats-server's `verify_and_map` maps to a user).
- `natsd`: a nats-server subprocess with JetStream, mutual TLS and
  `verify_and_map`, restartable on the same port.
- `postgres`: a PostgreSQL cluster made with initdb (or an external server named
  by `NOTIP_TEST_PG_DSN`), with a password-authenticated application user;
  `containers`: the TimescaleDB container path where an engine runs.
- `prometheus`: a Prometheus process scraping a daemon (the scrape test).
- `env`: the daemon's environment variables (docs/contract.md, Configuration) for a stack.
- `proc`: the one process wrapper (`Child`), `python_module`, `child_env`.
- `js`: blocking NATS helpers: `run_nats`, the platform's streams,
  publish-and-wait, consumer and stream state.
- `mgmt_standin`: the management-API stand-in and its launcher (`spawn_standin`).
- `simulator`: the gateway simulator.
- `relay`: a TCP relay that freezes or slows connections (fault tests).
- `stack`: `scripts/trio-run`'s orchestration.

Every server is a subprocess of this process: `close()` (also registered with
`atexit`) stops it and removes its temporary directory, and every wait has a
deadline.
"""

from __future__ import annotations
