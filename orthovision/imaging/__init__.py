"""Imaging: decoding (PNG, JPEG, DICOM), input quality checks and model preprocessing."""
