"""Facts copied from docs/contract.md that several tests check against."""

from __future__ import annotations

# docs/contract.md, Configuration: the variables marked required.
REQUIRED_VARIABLES = (
    "NATS_URL",
    "NATS_TLS_CA",
    "NATS_TLS_CERT",
    "NATS_TLS_KEY",
    "DB_HOST",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD_FILE",
)
