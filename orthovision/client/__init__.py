"""The bulk HTTP client (`orthovision bulk`)."""
