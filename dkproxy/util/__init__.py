"""The bottom layer: helpers every other layer may use and that use no other part of dkproxy.

`domains` gives the one canonical form of a domain name (IDNA, RFC 5890); `buffer` names what
a message's bytes can be held in (memory or a spool file's mmap).
"""
