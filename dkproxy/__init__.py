"""dkproxy: an SMTP proxy that signs mail with DKIM and DomainKeys, and verifies it."""

__version__ = "0.1.0"
