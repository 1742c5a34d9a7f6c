"""Mail authentication: the message model, DKIM, DomainKeys, ARC, SPF, DMARC, Authentication-Results
and the DNS resolver they share. Pure data -> data: no SMTP, no configuration files."""
