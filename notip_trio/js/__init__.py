"""JetStream and core NATS, split by role (as nats.py's own `js/`).

- `delivery`: one delivered message (`JsMsg`) and what its ack subject says (`Delivery`).
- `specs`: the pull consumers the daemon runs (`PullSpec`, `telemetry_spec`,
  `decommission_spec`) and the policy for an existing durable (`durable_problems`).
- `pull`: the pull engine (pull slots in asyncio land, one loop per slot).
- `bridge`: `NatsBridge`, the one nats-py connection (connect with mTLS, stream and
  consumer admin, request, publish, ack/nak/term), and the Protocols the rest of
  the daemon sees it through (`Acker`, `Requester`, `AlertPublisher`).

nats-py runs inside trio-asyncio. Everything here crosses the asyncio bridge
once per *batch*, never once per message (a crossing costs ~66 µs).
"""
