"""Device I/O: reader, badge and door drivers that emit small frozen value types."""
