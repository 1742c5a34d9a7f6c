"""Administration tools: keygen, dnscheck, check-config (keytools; check_relay for a relay
configuration) and the demo."""
