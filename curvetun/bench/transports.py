"""
How each transport listens (in the server process) and connects (in the
client): plain TCP, TLS 1.3 with a throwaway certificate, curvetun through
endpoint strings with a key directory each side (C{curvetun}, the way
users run it), and curvetun with in-memory identities (C{curvetun-memory}).

Everything the benchmark takes from curvetun's own modules is imported
here, and only here.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import attrs
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    clientFromString,
    quoteStringArgument,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

from ..admission import ConnectionLimits
from ..endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint, service_pool
from ..keys import format_public_key
from ..registry import Registry
from ..service import CurveTunService
from ..vault import FileVault, MemoryVault
from .figures import LOCALHOST

CURVETUN_LIMITS = attrs.evolve(
    ConnectionLimits(), connections=None, connections_per_address=None, connections_per_network=None
)
"""
A curvetun server's connection limits in the benchmark: the memory figure
holds a thousand connections and more from one address; the handshake
limits stay as they are by default.
"""


# -- identities ------------------------------------------------------------------


def make_keydir(keydir: str) -> bytes:
    """
    Make a key directory as C{curvetun keygen} does; return its public key.
    """
    vault = FileVault.create(keydir)
    # Let the key directory go at once: another process uses it.
    vault.close()
    public_key: bytes = vault.public_key
    return public_key


def write_registry(path: str, *keys: bytes) -> None:
    """
    Write a registry with an entry for each of C{keys} from 127.0.0.1 (as
    C{curvetun trust 127.0.0.1 KEY} does, once per key).
    """
    with open(path, "w") as registry:
        registry.write("".join(f"{LOCALHOST} {format_public_key(key)}\n" for key in keys))


@attrs.frozen
class KeyDirectories:
    """
    The key directories and registries of the C{curvetun} transport: the
    server's registry admits the client's key from 127.0.0.1, the
    client's names the server's key for 127.0.0.1.
    """

    server_keydir: str
    server_registry: str
    server_key: bytes
    client_keydir: str
    client_registry: str
    client_key: bytes

    @classmethod
    def create(cls, directory: str, name: str = "") -> KeyDirectories:
        """
        Make both sides' key directories and registries in C{directory}
        (C{name} prefixes their names).
        """
        client_keydir = os.path.join(directory, f"{name}client-keys")
        client_registry = os.path.join(directory, f"{name}client.registry")
        client_key = make_keydir(client_keydir)
        server_keydir, server_registry, server_key = cls.server_for(
            directory, f"{name}server", client_key
        )
        write_registry(client_registry, server_key)
        return cls(
            server_keydir, server_registry, server_key, client_keydir, client_registry, client_key
        )

    @staticmethod
    def server_for(directory: str, name: str, client_key: bytes) -> tuple[str, str, bytes]:
        """
        Make another server key directory (each process needs its own),
        and a registry that admits C{client_key}: their paths and the
        server's public key.
        """
        keydir = os.path.join(directory, f"{name}-keys")
        registry = os.path.join(directory, f"{name}.registry")
        key = make_keydir(keydir)
        write_registry(registry, client_key)
        return keydir, registry, key


def curvetun_server_description(port: int, keydir: str, registry: str) -> str:
    """
    The endpoint string of a curvetun server on 127.0.0.1.
    """
    return (
        f"curvetun:{port}:interface={LOCALHOST}"
        f":keydir={quoteStringArgument(keydir)}:registry={quoteStringArgument(registry)}"
    )


def curvetun_client_description(port: int, server_key: bytes, keydir: str, registry: str) -> str:
    """
    The endpoint string of a curvetun client of 127.0.0.1:C{port}.
    """
    return (
        f"curvetun:{LOCALHOST}:{port}:key={server_key.hex()}"
        f":keydir={quoteStringArgument(keydir)}:registry={quoteStringArgument(registry)}"
    )


def make_certificate(directory: str) -> tuple[str, str]:
    """
    Write a throwaway self-signed ECDSA P-256 certificate for
    C{localhost} and C{127.0.0.1}, valid for a day, into C{directory}.

    @return: the paths of the certificate and of its private key (PEM).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


# -- the server side ----------------------------------------------------------------


@attrs.frozen
class ServerIdentity:
    """
    What a server process needs to listen through its transport: the
    client's curvetun key (C{curvetun-memory}), the TLS directory
    (C{tls}), the key directory and registry (C{curvetun}).
    """

    client_key: bytes = b""
    tls_dir: str | None = None
    keydir: str | None = None
    registry: str | None = None


