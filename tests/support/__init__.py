"""Test infrastructure: real DNS (NSD), real SMTP sinks, real third-party verifiers.

Modules: tools (require_tool, ports), dnsserver (DNSServer), sink (SmtpSink, CaptureServer),
verifiers (Mail::DKIM, OpenDKIM, go-msgauth, dkimpy), testkeys (key files). Nothing here starts
a process at import time; tests/conftest.py wires the fixtures.
"""
