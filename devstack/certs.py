"""A private PKI for mutual TLS with nats-server, made with trustme.

Identity scheme: every client certificate carries exactly one SAN, the e-mail
address `<name>@notip.local` (see `identity_for`). nats-server's
`verify_and_map` tries the SAN e-mail addresses first, so that address is the
user name listed in its `authorization { users = [...] }` block. The subject DN
(trustme's random organisation) never matches a user.

Files written into the PKI directory (all PEM):

    ca.pem, ca-key.pem           the CA (the key lets later calls issue more certs)
    server.pem, server-key.pem   server certificate for localhost and 127.0.0.1
    <name>.pem, <name>-key.pem   one client certificate per name

`foreign/` holds certificates from a second, unrelated CA (`issue_foreign_client`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trustme

IDENTITY_DOMAIN = "notip.local"
#: Client identities the developer stack and the tests use; all are mapped users.
DEFAULT_CLIENTS: tuple[str, ...] = ("notip-trio", "gateway-sim", "mgmt-api", "test-client")
SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")


def identity_for(name: str) -> str:
    """The SAN e-mail address (= nats user) of the client certificate named `name`."""
    return f"{name}@{IDENTITY_DOMAIN}"


@dataclass(frozen=True, slots=True)
class ClientCert:
    """One client's files. `identity` is its SAN e-mail address; `ca` the CA to trust."""

    name: str
    identity: str
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of a PKI made by `make_pki`. `clients` maps name -> ClientCert."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, ClientCert]

    def client(self, name: str) -> ClientCert:
        """The client certificate `name`; KeyError names the known ones."""
        try:
            return self.clients[name]
        except KeyError:
            raise KeyError(f"no client certificate {name!r}; have {sorted(self.clients)}") from None

    def issue_client(self, name: str, *, identity: str | None = None) -> ClientCert:
        """Issue (or re-issue) a client certificate from this PKI's CA.

        The new certificate is *not* added to `clients`, and a server started
        before does not map it: use this for an identity the server must refuse
        (pass a name not in DEFAULT_CLIENTS). `identity` defaults to
        `identity_for(name)`.
        """
        ca = trustme.CA.from_pem(self.ca.read_bytes(), self.ca_key.read_bytes())
        return _write_client(ca, self.directory, self.ca, name, identity or identity_for(name))


def make_pki(directory: Path, clients: Iterable[str] = DEFAULT_CLIENTS) -> Pki:
    """Make a new CA, a server certificate and one client certificate per name.

    `directory` is created if needed; existing files are overwritten. Keys are
    written with mode 0600.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="notip-trio devstack")
    ca_path = directory / "ca.pem"
    ca_key = directory / "ca-key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    _write_key(ca_key, ca.private_key_pem.bytes())

    server = ca.issue_cert(*SERVER_NAMES, common_name="localhost")
    server_cert = directory / "server.pem"
    server_key = directory / "server-key.pem"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    _write_key(server_key, server.private_key_pem.bytes())

    issued = {
        name: _write_client(ca, directory, ca_path, name, identity_for(name)) for name in clients
    }
    return Pki(directory, ca_path, ca_key, server_cert, server_key, issued)


def issue_foreign_client(directory: Path, name: str = "intruder") -> ClientCert:
    """A client certificate from a second, unrelated CA, in `directory/foreign/`.

    Its identity is `identity_for(name)`; pass a mapped name (e.g. "test-client")
    to prove the server refuses it because of the CA, not the identity. The
    returned `ca` is the foreign CA; to talk to our server, trust our own CA.
    """
    target = directory / "foreign"
    target.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="unrelated CA")
    ca_path = target / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return _write_client(ca, target, ca_path, name, identity_for(name))


def _write_client(
    ca: trustme.CA, directory: Path, ca_path: Path, name: str, identity: str
) -> ClientCert:
    leaf = ca.issue_cert(identity, common_name=name)
    cert = directory / f"{name}.pem"
    key = directory / f"{name}-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    _write_key(key, leaf.private_key_pem.bytes())
    return ClientCert(name=name, identity=identity, cert=cert, key=key, ca=ca_path)


def _write_key(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
