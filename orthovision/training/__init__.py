"""Training: the loop, optimiser and schedule, calibration, augmentation, backbone comparison."""
