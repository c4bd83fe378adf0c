"""DICOM TLS contexts, BCP 195 profile (PS3.15 Annex B.9, RFC 9325): TLS 1.2 or newer, forward-secret
AEAD cipher suites, no compression, no renegotiation. Used by the listener (server side) and the
sender (client side, see ``node.sender``). The listener also reads the subject of a peer's verified
certificate, to which an allowed calling AE title may be bound (``certificate_subject``)."""

from __future__ import annotations

import ssl

from config.settings import TLSSettings

BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
"""TLS 1.2 cipher suites of the BCP 195 profile (PS3.15 B.9; RFC 9325): forward secrecy, AEAD only.
TLS 1.3 suites are all acceptable and not affected by this list."""


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """BCP 195 on either side: TLS 1.2 or newer, the suites above, no compression or renegotiation."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The server side of DICOM TLS (BCP 195), or None when TLS is off. With
    ``require_client_certificate`` a peer without a certificate signed by ``ca_certificates`` fails
    the handshake; without it, a certificate a peer offers is still verified against
    ``ca_certificates`` (when given), and one that does not verify fails the handshake."""
    if not tls.enabled:
        return None
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(str(tls.ca_certificates))
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL  # a certificate offered is verified (and audited); none is fine
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST", "streetAddress": "STREET",
                "domainComponent": "DC", "userId": "UID"}
"""The RFC 4514 names of the attributes Python's ``getpeercert()`` spells out."""

Subject = tuple[tuple[str, str], ...]


def peer_subject(sock: object) -> Subject | None:
    """The subject of the certificate the peer presented and the handshake verified, as (RFC 4514
    attribute name, value) pairs; None without TLS, without a certificate, or when unverified."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        certificate = sock.getpeercert()  # {} when the certificate was not verified
    except (OSError, ValueError):
        return None
    if not certificate:
        return None
    return tuple((_SHORT_NAMES.get(name, name), value) for rdn in certificate.get("subject", ()) for name, value in rdn)


def subject_matches(subject: Subject | None, bound: str) -> bool:
    """Whether a certificate's ``subject`` is ``bound``: a common name (``ct1.example.org``), or a
    whole subject in RFC 4514 form (``CN=ct1.example.org,O=Hospital``; any order, no escaped commas)."""
    if subject is None:
        return False
    if "=" not in bound:
        return [value for name, value in subject if name == "CN"] == [bound]
    wanted = [tuple(part.strip() for part in pair.split("=", 1)) for pair in bound.split(",")]
    return sorted(subject) == sorted(wanted)
