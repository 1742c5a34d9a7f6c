"""dkproxy's SMTP layer: aiosmtpd listener, aiosmtplib downstream, spool, workers."""
