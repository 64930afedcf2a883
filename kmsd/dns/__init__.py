"""DNS for KMS hosts: SRV publication by dynamic update (publish), a lab responder (responder)."""
