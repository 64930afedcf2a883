"""kmsd: a KMS (Windows Key Management Service) host emulator."""

__version__ = "0.1.0"