def server_endpoint(
    reactor: Any, transport: str, identity: ServerIdentity
) -> tuple[IStreamServerEndpoint, bytes]:
    """
    The endpoint the server process listens on for C{transport} (each
    listen a new port), and its curvetun public key (empty for TCP and
    TLS).
    """
    if transport == "tcp":
        return TCP4ServerEndpoint(reactor, 0, interface=LOCALHOST), b""
    if transport == "tls":
        assert identity.tls_dir is not None
        key = quoteStringArgument(os.path.join(identity.tls_dir, "key.pem"))
        cert = quoteStringArgument(os.path.join(identity.tls_dir, "cert.pem"))
        description = f"ssl:0:interface={LOCALHOST}:privateKey={key}:certKey={cert}"
        return serverFromString(reactor, description), b""
    if transport == "curvetun":
        assert identity.keydir is not None and identity.registry is not None
        # As twist curvetun does: the program runs the key directory's
        # service itself (with its own limits) and lets endpoint strings
        # that name the directory use it.
        service = CurveTunService.from_keydir(
            identity.keydir, identity.registry, clock=reactor, limits=CURVETUN_LIMITS
        )
        service_pool.adopt(service, identity.keydir, identity.registry)
        service.startService()
        description = curvetun_server_description(0, identity.keydir, identity.registry)
        return serverFromString(reactor, description), service.vault.public_key
    vault = MemoryVault.generate()
    registry = Registry.parse(f"{LOCALHOST} {format_public_key(identity.client_key)}\n")
    memory_service = CurveTunService(vault, registry, clock=reactor, limits=CURVETUN_LIMITS)
    memory_service.startService()
    tcp = TCP4ServerEndpoint(reactor, 0, interface=LOCALHOST)
    return CurveTunServerEndpoint(tcp, memory_service), vault.public_key


# -- the client side ----------------------------------------------------------------


def tls_client_options(cert_path: str) -> Any:
    """
    Client TLS options that trust only the throwaway certificate, check
    the name C{localhost}, and require TLS 1.3.
    """
    from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS

    with open(cert_path, "rb") as pem:
        root = Certificate.loadPEM(pem.read())
    return optionsForClientTLS(
        "localhost",
        trustRoot=root,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


class ClientIdentities:
    """
    The client side's identities: an in-memory curvetun service
    (C{curvetun-memory}), the key directories (C{curvetun}), the TLS
    options (C{tls}).
    """

    def __init__(
        self,
        reactor: Any,
        keydirs: KeyDirectories | None = None,
        tls_options: Any = None,
    ) -> None:
        self.keydirs = keydirs
        self.tls_options = tls_options
        self.memory_service = CurveTunService(MemoryVault.generate(), Registry(), clock=reactor)
        self.memory_service.startService()

    @property
    def memory_key(self) -> bytes:
        """
        The in-memory client's public key.
        """
        public_key: bytes = self.memory_service.vault.public_key
        return public_key

    def stop(self) -> None:
        """
        Stop the in-memory client service.
        """
        if self.memory_service.running:
            self.memory_service.stopService()


class Connector:
    """
    How the client side reaches a server process over one transport.
    """

    def __init__(
        self, reactor: Any, transport: str, identities: ClientIdentities | None = None
    ) -> None:
        self.reactor = reactor
        self.transport = transport
        self._identities = identities
        self._endpoints: dict[int, IStreamClientEndpoint] = {}

    def endpoint(self, port: int, server_key: bytes) -> IStreamClientEndpoint:
        """
        A client endpoint for C{port} on 127.0.0.1 through this transport
        (for C{curvetun}, parsed from its endpoint string once per port,
        as an application does).
        """
        endpoint = self._endpoints.get(port)
        if endpoint is None:
            endpoint = self._endpoints[port] = self._make(port, server_key)
        return endpoint

    def _make(self, port: int, server_key: bytes) -> IStreamClientEndpoint:
        identities = self._identities
        assert identities is not None or self.transport == "tcp"
        if self.transport == "curvetun":
            assert identities is not None
            keydirs = identities.keydirs
            assert keydirs is not None
            description = curvetun_client_description(
                port, server_key, keydirs.client_keydir, keydirs.client_registry
            )
            endpoint: IStreamClientEndpoint = clientFromString(self.reactor, description)
            return endpoint
        tcp = TCP4ClientEndpoint(self.reactor, LOCALHOST, port)
        if self.transport == "tcp":
            return tcp
        if self.transport == "tls":
            assert identities is not None
            return wrapClientTLS(identities.tls_options, tcp)
        assert identities is not None
        return CurveTunClientEndpoint(tcp, identities.memory_service, server_key)
