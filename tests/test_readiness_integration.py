"""/readyz while NATS is away, on the real servers (docs/contract.md Behaviour 7).

Rules: a private nats-server of this test is stopped and started again; the
daemon runs in the test's nursery and stops through its `stop` event; waits
poll the endpoint with a deadline under an absolute hang guard; nothing asserts
on speed.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import trio

from devstack.env import daemon_env
from notip_trio.metrics import Metrics

from .fix_daemon import daemon_settings, running_daemon, until


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def test_readyz_names_nats_while_it_is_away_and_recovers(
    private_nats_server, pg_server, pg_database, monkeypatch
):
    nats = private_nats_server
    env = daemon_env(nats, pg_server, pg_database.name)
    settings = daemon_settings(env, monkeypatch, METRICS_ADDR="127.0.0.1:0")
    answers: list[tuple[int, str]] = []

    def readyz_is(status: int, text: str) -> bool:
        answers.append(_get(port, "/readyz"))
        return answers[-1] == (status, text)

    with trio.fail_after(180):
        async with running_daemon(settings, Metrics()) as port:
            await until(lambda: readyz_is(200, "ok\n"), 30, "ready at start")
            await trio.to_thread.run_sync(nats.stop)
            await until(lambda: readyz_is(503, "nats: not connected\n"), 60, "not ready")
            live = await trio.to_thread.run_sync(_get, port, "/livez")
            assert live == (200, "ok\n")  # alive all the while
            await trio.to_thread.run_sync(nats.start)
            await until(lambda: readyz_is(200, "ok\n"), 60, "ready again")
    # Never any other reason: the database and ingest were fine throughout.
    assert {a for a in answers if a[0] != 200} == {(503, "nats: not connected\n")}
