"""Load, before privileges are dropped, everything the mail path would otherwise load lazily.

Python reads some modules and data only on first use: text codecs (`punycode` for every IDN,
the charsets of RFC 2047 encoded words), the IDNA 2008 / UTS 46 tables, the public suffix list
of DMARC's organisational domain, dnspython's record-type classes. When dkproxy starts as root
with `user`/`group`/`chroot`, the first message would be the first use, after the drop: where
the interpreter lives somewhere the unprivileged user cannot read (pyenv under /root, a
virtualenv in a private home, anything outside a chroot), each such load fails and every
message gets 451. Loading them all while still root makes the unprivileged process need nothing
from the file system but its configuration's own files.
"""

from __future__ import annotations

import codecs
import encodings
import importlib
import logging
import pkgutil

log = logging.getLogger("dkproxy.preload")

#: Packages whose every submodule may be imported on first use by the mail path.
_LAZY_PACKAGES = ("encodings", "dns.rdtypes")


def _import_all(package_name: str) -> int:
    """Import every submodule of a package; returns how many loaded. Modules that cannot load
    on this platform (Windows code pages, for instance) are skipped: they could not load later
    either."""
    package = importlib.import_module(package_name)
    loaded = 0
    for module in pkgutil.walk_packages(package.__path__, package_name + "."):
        try:
            importlib.import_module(module.name)
            loaded += 1
        except Exception:  # unavailable here (mbcs, oem ...), so unavailable later too
            continue
    return loaded


def preload() -> None:
    """Import every lazily loaded codec, IDNA table, DNS record class and the public suffix list.

    Call while the process still has the privileges it started with, before chroot/setuid
    (dkproxy.daemon.drop_privileges). Costs a few tens of milliseconds once per start.
    Raises nothing that a missing optional piece could cause; a real failure (the public
    suffix list unreadable even now) propagates and stops the start with its reason.
    """
    from dkproxy.mailauth import dmarc
    from dkproxy.mailauth.addresses import canonical_domain, parse_mailboxes

    modules = sum(_import_all(name) for name in _LAZY_PACKAGES)
    for name in set(encodings.aliases.aliases.values()) | {"punycode", "idna"}:
        try:
            codecs.lookup(name)
        except LookupError:
            continue
    # The IDNA tables (idna.uts46data, idna.idnadata) and the codecs both directions use.
    canonical_domain("Exämple.ORG")
    canonical_domain("xn--exmple-cua.org")
    # The full RFC 5322 / RFC 2047 header parser and its quoted-printable and base64 decoders.
    parse_mailboxes('=?utf-8?q?J=C3=B6rg?= =?utf-8?b?w7Y=?= <"j d"@example.org>, (c) a@b.example')
    dmarc.organizational_domain("mail.example.co.uk")  # reads the public suffix list
    log.debug("preloaded %d modules before dropping privileges", modules)
