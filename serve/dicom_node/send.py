"""Results back to the PACS: C-STORE of the outbox's SR/SC objects, one association per
destination and round, each object removed only when the destination confirmed it."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from serve.dicom_node.queue import Result

log = logging.getLogger("orthovision.dicom_node")


@dataclass(frozen=True)
class Delivery:
    sent: list[Result]
    failed: list[Result]  # to retry later
    reason: str = ""


def confirmed(status: int) -> bool:
    """PS3.4 B.2.3: Success (0x0000) and the Warnings (0xB000, 0xB006, 0xB007) store the
    object; anything else (0xA7xx Out of Resources, 0xA9xx, 0xCxxx) did not."""
    return status == 0x0000 or (status & 0xF000) == 0xB000


def deliver(ae_title: str, results: Sequence[Result], timeout_s: float = 30.0) -> Delivery:
    """C-STORE `results` (all for one destination) over one association."""
    if not results:
        return Delivery([], [])
    called, host, port = results[0].destination
    datasets = [dcmread(io.BytesIO(r.data)) for r in results]
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntax in sorted(
        {(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets}
    ):
        ae.add_requested_context(
            sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        )
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return Delivery([], list(results), f"association with {called} failed")
    sent, failed = [], []
    try:
        for result, dataset in zip(results, datasets, strict=True):
            try:
                status = assoc.send_c_store(dataset)
            except ValueError:  # the destination accepted no context for this SOP class
                failed.append(result)
                continue
            code = getattr(status, "Status", None)
            (sent if code is not None and confirmed(code) else failed).append(result)
            if not assoc.is_established:  # aborted mid-round: the rest waits
                failed.extend(r for r in results[len(sent) + len(failed) :])
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return Delivery(sent, failed, f"{len(failed)} refused by {called}" if failed else "")
