"""PostgreSQL, split by role.

- `pool`: the deadline-bounded round trip (`bounded`, `RoundTrip`), the pool, and
  `Database` (open, close, ping, run a function in a transaction).
- `schema`: every table and index (telemetry, telemetry_rejected, gateway_liveness),
  the start-up migration, and the TimescaleDB probe and plan (the one decision
  the daemon and `notip-trio check` share).
- `writer`: `Storage`, the daemon's database: the pool plus the migration and the
  batched COPY writer with redelivery dedup (`RejectedRecord`, `WriteResult`).
"""
