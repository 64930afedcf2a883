"""kmsclient: a KMS client that activates against, verifies and loads KMS hosts."""
