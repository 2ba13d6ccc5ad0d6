"""The pull consumers the daemon runs, and what it accepts of an existing durable.

`telemetry_spec` and `decommission_spec` are the two pulls of the task tree
(app.py); `durable_problems` judges a durable that already exists, at start-up
(`NatsBridge.ensure_pull_consumer`) and in the preflight (`notip-trio check`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nats.js.api import AckPolicy, ConsumerConfig

from .. import wire
from ..batching import BatchPolicy
from ..config import Settings


@dataclass(frozen=True, slots=True)
class PullSpec:
    stream: str
    durable: str
    filter_subject: str
    batch: int  # the largest pull request (and batch); the fixed size without batch_min
    expires_s: float
    depth: int  # pull requests outstanding at once
    max_ack_pending: int
    # The smallest pull request: with it, each slot adapts its request size between
    # batch_min and batch (notip_trio.batching); None keeps every request at `batch`.
    batch_min: int | None = None

    def policy(self) -> BatchPolicy:
        """A fresh size policy for one slot: fill in about half the expiry."""
        low = self.batch if self.batch_min is None else min(self.batch_min, self.batch)
        return BatchPolicy(low, self.batch, target_fill_s=self.expires_s / 2)


@dataclass(frozen=True, slots=True)
class DurableProblem:
    """Something wrong with an existing durable consumer.

    `refused`: the daemon will not start on it (a push consumer, an ack policy
    other than explicit). The others it runs with, badly, and logs `event` with
    `context` at start. `message` is one line for people.
    """

    kind: Literal["push", "ack_policy", "filter_redundant", "max_ack_pending_low"]
    message: str
    event: str
    context: dict[str, Any]

    @property
    def refused(self) -> bool:
        return self.kind in ("push", "ack_policy")


def durable_problems(
    cfg: ConsumerConfig,
    stream_subjects: Sequence[str],
    *,
    stream: str,
    durable: str,
    max_ack_pending: int,
) -> list[DurableProblem]:
    """What is wrong with durable `durable` (configuration `cfg`) on `stream`.

    Pure: the start-up check (`ensure_pull_consumer`) and the preflight
    (`notip-trio check`) both judge a durable with it. `max_ack_pending` is
    what this configuration keeps in flight.
    """
    where = f"durable consumer {durable} on stream {stream}"
    out: list[DurableProblem] = []
    if cfg.deliver_subject:
        out.append(
            DurableProblem(
                "push",
                f"{where} is a push consumer; notip-trio needs a pull consumer (README: "
                "Migrating from the Go service)",
                "consumer_push_refused",
                {"durable": durable, "deliver_subject": cfg.deliver_subject},
            )
        )
    if cfg.ack_policy != AckPolicy.EXPLICIT:
        out.append(
            DurableProblem(
                "ack_policy",
                f"{where} has ack policy {cfg.ack_policy}; explicit is required",
                "consumer_ack_policy_refused",
                {"durable": durable, "ack_policy": str(cfg.ack_policy)},
            )
        )
    if cfg.filter_subject and list(stream_subjects) == [cfg.filter_subject]:
        out.append(
            DurableProblem(
                "filter_redundant",
                f"{where} filters on {cfg.filter_subject}, the stream's own subjects: on "
                "nats-server 2.9 that slows deliveries to a trickle",
                "consumer_filter_redundant",
                {
                    "durable": durable,
                    "filter_subject": cfg.filter_subject,
                    "detail": "equal to the stream's subjects; on nats-server 2.9 it slows "
                    "deliveries; recreate the durable without it (README: Migrating)",
                },
            )
        )
    if cfg.max_ack_pending is not None and 0 < cfg.max_ack_pending < max_ack_pending:
        out.append(
            DurableProblem(
                "max_ack_pending_low",
                f"{where} allows {cfg.max_ack_pending} unacked messages; this configuration "
                f"keeps up to {max_ack_pending} in flight, so deliveries will be throttled",
                "consumer_max_ack_pending_low",
                {
                    "durable": durable,
                    "max_ack_pending": cfg.max_ack_pending,
                    "wanted": max_ack_pending,
                },
            )
        )
    return out


def telemetry_spec(settings: Settings) -> PullSpec:
    """The telemetry pull, from the settings (TELEMETRY_* and the durable's name)."""
    batch = settings.telemetry_batch_size
    depth = settings.telemetry_pipeline_depth
    return PullSpec(
        stream=wire.TELEMETRY_STREAM,
        durable=settings.nats_consumer_durable_name,
        filter_subject=wire.TELEMETRY_SUBJECTS,
        batch=batch,
        batch_min=settings.telemetry_batch_min,
        expires_s=settings.telemetry_flush_s,
        depth=depth,
        # Slots + the pulled channel + the decode stage + the write stage hold batches
        # (at most `batch` each: the adaptive size never exceeds it).
        max_ack_pending=max(1000, batch * (2 * depth + 3)),
    )


def decommission_spec() -> PullSpec:
    """The decommission pull: fixed, small, acted on within about a second."""
    return PullSpec(
        stream=wire.DECOMMISSION_STREAM,
        durable=wire.DECOMMISSION_DURABLE,
        filter_subject=wire.DECOMMISSION_SUBJECTS,
        batch=100,
        # A decommission is acted on within about a second, even when it comes alone.
        expires_s=1.0,
        depth=1,
        max_ack_pending=1000,
    )
