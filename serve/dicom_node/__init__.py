"""The DICOM node: receive studies by C-STORE, send SR/SC back from a persistent outbox."""
