"""Clinical safety: scope from the header, out-of-distribution detection and its fitting."""
