"""dkproxy's SMTP layer: the aiosmtpd listener, the aiosmtplib downstream, the spool, the workers."""
