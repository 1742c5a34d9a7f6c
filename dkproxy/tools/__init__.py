"""Administration tools: keygen, dnscheck, check-config (keytools) and the demo."""
