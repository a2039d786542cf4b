"""What engine/ and deploy/ both use, so neither reaches into the other for it: atomic writes and
one-line errors."""
