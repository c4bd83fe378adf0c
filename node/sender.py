"""C-STORE SCU: send archived instances to one destination and report every returned status.

One association per call, proposing each instance's own SOP class with its own transfer syntax
in a context of its own (plus the other uncompressed syntax, for an uncompressed file). Nothing is
taken for granted: an association that is rejected, aborted or never answered, a DIMSE timeout,
or a failure status is reported per instance; only 0x0000 (success) and the warning statuses
count as delivered.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import code_to_category

from config.settings import Destination, NodeSettings
from node.tls import harden

log = logging.getLogger(__name__)

SUCCESS = 0x0000
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Outgoing:
    """One archived instance to send."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass(frozen=True)
class SendOutcome:
    """What the destination answered for one instance. ``status`` is None when it never answered."""

    sop_uid: str
    status: int | None
    error: str = ""

    @property
    def category(self) -> str:
        if self.status is None:
            return "No answer"
        return code_to_category(self.status)

    @property
    def delivered(self) -> bool:
        return self.category in ("Success", "Warning")

    @property
    def warning(self) -> bool:
        return self.category == "Warning"


def send(destination: Destination, instances: Sequence[Outgoing], node: NodeSettings) -> list[SendOutcome]:
    """C-STORE ``instances`` to ``destination`` on one association, calling as ``node.ae_title``."""
    if not instances:
        return []
    ae = _application_entity(node, instances)
    try:
        tls_args = client_tls(destination, node)
    except (OSError, ssl.SSLError) as exc:  # a certificate, key or CA file missing or unreadable
        log.error("destination %s: TLS set-up failed: %s", destination.name, exc)
        return _all(instances, None, f"TLS set-up failed: {type(exc).__name__}")
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        return _all(instances, None, f"cannot connect: {type(exc).__name__}")
    if not assoc.is_established:
        reason = ("association rejected" if assoc.is_rejected else
                  "no association (connection refused, TLS handshake failed, aborted or timed out)" if tls_args
                  else "no association (connection refused, aborted or timed out)")
        log.warning("destination %s (%s@%s:%d): %s", destination.name, destination.ae_title,
                    destination.host, destination.port, reason)
        return _all(instances, None, reason)
    try:
        return [_store_one(assoc, item) for item in instances]
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _application_entity(node: NodeSettings, instances: Sequence[Outgoing]) -> AE:
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.maximum_pdu_size = node.max_pdu_size
    for sop_class, syntax in _contexts(instances):
        ae.add_requested_context(sop_class, [syntax])
    return ae


def _contexts(instances: Sequence[Outgoing]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs to propose, one syntax per presentation context: each
    file's own first, and for an uncompressed file the other little-endian syntax as a fallback.

    One syntax per context lets the destination accept the file's own syntax, so the archived
    bytes go out as they are; proposed together, a destination may pick Implicit VR and every
    file would be decoded and re-encoded on the way out (costly for a SEG's frames).
    """
    pairs: list[tuple[str, str]] = []
    for item in instances:
        wanted = [item.transfer_syntax_uid]
        if UID(item.transfer_syntax_uid) in UNCOMPRESSED:
            wanted += [str(ts) for ts in UNCOMPRESSED]
        pairs.extend((item.sop_class_uid, ts) for ts in wanted if (item.sop_class_uid, ts) not in pairs)
    return pairs


def _store_one(assoc, item: Outgoing) -> SendOutcome:  # noqa: ANN001 - pynetdicom Association
    if not assoc.is_established:
        return SendOutcome(item.sop_uid, None, "association ended before this instance was sent")
    try:
        status = assoc.send_c_store(item.path)
    except ValueError as exc:  # no accepted presentation context for this SOP class/syntax
        return SendOutcome(item.sop_uid, None, f"not accepted by the destination: {exc}"[:500])
    except (OSError, AttributeError) as exc:
        return SendOutcome(item.sop_uid, None, f"cannot read the archived file: {type(exc).__name__}")
    if "Status" not in status:
        return SendOutcome(item.sop_uid, None, "no response (DIMSE timeout or association aborted)")
    code = int(status.Status)
    outcome = SendOutcome(item.sop_uid, code, withheld_comment(status.get("ErrorComment")))
    if not outcome.delivered:
        log.warning("C-STORE of %s answered 0x%04X (%s)", item.sop_uid, code, outcome.category)
    elif outcome.warning:
        log.info("C-STORE of %s answered warning 0x%04X", item.sop_uid, code)
    return outcome


def withheld_comment(comment: object) -> str:
    """What is kept of a destination's Error Comment (0000,0902): its length only. It is free text
    from another system and may quote the data set (a patient's name or ID); it would otherwise go
    into the logs, the audit trail and the job's error."""
    text = str(comment or "").strip()
    return f"the destination's error comment withheld ({len(text)} characters)" if text else ""


def _all(instances: Sequence[Outgoing], status: int | None, error: str) -> list[SendOutcome]:
    return [SendOutcome(item.sop_uid, status, error) for item in instances]


def client_tls(destination: Destination, node: NodeSettings) -> tuple[ssl.SSLContext, str] | None:
    """DICOM TLS to this destination (BCP 195: TLS 1.2+), verifying its certificate and name against
    ``destination.tls.ca_certificates`` (else ``node.tls.ca_certificates``, else the system's CAs) and
    presenting ``destination.tls.certificate`` (else the node's own, when it has one)."""
    tls = destination.tls
    if not tls.enabled:
        return None
    cafile = tls.ca_certificates or node.tls.ca_certificates
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None)
    harden(context)
    certificate, key = ((tls.certificate, tls.private_key) if tls.certificate
                        else (node.tls.certificate, node.tls.private_key))
    if certificate and key:
        context.load_cert_chain(str(certificate), str(key))
    return context, tls.server_name or destination.host
