"""`dkproxy relay`: a submission-style listener for applications, signing, and a smarthost hop.

Applications submit with STARTTLS or implicit TLS and AUTH (or from an allowed network);
dkproxy checks who may send as whom, signs exactly as `dkproxy out` does, and relays the
message to a smarthost over verified TLS with AUTH, answering each command with the
smarthost's own reply (no queue of its own).

`server` starts it, `state` holds what a reload replaces, `listener` is the SMTP side with the
sender rules of `credentials` (logins, `passwd`) and `guard` (client limits), `smarthost` the
hop on, `tls` the certificates. Its configuration file is read by `dkproxy.config.relay`.
"""
