"""The daemon's environment (docs/contract.md, Configuration) for a devstack.

`daemon_env()` returns the variables `notip_trio.config.load_settings()` reads,
pointing at a running NatsServer (as a mapped client identity) and a database
on a PgServer. Pass it as a subprocess's `env` (merged over os.environ) or
apply it with `monkeypatch.setenv`.
"""

from __future__ import annotations

from devstack._common import free_port
from devstack.natsd import NatsServer
from devstack.postgres import PgServer


def daemon_env(
    nats: NatsServer,
    pg: PgServer,
    dbname: str | None = None,
    *,
    identity: str = "notip-trio",
    metrics_port: int | None = None,
    **overrides: str,
) -> dict[str, str]:
    """Environment variables for the daemon against `nats` and `pg`.

    `dbname` defaults to the server's application database; `identity` picks
    the client certificate; `metrics_port` defaults to a port free right now
    (so a test knows where /metrics is). `overrides` (NAME=value) come last.
    """
    client = nats.client(identity)
    env = {
        "NATS_URL": nats.url,
        "NATS_TLS_CA": str(client.ca),
        "NATS_TLS_CERT": str(client.cert),
        "NATS_TLS_KEY": str(client.key),
        "DB_HOST": pg.host,
        "DB_PORT": str(pg.port),
        "DB_NAME": dbname or pg.dbname,
        "DB_USER": pg.user,
        "DB_PASSWORD_FILE": str(pg.password_file),
        "DB_SSL_MODE": "disable",
        "METRICS_ADDR": f"127.0.0.1:{metrics_port if metrics_port is not None else free_port()}",
    }
    env.update(overrides)
    return env
