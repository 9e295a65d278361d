"""
The interfaces between curvetun's parts.

A vault (L{IVault}) is the only holder of a long-term secret key; a registry
(L{IRegistry}) says which long-term public keys belong to which peers; an
established connection's transport provides L{ICurveTunTransport}.
"""

from __future__ import annotations

from twisted.internet.interfaces import ITransport
from zope.interface import Attribute, Interface


class IVault(Interface):
    """
    Holds one long-term Curve25519 key pair and does every operation that
    needs its secret half. The secret key never leaves an IVault: there is
    no method or attribute that returns it.

    An alternative implementation (hardware token, agent) provides this
    interface and can replace the file-backed vault.
    """

    public_key: bytes = Attribute("The 32-byte long-term public key.")

    def safe_nonce() -> bytes:
        """
        Return a fresh 16-byte safe nonce: never the same twice for this
        key, even across restarts and crashes.
        """

    def box(
        plaintext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        """
        NaCl C{crypto_box} C{plaintext} from this vault's secret key to
        C{peer_public_key} under the 24-byte C{nonce}; return the 16-byte
        authenticator followed by the ciphertext.

        The caller must build C{nonce} from a value of L{safe_nonce} (with
        the 8-byte prefix the protocol gives for that box), so that no nonce
        is ever used twice with this key.

        @param ephemeral_peer: C{peer_public_key} is a peer's ephemeral key,
            used for this one handshake: a vault may keep the precomputed
            key it shares with a long-term peer for later, and should not
            let ephemeral ones crowd those out.
        """

    def box_open(
        ciphertext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        """
        Open a box made by C{peer_public_key} for this vault's key
        (C{ephemeral_peer} as for L{box}).

        @raise curvetun.errors.BadPacket: the box does not verify, or the
            peer key is unusable (for instance a low-order point).
        """


class IRegistry(Interface):
    """
    Which long-term public keys belong to which peer addresses, like SSH's
    C{known_hosts} / C{authorized_keys}.
    """

    def is_client_allowed(client_key: bytes, peer_host: str) -> bool:
        """
        Server side: may a client holding C{client_key} connect from the IP
        address C{peer_host}?
        """

    def server_key_for(host: str) -> bytes | None:
        """
        Client side: the long-term public key registered for server C{host}
        (a host name or an IP address literal), or L{None}.
        """


class ICurveTunTransport(ITransport):
    """
    The transport an application protocol sees on an established curvetun
    connection: a byte stream like TCP's (C{write} may split and coalesce),
    plus message-preserving sends and the peer's authenticated identity.
    """

    peer_public_key: bytes = Attribute(
        "The peer's 32-byte long-term public key, authenticated by the handshake."
    )
    bytes_received: int = Attribute("Application bytes received so far (read-only).")
    bytes_sent: int = Attribute("Application bytes sent so far (read-only).")
    established_at: float | None = Attribute(
        "When the handshake was done, in the seconds of the connection's clock (read-only)."
    )
    last_received_at: float | None = Attribute(
        "When the last message from the peer opened, or None before the first (read-only)."
    )
    last_sent_at: float | None = Attribute(
        "When the last message to the peer was sent, or None before the first (read-only)."
    )

    def write_message(data: bytes) -> None:
        """
        Send C{data} as exactly one protocol message: the peer receives it
        whole, in one C{dataReceived} call (for message-minded peers such as
        the Erlang original).

        @raise curvetun.errors.MessageTooLong: C{data} is longer than 65503
            bytes.
        """


class IServerKeys(IVault):
    """
    A server's long-term keys during a key rollover: the current key (the
    L{IVault} this provides, which a client side also uses) and, until
    the rollover is finished, the previous one, each its own vault with
    its own nonce key and counter.
    """

    def vaults() -> tuple[IVault, ...]:
        """
        The vaults a hello may be sealed to, current first: the server
        tries the next only when the one before does not open the hello.
        """
