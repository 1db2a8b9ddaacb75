"""Clinical outputs: DICOM SR and Secondary Capture, the PDF report, DICOMweb (STOW-RS)."""
