"""Small helpers with no protocol knowledge."""
