"""The handover state format (definitions, encoder, decoder)."""
